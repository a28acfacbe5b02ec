"""Shard jobs: the pool's shards (:class:`ShardSpec`) and what runs on one (:class:`ShardTask`).

A :class:`ShardTask` is a function of (model, examples, runtime, payload) with a typed payload
(a dataclass), registered under a name by the module that owns it (stage 1's embeddings, stage
2's scores, LESS's features), so a Ray worker finds it by name. The executors
(:mod:`ntkselect.runs.executors`) run shard jobs; :mod:`ntkselect.runs.shards` plans them, keeps
the finished ones and hands the rest to an executor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ShardSpec", "plan_shards", "ShardTask", "register_task", "get_task", "task_names"]


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


@dataclass
class ShardTask:
    """What runs on one shard: ``fn(model, examples, rt, payload, ids, desc) -> array`` whose
    first axis is the shard's examples, with ``payload`` an instance of the dataclass
    ``payload``. ``fn`` must be a module-level function (a Ray worker imports it by name)."""

    name: str
    fn: Callable[..., Any]
    payload: type

    def __call__(self, model, examples, rt, payload, ids=None, desc: str | None = None):
        if not isinstance(payload, self.payload):
            raise TypeError(f"shard task {self.name!r} takes a {self.payload.__name__} payload, not {type(payload).__name__}")
        if desc is None:  # the task's own default label
            return self.fn(model, examples, rt, payload, ids)
        return self.fn(model, examples, rt, payload, ids, desc)


_TASKS: dict[str, ShardTask] = {}


def register_task(task: ShardTask) -> ShardTask:
    """Make ``task`` known by its name (:func:`get_task`); returns it."""
    old = _TASKS.get(task.name)
    if old is not None and (old.fn.__module__, old.fn.__qualname__) != (task.fn.__module__, task.fn.__qualname__):
        raise ValueError(f"a shard task named {task.name!r} is already registered ({old.fn.__module__}.{old.fn.__qualname__})")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> ShardTask:
    if name not in _TASKS:
        raise KeyError(f"no shard task {name!r}; registered: {', '.join(_TASKS)}")
    return _TASKS[name]


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)
