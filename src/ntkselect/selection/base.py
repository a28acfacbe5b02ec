"""What every selector shares: its output (:class:`Ranking`), its interface (:class:`Selector`)
and its inputs (:class:`SelectionContext`).

Every selector takes the same inputs (the domain set D, the pool C, the tokenized examples,
the run options) and returns the same output (pool indices best first, with their scores),
so ``ntkselect select --method X`` writes the same files for every X and ``ntkselect
evaluate`` compares them on equal terms.

The context does the expensive shared work lazily and once, through the stage functions that
own it: the warm-up LoRA fine-tune on D (:func:`~ntkselect.training.warmup.warmup_or_resume`)
and the stage-1 embeddings (:func:`~ntkselect.selection.ntk.stage1.embed_sets`). Each selector
reports the shared parts it used, so its cost (wall time and tokens processed) counts them as
if it had run alone. The context itself only caches and wires: the store, the executor, the
run's key.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ntkselect.config import SelectConfig
from ntkselect.data.pool import ids_of, lengths_of
from ntkselect.data.records import Record
from ntkselect.model.loading import load_model
from ntkselect.model.runtime import Runtime
from ntkselect.runs.executors import Executor, make_executor
from ntkselect.runs.setup import RunSetup
from ntkselect.runs.shards import Sharding, ShardStore, ShardTask, digest
from ntkselect.selection.ntk.stage1 import embed_sets
from ntkselect.training.warmup import WarmupOptions, add_lora, warmup_or_resume

__all__ = ["Ranking", "Selector", "SelectionContext", "ordered"]

logger = logging.getLogger(__name__)


@dataclass
class Ranking:
    """A selector's output: pool indices best first (at least N of them) and their scores."""

    order: np.ndarray  # (K,) int64 pool indices, best first, K >= N
    scores: np.ndarray  # (K,) float64, the score of order[j]
    columns: dict = field(default_factory=dict)  # extra per-candidate columns for scores.jsonl, aligned with order
    info: dict = field(default_factory=dict)  # for the manifest
    seconds: float = 0.0  # this selector's own work
    tokens: int = 0  # tokens this selector's own work processed
    shared: tuple[str, ...] = ()  # shared context work it relies on ("warmup", "embeddings")
    timings: dict = field(default_factory=dict)  # per-stage seconds for the manifest (default: {"select": seconds})


