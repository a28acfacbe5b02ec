"""Stage 1: coarse pre-selection by nearest-neighbour votes.

Each example is embedded as the masked mean of its final-layer hidden states (the warmed-up
model's). Each domain example votes for its K nearest candidates by cosine similarity
(an exact search over L2-normalised embeddings in float32 on the run's device, each pool
shard read once, a piece at a time); the M candidates with
the most votes go to stage 2. Ties are broken by the candidate's best cosine among its voters,
then by its position in the pool, so the outcome is deterministic. If fewer than M
candidates received a vote, K is doubled until enough have one (or K covers the pool).

On a homogeneous domain the K nearest of every domain example coincide and the count orders
nothing: every kept candidate has |D| votes and the tie-break decides. :func:`vote_degeneracy`
measures that (for the manifest), and ``preselect(..., weight=...)`` offers votes that still
order such a shortlist (:data:`VOTE_WEIGHTS`): ``rank`` (Borda: a domain example's r-th nearest,
r = 0..K-1, gets (K - r) / K) and ``similarity`` (its cosine). ``count`` (1 per vote) is ntk's.

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

from ntkselect.data.batching import collate, make_batches
from ntkselect.errors import NtkSelectError
from ntkselect.grads.fused import FusedLoraGradients
from ntkselect.model.lm import final_hidden
from ntkselect.model.runtime import Runtime, run_batches
from ntkselect.progress import Progress
from ntkselect.runs.shards import Sharding, ShardTask, register_task

__all__ = [
    "Stage1Result",
    "embed",
    "embed_sets",
    "EMBED",
    "EmbedPayload",
    "knn_search",
    "knn_votes",
    "preselect",
    "SEARCH_BUDGET",
    "VOTE_WEIGHTS",
    "vote_degeneracy",
    "forward_pass",
]

#: entries of one piece's cosine matrix (queries x pool rows, float32, plus the running top-k and
#: a sort's workspace: a few x 4-8 bytes each): pieces stay ~100-300 MiB on any device
SEARCH_BUDGET = 1 << 24

#: how a domain example's vote for its r-th nearest candidate counts (``count`` is ntk's)
VOTE_WEIGHTS = ("count", "rank", "similarity")


@dataclass
class Stage1Result:
    selected: np.ndarray  # (M,) pool indices, best first
    votes: np.ndarray  # (n_pool,) int64
    best_sim: np.ndarray  # (n_pool,) float32, best cosine among the domain examples that voted for it (-inf: no vote)
    k_used: int
    seconds: dict = field(default_factory=dict)
    weight: np.ndarray | None = None  # (n_pool,) float64 summed vote weights (rank / similarity votes); None for the count
    vote: str = "count"  # which of VOTE_WEIGHTS ordered the candidates


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

    def one(idx: list[int]) -> None:  # one batch; an out-of-memory error splits it (run_batches)
        nonlocal out
        batch = collate([examples[i] for i in idx], idx, rt.pad_id, rt.padding_side)
        out = embed_batch(model, batch, rt, out, len(examples), out_path, desc, ids)
        prog.update(len(batch.index), batch.n_tokens)

    with fused_forward(model):
        run_batches(batches, one, rt.device, desc, _labeller(ids))
    prog.close()
    if out is None:  # no batch ran: d (the hidden size) is only known from the first one
        raise ValueError(f"{desc}: no examples to embed")
    if isinstance(out, np.memmap):
        out.flush()
    return out


def _labeller(ids: Sequence[str] | None):
    return lambda i: f"example id {ids[i]!r}" if ids is not None else f"example #{i}"


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


def unit_rows(x: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """(n, d) float32 on ``device``: the rows L2-normalised (in float64, then rounded once)."""
    return torch.from_numpy(normalise_rows(x).astype(np.float32)).to(device)


def search(queries: np.ndarray, pool_emb, k: int, device: str | torch.device = "cpu", best: bool = False):
    """:func:`knn_search`, and with ``best`` also each candidate's best cosine to any query
    ((n_pool,) float32, from the same cosines: no second read of the pool)."""
    q = unit_rows(queries, device)  # (n_q, d)
    n_q = len(q)
    top_s = torch.full((n_q, 0), -torch.inf, device=q.device)  # (n_q, <=k) running best cosines
    top_i = torch.zeros((n_q, 0), dtype=torch.int64, device=q.device)  # (n_q, <=k) their pool indices, ties in pool order
    piece = max(1, k, SEARCH_BUDGET // max(1, n_q))  # pool rows per piece: >= k, so sorting stays linear in the pool
    q_rows = max(1, SEARCH_BUDGET // (k + piece))  # queries per sort
    nearest = []
    start = 0
    for shard in as_shards(pool_emb):
        for a in range(0, len(shard), piece):
            x = unit_rows(np.asarray(shard[a : a + piece]), q.device)  # (s, d): read once
            ids = torch.arange(start + a, start + a + len(x), device=q.device)  # (s,)
            sims = q @ x.T  # (n_q, s) float32
            if best:
                nearest.append(sims.max(0).values.cpu())
            new_s, new_i = [], []
            for b in range(0, n_q, q_rows):
                cat_s = torch.cat([top_s[b : b + q_rows], sims[b : b + q_rows]], 1)  # (r, <=k + s): earlier pool positions first
                cat_i = torch.cat([top_i[b : b + q_rows], ids.expand(len(cat_s), -1)], 1)
                val, pos = torch.sort(cat_s, dim=1, descending=True, stable=True)  # equal cosines keep pool order
                new_s.append(val[:, :k])
                new_i.append(torch.gather(cat_i, 1, pos[:, :k]))
            top_s, top_i = torch.cat(new_s), torch.cat(new_i)
        start += len(shard)
    out = (top_s.double().cpu().numpy(), top_i.cpu().numpy())
    return (*out, torch.cat(nearest).numpy()) if best else out


def knn_search(queries: np.ndarray, pool_emb, k: int, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest candidates by cosine: (n_q, k') cosines (float32 values, as
    float64), best first, and their (n_q, k') int64 pool indices, k' = min(k, n_pool).

    ``pool_emb`` is one (n_pool, d) array or an iterable of shards (memmaps) in pool order, each
    read once, a piece of at most :data:`SEARCH_BUDGET` cosines at a time, onto ``device``; the
    search is exact (float32 cosines of L2-normalised rows, no index, no approximation) and keeps
    a running top-k per query, so the pool never has to fit in memory and the result does not
    depend on how the pool is sharded (up to the last bit of a float32 cosine, which a matmul
    may round differently for another shape of piece). Equal cosines go to the earlier pool position. Time is
    linear in the pool: n_q x n_pool cosines, one sort of k + piece entries per query and piece."""
    return search(queries, pool_emb, k, device)


