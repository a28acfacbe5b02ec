"""Executors: where shard jobs run (:class:`Executor`; :class:`LocalExecutor`, :class:`RayExecutor`).

:func:`make_executor` is the one place that picks one for ``--executor``. Ray is imported only
when a :class:`RayExecutor` is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ntkselect.runs.executors.base import Executor, Job
from ntkselect.runs.executors.local import LocalExecutor
from ntkselect.runs.executors.ray import RayExecutor, worker_spec

__all__ = ["Executor", "Job", "LocalExecutor", "RayExecutor", "make_executor"]


def make_executor(
    kind: str, model_fn: Callable[[], Any], rt, *, model_name: str = "", lora: dict | None = None, address: str = "", workers: int = 0, log=None
) -> Executor:
    """``local``: shards in this process with ``model_fn()``'s model. ``ray``: actors that
    rebuild that model from ``model_name``, the LoRA options ``lora`` and its adapter's weights.
    The Ray executor's message goes to ``log`` (default: its module's logger, at INFO)."""
    if kind == "ray":
        return RayExecutor(worker_spec(model_fn(), model_name, lora or {}, rt), address or None, workers, log=log, device=rt.device)
    return LocalExecutor(model_fn, rt)
