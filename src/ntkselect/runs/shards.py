"""Sharded, resumable work and the executors that run it (local or a Ray cluster).

The pool is split into shards (contiguous ranges of records). Each shard's result (stage-1
embeddings, stage-2 scores, LESS features) is written to its own ``.npy`` under the run's
``work/`` folder, atomically (temporary file, then rename), followed by a small ``.done``
marker that names what the result was computed from. A rerun after a crash, ``kill -9``
included, trusts a shard only if its marker exists and matches; the rest are recomputed,
and since every shard is computed the same way the outcome equals an uninterrupted run.

Executors run a list of shard jobs and yield each result as it finishes; the driver writes it.
:class:`LocalExecutor` runs them in this process with the model it already has.
:class:`RayExecutor` starts one actor per GPU (or a few CPU actors) on a Ray cluster; each
actor rebuilds the warmed-up model from the base model and the adapter's weights, and Ray
restarts an actor whose process dies and retries its task. Workers return arrays to the
driver, so the cluster needs no shared file system; only the model path must resolve on
every node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_open, atomic_write_json
from ntkselect.progress import Progress

__all__ = ["ShardSpec", "plan_shards", "ShardStore", "LocalExecutor", "RayExecutor", "run_sharded", "TASKS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_shards(n: int, shard_size: int) -> list[ShardSpec]:
    return [ShardSpec(i, s, min(n, s + shard_size)) for i, s in enumerate(range(0, n, shard_size))]


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (what a shard was computed from)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


class ShardStore:
    """``root/<stage>/shard-00007.npy`` + ``.done`` markers, and a JSONL timing log."""

    def __init__(self, root: str | os.PathLike, log_path: str | os.PathLike | None = None):
        self.root = Path(root)
        self.log_path = Path(log_path) if log_path else None
        self.skipped: dict[str, int] = {}  # stage -> shards found finished (a resumed run)

    def _base(self, stage: str, spec: ShardSpec) -> Path:
        return self.root / stage / f"shard-{spec.index:05d}"

    def is_done(self, stage: str, spec: ShardSpec, key: str) -> bool:
        marker = self._base(stage, spec).with_suffix(".done")
        if not marker.exists() or not self._base(stage, spec).with_suffix(".npy").exists():
            return False
        try:
            m = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        return m.get("key") == key and m.get("start") == spec.start and m.get("stop") == spec.stop

    def save(self, stage: str, spec: ShardSpec, key: str, array: np.ndarray, meta: dict) -> None:
        base = self._base(stage, spec)
        with atomic_open(base.with_suffix(".npy"), "wb", encoding=None) as f:
            np.save(f, np.ascontiguousarray(array))
        # the marker last: a shard without one is never trusted
        atomic_write_json(base.with_suffix(".done"), {"key": key, "start": spec.start, "stop": spec.stop, "shape": list(array.shape), **meta})
        self.log({"event": "shard_done", "stage": stage, "shard": spec.index, "start": spec.start, "stop": spec.stop, **meta})

    def load(self, stage: str, spec: ShardSpec) -> np.ndarray:
        return np.load(self._base(stage, spec).with_suffix(".npy"), mmap_mode="r")

    def log(self, row: dict) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": round(time.time(), 3), **row}, default=str) + "\n"
        with open(self.log_path, "a", encoding="utf-8") as f:  # one short line per write: appends do not interleave
            f.write(line)


# -- shard tasks: (model, examples, rt, payload) -> array -------------------------------------

def _task_embed(model, examples, rt, payload, ids=None, desc="stage 1: embeddings") -> np.ndarray:
    from ntkselect.selection.ntk.stage1 import embed

    return embed(model, examples, rt, ids=ids, desc=desc)  # (n, d) float32


def _task_score(model, examples, rt, payload, ids=None, desc="stage 2: candidates") -> np.ndarray:
    from ntkselect.selection.ntk.stage2 import score_against

    return score_against(model, examples, payload["vec"], rt, desc=desc, ids=ids)  # (n,) float64


def _task_less(model, examples, rt, payload, ids=None, desc="less: gradients") -> np.ndarray:
    import torch

    from ntkselect.grads.projection import RademacherProjector
    from ntkselect.selection.ntk.stage2 import projected_features
    from ntkselect.training.warmup import per_example_loss

    m, v = payload["m"].to(rt.device), payload["v"].to(rt.device)
    b1, b2, eps = payload["b1"], payload["b2"], payload["eps"]

    def adam(g):  # (B, D) -> (B, D): LESS's Adam update direction from the warm-up's moments
        g = g.float()
        return (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps)

    proj = RademacherProjector(payload["dim"], payload["proj_dim"], payload["seed"], device=rt.device)
    return projected_features(model, examples, proj, rt, objective=per_example_loss, transform=adam, chunk_bytes=payload.get("chunk_bytes", 1 << 30),
                              ids=ids, desc=desc)


TASKS: dict[str, Callable] = {"embed": _task_embed, "score": _task_score, "less": _task_less}


# -- executors ----------------------------------------------------------------------------------

class LocalExecutor:
    """Runs shard jobs one after another in this process."""

    name = "local"

    def __init__(self, model_fn: Callable[[], Any], rt):
        self.model_fn, self.rt = model_fn, rt

    def map(self, task: str, jobs: Sequence[tuple[ShardSpec, list, list | None]], payload: dict,
            desc: str = "") -> Iterator[tuple[ShardSpec, np.ndarray, float]]:
        model = self.model_fn()
        for spec, examples, ids in jobs:
            t = time.perf_counter()
            # within a shard the task's own progress line runs (a shard can take minutes)
            arr = TASKS[task](model, examples, self.rt, payload, ids, f"{desc} [shard {spec.index + 1}]")
            yield spec, np.asarray(arr), time.perf_counter() - t

    def close(self) -> None:
        pass


def _worker_class():
    import ray

    @ray.remote(max_restarts=4, max_task_retries=4)
    class ShardWorker:
        """Rebuilds the warmed-up model once, then runs shard tasks."""

        def __init__(self, spec: dict):
            import torch

            from ntkselect.model.loading import load_model
            from ntkselect.model.runtime import Runtime
            from ntkselect.training.warmup import WarmupOptions, add_lora

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
            self.rt = Runtime(device=device, dtype=dtype, batch_size=spec["batch_size"], max_batch_tokens=spec["max_batch_tokens"],
                              padding_side=spec["padding_side"], pad_id=spec["pad_id"], progress=False)
            mem = spec.get("memory")
            if mem is not None and device.type == spec.get("device_type") and str(dtype).replace("torch.", "") == spec["dtype"]:
                from ntkselect.model.memory import MemoryCosts, activation_budget

                # the driver's measured costs hold for the same device kind and precision; the budget is this worker's own
                self.rt.memory = MemoryCosts(mem.passes, activation_budget(device))

        def pid(self) -> int:
            return os.getpid()

        def run(self, task: str, index: int, examples: list, payload: dict, ids: list | None = None):
            t = time.perf_counter()
            arr = TASKS[task](self.model, examples, self.rt, payload, ids)
            return index, np.asarray(arr), time.perf_counter() - t

    return ShardWorker


class RayExecutor:
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
                ray.init(address=address or None, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                         runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise NtkSelectError(f"--ray-address {address!r}: cannot connect to a Ray cluster ({str(err).splitlines()[0]}); "
                                     "start one with `ray start --head` or leave --ray-address empty for a local one") from None
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

    def map(self, task: str, jobs: Sequence[tuple[ShardSpec, list, list | None]], payload: dict,
            desc: str = "") -> Iterator[tuple[ShardSpec, np.ndarray, float]]:
        ray = self.ray
        pref = ray.put(payload)
        specs = {spec.index: spec for spec, _, _ in jobs}
        queue = list(jobs)
        inflight: dict = {}
        free = list(self.actors) * 2  # two tasks queued per actor keeps each busy
        while queue or inflight:
            while queue and free:
                actor = free.pop(0)
                spec, examples, ids = queue.pop(0)
                inflight[actor.run.remote(task, spec.index, examples, pref, ids)] = actor
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(done[0])
            free.append(actor)
            try:
                index, arr, secs = ray.get(done[0])
            except ray.exceptions.RayError as err:
                raise NtkSelectError(f"a Ray worker failed after its retries ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                                     "rerun the same command to resume from the finished shards") from None
            yield specs[index], arr, secs

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort: an actor may already be gone
                pass


def run_sharded(stage: str, task: str, examples: Sequence, specs: Sequence[ShardSpec], key: str, store: ShardStore, executor,
                payload: dict, desc: str, progress: bool = True, ids: Sequence[str] | None = None) -> list[np.ndarray]:
    """Compute every shard not already finished in ``store``; return all shards' arrays in order
    (memory-mapped from disk)."""
    todo = [s for s in specs if not store.is_done(stage, s, key)]
    if len(todo) < len(specs):
        store.skipped[stage] = store.skipped.get(stage, 0) + len(specs) - len(todo)
        store.log({"event": "resume", "stage": stage, "shards_done": len(specs) - len(todo), "shards": len(specs)})
        logger.info(f"{desc}: {len(specs) - len(todo)} of {len(specs)} shards already done, resuming")
    if todo:
        prog = Progress(f"{desc} ({len(todo)} shards, {executor.name})", sum(s.size for s in todo), enabled=progress, interval=10.0)
        jobs = [(s, list(examples[s.start : s.stop]), list(ids[s.start : s.stop]) if ids is not None else None) for s in todo]
        for spec, arr, secs in executor.map(task, jobs, payload, desc):
            if arr.shape[0] != spec.size:
                raise NtkSelectError(f"{desc}: shard {spec.index} returned {arr.shape[0]} rows for {spec.size} examples")
            toks = sum(len(e.input_ids) for e in examples[spec.start : spec.stop])
            store.save(stage, spec, key, arr, {"seconds": round(secs, 4), "examples": spec.size, "tokens": toks, "executor": executor.name})
            prog.update(spec.size, toks)
        prog.close()
    return [store.load(stage, s) for s in specs]
