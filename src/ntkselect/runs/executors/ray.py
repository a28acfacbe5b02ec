"""Shard jobs on Ray actors.

:class:`RayExecutor` starts one actor per GPU (or a few CPU actors) on a Ray cluster; each
actor rebuilds the warmed-up model from the base model and the adapter's weights
(:func:`worker_spec`), and Ray restarts an actor whose process dies and retries its task.
Workers return arrays to the driver, so the cluster needs no shared file system; only the
model path must resolve on every node.
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

__all__ = ["RayExecutor", "worker_spec"]

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
        "batch_size": rt.batch_size,
        "max_batch_tokens": rt.max_batch_tokens,
        "padding_side": rt.padding_side,
        "pad_id": rt.pad_id,
        "memory": rt.memory,
        "device_type": rt.device.type,
    }


def _worker_class():
    import ray

    @ray.remote(max_restarts=4, max_task_retries=4)
    class ShardWorker:
        """Rebuilds the warmed-up model once, then runs shard tasks."""

        def __init__(self, spec: dict):
            import torch

            if spec.get("threads"):
                torch.set_num_threads(spec["threads"])
            device = torch.device("cuda") if torch.cuda.is_available() and spec.get("use_gpu") else torch.device("cpu")
            dtype = getattr(torch, spec["dtype"])
            if device.type == "cpu" and dtype == torch.bfloat16 and not spec.get("cpu_bf16", True):
                dtype = torch.float32
            model = add_lora(load_model(spec["model"]), WarmupOptions(**spec["lora"]))
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, spec["adapter_state"])
            self.model = model.to(device).eval()
            self.rt = Runtime(
                device=device,
                dtype=dtype,
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

        def run(self, task: ShardTask, index: int, examples: list, payload, ids: list | None = None):
            t = time.perf_counter()
            arr = task(self.model, examples, self.rt, payload, ids)
            return index, np.asarray(arr), time.perf_counter() - t

    return ShardWorker


class RayExecutor(Executor):
    """Runs shard jobs on Ray actors: one per GPU where the cluster has GPUs, else ``workers``
    CPU actors (default: one per 2 CPUs). Ray restarts a dead actor and retries its task."""

    name = "ray"

    def __init__(self, worker_spec: dict, address: str | None = None, workers: int = 0, log=None):
        try:
            import ray
        except ImportError:
            raise NtkSelectError("--executor ray needs Ray: pip install 'ntkselect[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(
                    address=address or None,
                    include_dashboard=False,
                    log_to_driver=False,
                    ignore_reinit_error=True,
                    runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                )
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise NtkSelectError(
                    f"--ray-address {address!r}: cannot connect to a Ray cluster ({str(err).splitlines()[0]}); "
                    "start one with `ray start --head` or leave --ray-address empty for a local one"
                ) from None
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        use_gpu = gpus > 0
        n = workers or (gpus if use_gpu else max(1, int(res.get("CPU", 1)) // 2))
        threads = 0 if use_gpu else max(1, int(res.get("CPU", 1)) // n)
        spec = {**worker_spec, "use_gpu": use_gpu, "threads": threads}
        ref = ray.put(spec)
        cls = _worker_class()
        self.actors = [cls.options(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else threads).remote(ref) for _ in range(n)]
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
