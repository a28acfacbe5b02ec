"""Stage 1: coarse pre-selection by nearest-neighbour votes.

Each example is embedded as the masked mean of its final-layer hidden states (the warmed-up
model's). Each domain example votes for its K nearest candidates by cosine similarity
(exact float64 search over L2-normalised embeddings, streamed shard by shard); the M candidates with
the most votes go to stage 2. Ties are broken by the candidate's best cosine among its voters,
then by its position in the pool, so the outcome is deterministic. If fewer than M
candidates received a vote, K is doubled until enough have one (or K covers the pool).

:func:`embed_sets` is the run's stage-1 embedding: D in this process, the pool shard by shard
(the :data:`EMBED` shard task) on the run's executor, each shard kept on disk and resumable.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ntkselect.data.batching import iter_batches, make_batches
from ntkselect.errors import NtkSelectError
from ntkselect.grads.fused import FusedLoraGradients
from ntkselect.model.lm import final_hidden
from ntkselect.model.runtime import Runtime
from ntkselect.progress import Progress
from ntkselect.runs.shards import Sharding, ShardTask, register_task

__all__ = ["Stage1Result", "embed", "embed_sets", "EMBED", "EmbedPayload", "knn_search", "knn_votes", "preselect", "forward_pass"]


@dataclass
class Stage1Result:
    selected: np.ndarray  # (M,) pool indices, best first
    votes: np.ndarray  # (n_pool,) int64
    best_sim: np.ndarray  # (n_pool,) float32, best cosine among the domain examples that voted for it (-inf: no vote)
    k_used: int
    seconds: dict = field(default_factory=dict)


@contextlib.contextmanager
def fused_forward(model):
    """Run each LoRA layer as one matmul with W + sBA while only forward passes run: the
    hidden states of the adapted model at the frozen model's speed (peft's separate rank-r
    branches cost about 3x the forward time on a CPU), without touching the stored weights."""
    if not any(p.requires_grad for p in model.parameters()):
        yield
        return
    with FusedLoraGradients(model):
        yield


@torch.no_grad()
def embed(
    model, examples: Sequence, rt: Runtime, out_path: str | Path | None = None, desc: str = "stage 1: embeddings", ids: Sequence[str] | None = None
) -> np.ndarray:
    """(n, d) float32 masked-mean final hidden states, in input order.

    With ``out_path`` the array is a disk-backed ``.npy`` memmap, so the pool's embeddings never
    have to fit in memory."""
    model.eval()
    batches = make_batches([len(e.input_ids) for e in examples], rt.batch_size, rt.max_batch_tokens, fits=rt.fits("forward"))
    out = None
    prog = Progress(desc, len(examples), enabled=rt.progress)
    with fused_forward(model):
        for batch in iter_batches(examples, batches, rt.pad_id, rt.padding_side):
            out = embed_batch(model, batch, rt, out, len(examples), out_path, desc, ids)
            prog.update(len(batch.index), batch.n_tokens)
    prog.close()
    if out is None:  # no batch ran: d (the hidden size) is only known from the first one
        raise ValueError(f"{desc}: no examples to embed")
    if isinstance(out, np.memmap):
        out.flush()
    return out


def embed_batch(model, batch, rt: Runtime, out, n: int, out_path, desc: str = "stage 1: embeddings", ids: Sequence[str] | None = None):
    """Embed one batch into ``out`` (created on the first batch, once d is known)."""
    batch = batch.to(rt.device)
    with rt.autocast():
        h = final_hidden(model, batch)  # (B, L, d)
    m = batch.attention_mask.unsqueeze(-1).float()  # (B, L, 1)
    e = ((h.float() * m).sum(1) / m.sum(1)).cpu().numpy()  # (B, d)
    bad = ~np.isfinite(e).all(1)  # (B,)
    if bad.any():
        i = int(batch.index[int(np.flatnonzero(bad)[0])])
        label = f"example id {ids[i]!r}" if ids is not None else f"example #{i}"
        raise NtkSelectError(f"{desc}: {label} has a non-finite embedding (NaN or inf hidden states); check its text or use --precision float32")
    if out is None:
        shape = (n, e.shape[1])
        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=shape) if out_path else np.zeros(shape, np.float32)
    out[batch.index.numpy()] = e
    return out


def forward_pass(model, batch, rt: Runtime, tracker) -> None:
    """Stage 1's pass on one batch, with ``tracker`` (a :class:`~ntkselect.model.memory.LiveBytes`)
    around it: the "forward" kind of :func:`~ntkselect.model.memory.measure_costs`."""
    with torch.no_grad(), fused_forward(model), tracker:
        embed_batch(model, batch, rt, None, len(batch.index), None)


@dataclass
class EmbedPayload:
    """The :data:`EMBED` task needs nothing but the examples."""


def _embed_shard(model, examples, rt, payload: EmbedPayload, ids=None, desc="stage 1: embeddings") -> np.ndarray:
    return embed(model, examples, rt, ids=ids, desc=desc)  # (n, d) float32


#: the shard task of the pool's embeddings
EMBED = register_task(ShardTask("embed", _embed_shard, EmbedPayload))


def embed_sets(
    model, domain: Sequence, pool: Sequence, rt: Runtime, sharding: Sharding, domain_ids: Sequence[str] | None = None, pool_ids: Sequence[str] | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(n_domain, d) and the pool's (rows, d) float32 shards (memory-mapped): D embedded here,
    the pool shard by shard on ``sharding``'s executor, finished shards reused."""
    dom = embed(model, domain, rt, desc="stage 1: domain embeddings", ids=domain_ids)
    pool_emb = sharding.run("stage1", EMBED, pool, EmbedPayload(), "stage 1: pool embeddings", pool_ids, "embed")
    return dom, pool_emb


def normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def as_shards(pool_emb) -> list[np.ndarray]:
    return list(pool_emb) if isinstance(pool_emb, (list, tuple)) else [pool_emb]


def knn_search(queries: np.ndarray, pool_emb, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest candidates by cosine: (n_q, k') float64 cosines, best first, and
    their (n_q, k') int64 pool indices, k' = min(k, n_pool).

    ``pool_emb`` is one (n_pool, d) array or an iterable of shards (memmaps) in pool order, read
    once; the search is exact (float64 cosines of L2-normalised rows) and streams one shard at a
    time, keeping a running top-k per query, so the pool never has to fit in memory and the
    result does not depend on how the pool is sharded. Equal cosines go to the earlier pool position."""
    q = normalise_rows(queries)  # (n_q, d)
    top_s = np.full((len(q), 0), -np.inf)  # (n_q, <=k) running best cosines
    top_i = np.zeros((len(q), 0), dtype=np.int64)  # (n_q, <=k) their pool indices
    start = 0
    for shard in [pool_emb] if isinstance(pool_emb, np.ndarray) else pool_emb:
        x = normalise_rows(np.asarray(shard))  # (s, d)
        sims = q @ x.T  # (n_q, s) float64
        ids = np.broadcast_to(np.arange(start, start + len(x), dtype=np.int64), sims.shape)
        cat_s, cat_i = np.concatenate([top_s, sims], 1), np.concatenate([top_i, ids], 1)
        order = np.lexsort((cat_i, -cat_s), axis=-1)[:, :k]  # best cosine first, then earliest position
        top_s, top_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
        start += len(x)
    return top_s, top_i


def knn_votes(domain_emb: np.ndarray, pool_emb, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Votes (n_pool,) and best cosine (n_pool,) when each domain example votes for its k nearest.

    ``pool_emb`` is one (n_pool, d) array or a list of shards (memmaps) in pool order; the
    search is :func:`knn_search` (exact, streamed, independent of the sharding)."""
    shards = as_shards(pool_emb)
    n_pool = sum(len(s) for s in shards)
    top_s, top_i = knn_search(domain_emb, shards, min(k, n_pool))
    votes = np.bincount(top_i.ravel(), minlength=n_pool).astype(np.int64)
    best = np.full(n_pool, -np.inf, dtype=np.float32)
    np.maximum.at(best, top_i.ravel(), top_s.ravel().astype(np.float32))
    return votes, best


def preselect(domain_emb: np.ndarray, pool_emb, m: int, k: int) -> Stage1Result:
    """Keep the m pool candidates with the most votes (all of them when m >= pool size).
    ``pool_emb``: one array or a list of shards, as for :func:`knn_votes`."""
    t = time.perf_counter()
    n_pool = sum(len(s) for s in as_shards(pool_emb))
    m = min(m, n_pool)
    k = min(k, n_pool)
    while True:
        votes, best = knn_votes(domain_emb, pool_emb, k)
        if int((votes > 0).sum()) >= m or k >= n_pool:
            break
        k = min(2 * k, n_pool)
    # most votes first, then highest best cosine, then earliest in the pool
    order = np.lexsort((np.arange(n_pool), -best.astype(np.float64), -votes))
    return Stage1Result(selected=order[:m], votes=votes, best_sim=best, k_used=k, seconds={"knn": time.perf_counter() - t})