def knn_votes(domain_emb: np.ndarray, pool_emb, k: int, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Votes (n_pool,) and best cosine (n_pool,) when each domain example votes for its k nearest.

    ``pool_emb`` is one (n_pool, d) array or a list of shards (memmaps) in pool order; the
    search is :func:`knn_search` on ``device`` (exact, streamed, independent of the sharding)."""
    votes, best, _ = _tally(domain_emb, pool_emb, k, "count", device)
    return votes, best


def _tally(domain_emb: np.ndarray, pool_emb, k: int, weight: str, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(votes, best cosine, summed weights or None for ``count``), each (n_pool,), from one search on ``device``."""
    shards = as_shards(pool_emb)
    n_pool = sum(len(s) for s in shards)
    top_s, top_i = knn_search(domain_emb, shards, min(k, n_pool), device)  # (n_q, k') each, nearest first
    votes = np.bincount(top_i.ravel(), minlength=n_pool).astype(np.int64)
    best = np.full(n_pool, -np.inf, dtype=np.float32)
    np.maximum.at(best, top_i.ravel(), top_s.ravel().astype(np.float32))
    if weight == "count":
        return votes, best, None
    if weight == "rank":
        kk = top_i.shape[1]
        w = np.broadcast_to((kk - np.arange(kk, dtype=np.float64)) / kk, top_i.shape)  # (n_q, k') the r-th nearest: (K - r) / K
    elif weight == "similarity":
        w = top_s  # (n_q, k') its cosine
    else:
        raise ValueError(f"vote weight {weight!r}: use one of {', '.join(VOTE_WEIGHTS)}")
    return votes, best, np.bincount(top_i.ravel(), weights=np.ravel(w), minlength=n_pool)


def preselect(domain_emb: np.ndarray, pool_emb, m: int, k: int, device: str | torch.device = "cpu", weight: str = "count") -> Stage1Result:
    """Keep the m pool candidates with the most votes (all of them when m >= pool size).
    ``pool_emb``: one array or a list of shards, as for :func:`knn_votes`; the search runs on ``device``.

    ``weight`` (:data:`VOTE_WEIGHTS`): ``count`` orders by votes, then best cosine (ntk's);
    ``rank`` and ``similarity`` order the candidates with a vote by their summed vote weight,
    then best cosine, then pool position, and those without one after them. K is raised the same
    way for every weight (until m candidates have a vote), so they keep the same candidates
    whenever fewer than m have a vote and differ only in which of them come first."""
    t = time.perf_counter()
    n_pool = sum(len(s) for s in as_shards(pool_emb))
    m = min(m, n_pool)
    k = min(k, n_pool)
    while True:
        votes, best, w = _tally(domain_emb, pool_emb, k, weight, device)
        if int((votes > 0).sum()) >= m or k >= n_pool:
            break
        k = min(2 * k, n_pool)
    if w is None:  # most votes first, then highest best cosine, then earliest in the pool
        order = np.lexsort((np.arange(n_pool), -best.astype(np.float64), -votes))
    else:  # voted first, by summed weight, then highest best cosine, then earliest in the pool
        order = np.lexsort((np.arange(n_pool), -best.astype(np.float64), -w, votes == 0))
    return Stage1Result(selected=order[:m], votes=votes, best_sim=best, k_used=k, seconds={"knn": time.perf_counter() - t}, weight=w, vote=weight)


def vote_degeneracy(s1: Stage1Result) -> dict:
    """How much the vote ordered the kept candidates (for the manifest): the largest vote count,
    the share of the kept candidates that have it, and how many distinct counts there are among
    the kept and among all voted candidates (1 distinct count among the kept: the count ordered
    nothing, the tie-break chose); for a weighted vote also the distinct summed weights among the kept."""
    kept = s1.votes[s1.selected]  # (M,)
    top = int(s1.votes.max()) if len(s1.votes) else 0
    out = {
        "vote": s1.vote,
        "max_votes": top,
        "kept_at_max_votes": float((kept == top).mean()) if len(kept) else 0.0,
        "distinct_vote_counts_kept": int(len(np.unique(kept))),
        "distinct_vote_counts": int(len(np.unique(s1.votes[s1.votes > 0]))),
    }
    if s1.weight is not None:
        out["distinct_vote_weights_kept"] = int(len(np.unique(s1.weight[s1.selected])))
    return out