def ordered(idx: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by score descending, then by pool position: deterministic under ties."""
    idx = np.asarray(idx, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    o = np.lexsort((idx, -scores))
    return idx[o], scores[o]


class Selector(ABC):
    """A data selection method. Subclass it, implement :meth:`rank`, and register the class
    with :func:`~ntkselect.selection.registry.register_selector`, which sets the class
    attributes below from the registration."""

    name: ClassVar[str] = ""
    uses_model: ClassVar[bool] = False  # needs the warmed-up model (and so writes adapter/)
    uses_embeddings: ClassVar[bool] = False  # needs stage 1's embeddings (implies uses_model)

    @abstractmethod
    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        """Rank the pool ``ctx.pool`` for the domain ``ctx.domain``: at least ``n`` distinct
        pool indices, best first."""


class SelectionContext:
    """Inputs of a selection plus the shared, lazily computed work (warm-up, embeddings).

    With a ``work_dir`` every expensive piece is kept on disk with a completion marker: the
    warm-up adapter and its optimizer moments, each shard of pool embeddings, stage-2 scores
    and LESS features (:mod:`ntkselect.runs.shards`). ``key`` names what the run is computed from
    (configuration, input and model hashes); a marker with another key is never trusted, so a
    rerun resumes exactly where a crash stopped and cannot mix results of different runs."""

    def __init__(
        self,
        cfg: SelectConfig,
        domain: Sequence[Record],
        pool: Sequence[Record],
        dom_ex: Sequence,
        pool_ex: Sequence,
        rt: Runtime,
        log=None,
        work_dir: str | None = None,
        key: str = "",
        log_path: str | None = None,
        setup: RunSetup | None = None,
    ):
        self.cfg, self.domain, self.pool, self.dom_ex, self.pool_ex, self.rt, self.log = cfg, domain, pool, dom_ex, pool_ex, rt, log or logger.info
        self.work_dir = work_dir
        self.setup = setup or RunSetup.of(cfg)  # the run's resolved model folder (and device, precision)
        self.key = key or digest(cfg.to_dict())
        self.store = ShardStore(Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="ntkselect-")), log_path)
        self._model = None
        self._fresh = None  # a checked fresh model to use instead of loading one (adopt)
        self._adam: dict | None = None
        self._emb: tuple[np.ndarray, list[np.ndarray]] | None = None
        self._executor: Executor | None = None
        self.warmup_summary: dict | None = None
        self.shared_seconds: dict[str, float] = {}
        self.shared_tokens: dict[str, int] = {}
        self.resumed: dict[str, bool] = {}

    @property
    def has_model(self) -> bool:
        return self._model is not None

    def adopt(self, checked) -> None:
        """Use the preflight's model (the base model with this run's fresh adapter) instead of
        loading it again, and its measured memory costs for the batches (:mod:`ntkselect.model.memory`)."""
        if checked is None:
            return
        self._fresh = checked.model
        self.rt.memory = checked.memory

    def lora_options(self) -> WarmupOptions:
        cfg = self.cfg
        return WarmupOptions(
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules(),
            epochs=cfg.warmup_epochs,
            lr=cfg.warmup_lr,
            batch_size=cfg.warmup_batch_size,
            seed=cfg.seed,
        )

    def model(self):
        """The model with the warmed-up LoRA adapter (trained on D once, kept on disk, reused)."""
        if self._model is None:
            cfg, t = self.cfg, time.perf_counter()
            fresh, self._fresh = self._fresh, None
            model = fresh if fresh is not None else add_lora(load_model(self.setup.model_path, self.rt.model_dtype, self.rt.device), self.lora_options())
            done = warmup_or_resume(
                model,
                self.dom_ex,
                self.lora_options(),
                self.rt,
                self.store.root / "warmup",
                self.key,
                log=self.log,
                on_done=lambda s: self.store.log({"event": "warmup_done", "seconds": round(s.get("seconds", 0.0), 3)}),
            )
            self._adam, self.warmup_summary = done.adam, done.summary
            if done.resumed:
                self.resumed["warmup"] = True
            self._model = model
            self.shared_seconds["warmup"] = (self.warmup_summary or {}).get("seconds", 0.0) if done.resumed else time.perf_counter() - t
            steps = self.warmup_summary["steps"] * cfg.warmup_batch_size
            self.shared_tokens["warmup"] = int(round(sum(len(e.input_ids) for e in self.dom_ex) * steps / max(1, len(self.dom_ex))))
        return self._model

    def adam_state(self) -> dict:
        self.model()
        return self._adam or {}

    def executor(self) -> Executor:
        """Where shards run (``--executor``): this process, or Ray actors that rebuild the warmed-up model."""
        if self._executor is None:
            self._executor = make_executor(
                self.cfg.executor,
                self.model,
                self.rt,
                model_name=self.cfg.model,  # as given: each Ray node resolves it where it runs
                lora=dataclasses.asdict(self.lora_options()),
                address=self.cfg.ray_address,
                workers=self.cfg.ray_workers,
                log=self.log,
            )
        return self._executor

    def sharding(self) -> Sharding:
        """The run's store, executor, key and shard size, for the stage functions."""
        return Sharding(self.store, self.executor, self.key, self.cfg.shard_size, self.rt.progress)

    def run_sharded(
        self, stage: str, task: ShardTask, examples: Sequence, payload: Any, desc: str, ids: Sequence[str] | None, *key_parts: Any
    ) -> list[np.ndarray]:
        """``task`` over ``examples`` shard by shard on the run's executor (see :class:`~ntkselect.runs.shards.Sharding`)."""
        return self.sharding().run(stage, task, examples, payload, desc, ids, *key_parts)

    def embeddings(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(n_domain, d) and the pool's (rows, d) float32 shards: stage-1 embeddings of the warmed-up model."""
        if self._emb is None:
            model = self.model()
            t = time.perf_counter()
            self._emb = embed_sets(model, self.dom_ex, self.pool_ex, self.rt, self.sharding(), [r.id for r in self.domain], ids_of(self.pool))
            self.shared_seconds["embeddings"] = time.perf_counter() - t
            self.shared_tokens["embeddings"] = int(lengths_of(self.dom_ex).sum() + lengths_of(self.pool_ex).sum())
        return self._emb

    def cost(self, ranking: Ranking) -> tuple[float, int]:
        """(seconds, tokens) of a selection run alone: its own work plus the shared parts it used."""
        secs = ranking.seconds + sum(self.shared_seconds.get(k, 0.0) for k in ranking.shared)
        toks = ranking.tokens + sum(self.shared_tokens.get(k, 0) for k in ranking.shared)
        return secs, toks

    def release(self) -> None:
        if self._executor is not None:
            self._executor.close()
        self._executor = None
        self._model = None
        self._fresh = None
        self._adam = None
        self._emb = None
