"""Shard jobs on Ray actors.

:class:`RayExecutor` starts one actor per GPU (or a few CPU actors) on a Ray cluster; each
actor rebuilds the warmed-up model from the base model (in the driver's weight dtype, on its own
device) and the adapter's weights (:func:`worker_spec`), and Ray restarts an actor whose process
dies and retries its task. Workers return arrays to the driver, so the cluster needs no shared
file system; only the model path must resolve on every node.

``--device`` chooses the actors' kind: ``cuda`` one actor per cluster GPU (``num_gpus=1``: Ray
gives each its own GPU), ``cpu`` CPU actors even on GPU nodes. The driver's own GPU is never
given to an actor: a local cluster (no ``--ray-address``) is started without it, and on a
cluster started by hand an actor placed on the driver's GPU stops the run with the fix
(start that node's Ray without it: ``CUDA_VISIBLE_DEVICES=1,...`` before ``ray start``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator

import numpy as np

from ntkselect.errors import NtkSelectError
from ntkselect.model.loading import load_model
from ntkselect.model.memory import MemoryCosts, activation_budget
from ntkselect.model.runtime import Runtime
from ntkselect.runs.executors.base import Executor, Job
from ntkselect.runs.tasks import ShardSpec, ShardTask
from ntkselect.training.warmup import WarmupOptions, add_lora

__all__ = ["RayExecutor", "worker_spec", "driver_gpu", "gpus_without"]

logger = logging.getLogger(__name__)


def worker_spec(model, model_name: str, lora: dict, rt) -> dict:
    """What a worker needs to rebuild ``model`` (the base model ``model_name`` with the LoRA
    options ``lora`` and the adapter's current weights) and the run's batching."""
    from peft import get_peft_model_state_dict

    return {
        "model": model_name,
        "lora": lora,
        "adapter_state": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()},
        "dtype": str(rt.dtype).replace("torch.", ""),
        "model_dtype": str(rt.model_dtype).replace("torch.", ""),
        "batch_size": rt.batch_size,
        "max_batch_tokens": rt.max_batch_tokens,
        "padding_side": rt.padding_side,
        "pad_id": rt.pad_id,
        "memory": rt.memory,
        "device_type": rt.device.type,
    }


def driver_gpu(index: int, visible: str | None) -> str:
    """The driver's GPU as the node names it: entry ``index`` of ``CUDA_VISIBLE_DEVICES``
    (``visible``; None or empty: all GPUs, so the index itself)."""
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids[index] if ids else str(index)


def gpus_without(count: int, visible: str | None, mine: str) -> list[str]:
    """The node's GPUs (``count`` visible to the driver) other than the driver's ``mine``."""
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return [i for i in ids if i != mine]


def _worker_class():
    import ray

    @ray.remote(max_restarts=4, max_task_retries=4)
    class ShardWorker:
        """Rebuilds the warmed-up model once, then runs shard tasks."""

        def __init__(self, spec: dict):
            import torch

            if spec.get("threads"):
                torch.set_num_threads(spec["threads"])
            if spec.get("use_gpu") and not torch.cuda.is_available():
                raise RuntimeError(f"this Ray worker was given a GPU but torch sees none (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
            # a GPU actor sees only the GPU Ray gave it (CUDA_VISIBLE_DEVICES), as cuda:0
            device = torch.device("cuda" if spec.get("use_gpu") else spec.get("device_type", "cpu"))
            dtype = getattr(torch, spec["dtype"])
            if device.type == "cpu" and dtype == torch.bfloat16 and not spec.get("cpu_bf16", True):
                dtype = torch.float32
            model_dtype = getattr(torch, spec.get("model_dtype", "float32"))
            # straight onto this actor's own device, in the run's weight dtype: no float32 host copy
            model = add_lora(load_model(spec["model"], model_dtype, device), WarmupOptions(**spec["lora"]))
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, spec["adapter_state"])
            self.model = model.eval()
            self.rt = Runtime(
                device=device,
                dtype=dtype,
                model_dtype=model_dtype,
                batch_size=spec["batch_size"],
                max_batch_tokens=spec["max_batch_tokens"],
                padding_side=spec["padding_side"],
                pad_id=spec["pad_id"],
                progress=False,
            )
            mem = spec.get("memory")
            if mem is not None and device.type == spec.get("device_type") and str(dtype).replace("torch.", "") == spec["dtype"]:
                # the driver's measured costs hold for the same device kind and precision; the budget is this worker's own
                self.rt.memory = MemoryCosts(mem.passes, activation_budget(device))

        def pid(self) -> int:
            return os.getpid()

        def place(self) -> tuple[str, list[str]]:
            """(node IP, the GPU ids Ray gave this actor)."""
            import ray

            return ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

        def run(self, task: ShardTask, index: int, examples: list, payload, ids: list | None = None):
            t = time.perf_counter()
            arr = task(self.model, examples, self.rt, payload, ids)
            return index, np.asarray(arr), time.perf_counter() - t

    return ShardWorker


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


class RayExecutor(Executor):
    """Runs shard jobs on Ray actors: one per GPU where the cluster has GPUs, else ``workers``
    CPU actors (default: one per 2 CPUs). Ray restarts a dead actor and retries its task."""

    name = "ray"

    def __init__(self, worker_spec: dict, address: str | None = None, workers: int = 0, log=None, device=None):
        try:
            import ray
        except ImportError:
            raise NtkSelectError("--executor ray needs Ray: pip install 'ntkselect[ray]'") from None
        self.ray = ray
        kind = worker_spec.get("device_type", "cpu")
        mine = None  # the driver's GPU, as its node names it
        if kind == "cuda":
            import torch

            index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
            mine = driver_gpu(index, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if not ray.is_initialized():
            started_here = not address
            others = gpus_without(_cuda_count(), os.environ.get("CUDA_VISIBLE_DEVICES"), mine) if started_here and mine is not None else None
            if others == []:
                raise NtkSelectError(
                    f"--executor ray --device cuda: the driver holds this machine's only GPU ({mine}) and Ray's workers never share it; "
                    "use --executor local, or a machine or cluster with more GPUs"
                )
            saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            try:
                if others is not None:  # the local cluster (and so its workers) sees every GPU but the driver's
                    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(others)
                ray.init(
                    address=address or None,
                    include_dashboard=False,
                    log_to_driver=False,
                    ignore_reinit_error=True,
                    num_gpus=len(others) if others is not None else None,
                    runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                )
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise NtkSelectError(
                    f"--ray-address {address!r}: cannot connect to a Ray cluster ({str(err).splitlines()[0]}); "
                    "start one with `ray start --head` or leave --ray-address empty for a local one"
                ) from None
            finally:
                if others is not None:
                    if saved is None:
                        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                    else:
                        os.environ["CUDA_VISIBLE_DEVICES"] = saved
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        use_gpu = kind == "cuda"
        if use_gpu and gpus == 0:
            raise NtkSelectError(
                f"--executor ray --device cuda: the Ray cluster at {address or 'this machine'} has no GPUs; "
                "start its nodes with GPUs (`ray start ... --num-gpus N`) or use --device cpu"
            )
        n = workers or (gpus if use_gpu else max(1, int(res.get("CPU", 1)) // 2))
        threads = 0 if use_gpu else max(1, int(res.get("CPU", 1)) // n)
        spec = {**worker_spec, "use_gpu": use_gpu, "threads": threads}
        ref = ray.put(spec)
        cls = _worker_class()
        self.actors = [cls.options(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else threads).remote(ref) for _ in range(n)]
        if mine is not None:
            here = ray.util.get_node_ip_address()
            try:
                places = ray.get([a.place.remote() for a in self.actors])
            except ray.exceptions.RayError as err:
                self.close()
                raise NtkSelectError(f"a Ray worker could not start ({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
            if any(node == here and mine in ids for node, ids in places):
                self.close()
                raise NtkSelectError(
                    f"--executor ray: Ray gave a worker the driver's own GPU ({mine} on {here}); start Ray on this node without it, "
                    f"e.g. `CUDA_VISIBLE_DEVICES=<the other GPUs> ray start ...`, or run the driver on a node whose GPU Ray does not use"
                )
        (log or logger.info)(f"ntkselect: Ray executor with {n} {'GPU' if use_gpu else 'CPU'} worker(s) on {address or 'a local cluster'}")

    def worker_pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def map(self, task: ShardTask, jobs: Iterable[Job], payload, desc: str = "") -> Iterator[tuple[ShardSpec, np.ndarray, float]]:
        ray = self.ray
        pref = ray.put(payload)
        specs: dict = {}
        queue = iter(jobs)  # consumed as actors free up: one shard's examples built at a time, never the whole pool
        pending = next(queue, None)
        inflight: dict = {}
        free = list(self.actors) * 2  # two tasks queued per actor keeps each busy
        while pending is not None or inflight:
            while pending is not None and free:
                actor = free.pop(0)
                spec, examples, ids = pending
                specs[spec.index] = spec
                inflight[actor.run.remote(task, spec.index, examples, pref, ids)] = actor
                pending = next(queue, None)
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(done[0])
            free.append(actor)
            try:
                index, arr, secs = ray.get(done[0])
            except ray.exceptions.RayError as err:
                raise NtkSelectError(
                    f"a Ray worker failed after its retries ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                    "rerun the same command to resume from the finished shards"
                ) from None
            yield specs[index], arr, secs

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort: an actor may already be gone
                pass
