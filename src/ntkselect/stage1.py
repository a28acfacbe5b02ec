"""Stage 1: coarse pre-selection by nearest-neighbour votes.

Each example is embedded as the masked mean of its final-layer hidden states (the warmed-up
model's). Each domain example votes for its K nearest candidates by cosine similarity
(exact inner-product search in FAISS over L2-normalised embeddings); the M candidates with
the most votes go to stage 2. Ties are broken by the candidate's best cosine among its voters,
then by its position in the pool, so the outcome is deterministic. If fewer than M
candidates received a vote, K is doubled until enough have one (or K covers the pool).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .batching import iter_batches, make_batches
from .grads import FusedLoraGradients
from .lm import final_hidden
from .progress import Progress
from .runtime import Runtime

__all__ = ["Stage1Result", "embed", "knn_votes", "preselect"]


@dataclass
class Stage1Result:
    selected: np.ndarray  # (M,) pool indices, best first
    votes: np.ndarray  # (n_pool,) int64
    best_sim: np.ndarray  # (n_pool,) float32, best cosine among the domain examples that voted for it (-inf: no vote)
    k_used: int
    seconds: dict = field(default_factory=dict)


@contextlib.contextmanager
def _fused(model):
    """Run each LoRA layer as one matmul with W + sBA while only forward passes run: the
    hidden states of the adapted model at the frozen model's speed (peft's separate rank-r
    branches cost about 3x the forward time on a CPU), without touching the stored weights."""
    if not any(p.requires_grad for p in model.parameters()):
        yield
        return
    with FusedLoraGradients(model):
        yield


@torch.no_grad()
def embed(model, examples: Sequence, rt: Runtime, out_path: str | Path | None = None, desc: str = "stage 1: embeddings") -> np.ndarray:
    """(n, d) float32 masked-mean final hidden states, in input order.

    With ``out_path`` the array is a disk-backed ``.npy`` memmap, so the pool's embeddings never
    have to fit in memory."""
    model.eval()
    batches = make_batches([len(e.input_ids) for e in examples], rt.batch_size, rt.max_batch_tokens)
    out = None
    prog = Progress(desc, len(examples), enabled=rt.progress)
    with _fused(model):
        for batch in iter_batches(examples, batches, rt.pad_id, rt.padding_side):
            out = _embed_batch(model, batch, rt, out, len(examples), out_path)
            prog.update(len(batch.index), batch.n_tokens)
    prog.close()
    if isinstance(out, np.memmap):
        out.flush()
    return out


def _embed_batch(model, batch, rt: Runtime, out, n: int, out_path):
    """Embed one batch into ``out`` (created on the first batch, once d is known)."""
    batch = batch.to(rt.device)
    with rt.autocast():
        h = final_hidden(model, batch)  # (B, L, d)
    m = batch.attention_mask.unsqueeze(-1).float()  # (B, L, 1)
    e = ((h.float() * m).sum(1) / m.sum(1)).cpu().numpy()  # (B, d)
    if out is None:
        shape = (n, e.shape[1])
        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=shape) if out_path else np.zeros(shape, np.float32)
    out[batch.index.numpy()] = e
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_votes(domain_emb: np.ndarray, pool_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Votes (n_pool,) and best cosine (n_pool,) when each domain example votes for its k nearest."""
    import faiss

    q, x = _normalise(domain_emb), _normalise(pool_emb)
    index = faiss.IndexFlatIP(x.shape[1])  # exact search: the vote must not depend on an approximation
    index.add(x)
    k = min(k, x.shape[0])
    sims, ids = index.search(q, k)  # (n_domain, k)
    valid = ids >= 0
    votes = np.bincount(ids[valid], minlength=x.shape[0]).astype(np.int64)
    best = np.full(x.shape[0], -np.inf, dtype=np.float32)
    np.maximum.at(best, ids[valid], sims[valid])
    return votes, best


def preselect(domain_emb: np.ndarray, pool_emb: np.ndarray, m: int, k: int) -> Stage1Result:
    """Keep the m pool candidates with the most votes (all of them when m >= pool size)."""
    t = time.perf_counter()
    n_pool = pool_emb.shape[0]
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
