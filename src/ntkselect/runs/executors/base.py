"""The executor interface: run a list of shard jobs, yield each result as it finishes.

The driver (:func:`ntkselect.runs.shards.run_sharded`) writes every result it gets and skips
the shards already finished, so an executor only computes; it never touches the run folder.
Implementations: :class:`~ntkselect.runs.executors.local.LocalExecutor` (this process) and
:class:`~ntkselect.runs.executors.ray.RayExecutor` (actors on a Ray cluster).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

import numpy as np

from ntkselect.runs.tasks import ShardSpec, ShardTask

__all__ = ["Executor", "Job"]

#: one shard job: the shard, its examples and their ids (for error messages)
Job = tuple[ShardSpec, list, "list | None"]


class Executor(ABC):
    """Runs shard jobs; a context manager that :meth:`close` s on exit."""

    name: str = ""

    @abstractmethod
    def map(self, task: ShardTask, jobs: Iterable[Job], payload, desc: str = "") -> Iterator[tuple[ShardSpec, np.ndarray, float]]:
        """Run ``task`` with ``payload`` on every job; yield (shard, result, seconds) in any order."""

    def close(self) -> None:  # noqa: B027 - a default, not abstract: an executor that holds nothing (LocalExecutor) need not override it
        """Release what the executor holds (workers, a cluster connection); by default nothing."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
