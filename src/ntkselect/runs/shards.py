"""Sharded, resumable work: shard plans, the store of finished shards, shard tasks.

The pool is split into shards (contiguous ranges of records). Each shard's result (stage-1
embeddings, stage-2 scores, LESS features) is written to its own ``.npy`` under the run's
``work/`` folder, atomically (temporary file, then rename), followed by a small ``.done``
marker that names what the result was computed from. A rerun after a crash, ``kill -9``
included, trusts a shard only if its marker exists and matches; the rest are recomputed,
and since every shard is computed the same way the outcome equals an uninterrupted run.

A :class:`ShardTask` (:mod:`ntkselect.runs.tasks`) is what runs on one shard: a function of
(model, examples, runtime, payload) with a typed payload (a dataclass), registered under a name
by the module that owns it (stage 1's embeddings, stage 2's scores, LESS's features). Executors
(:mod:`ntkselect.runs.executors`: in this process or on a Ray cluster) run a list of shard jobs
and yield each result as it finishes; :func:`run_sharded` writes it. :class:`Sharding` is
what a run hands its stages: the store, the executor, the run's key and the shard size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ntkselect.data.pool import lengths_of
from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_open, atomic_write_json
from ntkselect.progress import Progress
from ntkselect.runs.executors.base import Executor
from ntkselect.runs.tasks import ShardSpec, ShardTask, get_task, plan_shards, register_task, task_names

# ShardSpec, plan_shards and the shard tasks live in ntkselect.runs.tasks (below the executors, which
# run them); they are named here too, where the stages that register tasks have always found them
__all__ = ["ShardSpec", "plan_shards", "ShardStore", "ShardTask", "register_task", "get_task", "task_names", "Sharding", "run_sharded", "digest"]

logger = logging.getLogger(__name__)


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


@dataclass
class Sharding:
    """Where a run's sharded work goes: ``store`` keeps the finished shards, ``executor()``
    (called when a stage needs it, so a Ray cluster starts only then) runs the missing ones,
    ``key`` names what the run is computed from, ``shard_size`` cuts the examples."""

    store: ShardStore
    executor: Callable[[], Executor]
    key: str
    shard_size: int
    progress: bool = True

    def run(self, stage: str, task: ShardTask, examples: Sequence, payload, desc: str, ids: Sequence[str] | None, *key_parts: Any) -> list[np.ndarray]:
        """:func:`run_sharded` of ``task`` over ``examples``; a shard is trusted only if it was
        computed under ``digest(key, *key_parts)``."""
        return run_sharded(
            stage,
            task,
            examples,
            plan_shards(len(examples), self.shard_size),
            digest(self.key, *key_parts),
            self.store,
            self.executor(),
            payload,
            desc,
            self.progress,
            ids=ids,
        )


def run_sharded(
    stage: str,
    task: ShardTask,
    examples: Sequence,
    specs: Sequence[ShardSpec],
    key: str,
    store: ShardStore,
    executor: Executor,
    payload,
    desc: str,
    progress: bool = True,
    ids: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Compute every shard not already finished in ``store``; return all shards' arrays in order
    (memory-mapped from disk)."""
    todo = [s for s in specs if not store.is_done(stage, s, key)]
    if len(todo) < len(specs):
        store.skipped[stage] = store.skipped.get(stage, 0) + len(specs) - len(todo)
        store.log({"event": "resume", "stage": stage, "shards_done": len(specs) - len(todo), "shards": len(specs)})
        logger.info(f"{desc}: {len(specs) - len(todo)} of {len(specs)} shards already done, resuming")
    if todo:
        prog = Progress(f"{desc} ({len(todo)} shards, {executor.name})", sum(s.size for s in todo), enabled=progress, interval=10.0)
        # one shard's examples at a time (read back from the token store when the pool is one), never the whole pool
        jobs = ((s, list(examples[s.start : s.stop]), list(ids[s.start : s.stop]) if ids is not None else None) for s in todo)
        lengths = lengths_of(examples)
        for spec, arr, secs in executor.map(task, jobs, payload, desc):
            if arr.shape[0] != spec.size:
                raise NtkSelectError(f"{desc}: shard {spec.index} returned {arr.shape[0]} rows for {spec.size} examples")
            toks = int(lengths[spec.start : spec.stop].sum())
            store.save(stage, spec, key, arr, {"seconds": round(secs, 4), "examples": spec.size, "tokens": toks, "executor": executor.name})
            prog.update(spec.size, toks)
        prog.close()
    return [store.load(stage, s) for s in specs]
