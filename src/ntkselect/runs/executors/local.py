"""Shard jobs one after another in this process, with the model it already has."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ntkselect.runs.executors.base import Executor, Job
from ntkselect.runs.tasks import ShardSpec, ShardTask

__all__ = ["LocalExecutor"]


class LocalExecutor(Executor):
    """Runs shard jobs one after another in this process."""

    name = "local"

    def __init__(self, model_fn: Callable[[], Any], rt):
        self.model_fn, self.rt = model_fn, rt

    def map(self, task: ShardTask, jobs: Iterable[Job], payload, desc: str = "") -> Iterator[tuple[ShardSpec, np.ndarray, float]]:
        model = self.model_fn()
        for spec, examples, ids in jobs:
            t = time.perf_counter()
            # within a shard the task's own progress line runs (a shard can take minutes)
            arr = task(model, examples, self.rt, payload, ids, f"{desc} [shard {spec.index + 1}]")
            yield spec, np.asarray(arr), time.perf_counter() - t
