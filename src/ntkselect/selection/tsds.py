"""TSDS (Liu, Karbasi & Rekatsinas, NeurIPS 2024, "TSDS: Data Selection for Task-Specific Model
Finetuning") on stage 1's embeddings: the KNN-KDE algorithm of the authors' code.

TSDS assigns the pool a probability p that trades the optimal-transport cost of moving the
uniform distribution over the M domain examples (queries) onto p (weight ``alpha / C``)
against a diversity regulariser whose kernel density estimate ρ penalises near-duplicates
(weight ``1 - alpha``). Its optimum has a closed form on each query's K nearest candidates,
computed here exactly as the authors' ``tsds.py`` does, step for step:

1. **Embeddings and distance.** Rows are L2-normalised and compared by Euclidean distance
   d(q, x) = ||q - x|| (for unit vectors the same order as cosine: d² = 2 - 2 cos).
2. **Caps.** K = min(max_k, n_pool // 10) neighbours per query for the transport,
   k_kde = min(kde_k, n_pool // 10) for the KDE (the original's ``max_K`` 5000, ``kde_K`` 1000).
3. **Neighbourhoods.** n_j0, ..., n_j,K-1: the K nearest candidates of query j, nearest first,
   at distances d_j0 <= ... <= d_j,K-1. U = the union of all of them.
4. **KDE** over U only (the original indexes just those candidates): for x in U,
   ρ(x) = Σ_{y in the k_kde nearest members of U to x} max(0, 1 - ||x - y||² / σ²); x itself is one
   of them, so ρ >= 1. σ = 0 sets ρ = 1 (no duplicate penalty).
5. **Transport level s.** With w_jk = 1 / ρ(n_jk), S_jk = Σ_{k' <= k} w_jk' and
   W_jk = Σ_{k' <= k} d_jk' w_jk', each breakpoint (j, k), k <= K - 2, has the cost
   c_jk = d_j,k+1 S_jk - W_jk. The breakpoints are swept in increasing S_jk (ties: k, then j: the
   original's heap order) keeping T = Σ_j c_j,k_j over each query's latest swept breakpoint k_j;
   s is the first S_jk at which alpha / C * T >= (1 - alpha) M, or the last one if that never happens.
6. **Probabilities.** Query j gives its neighbour k
       p_jk = clip(1/M - S_j,k-1 / (M s), 0, w_jk / (M s))      for k <= K - 2   (S_j,-1 = 0)
       p_j,K-1 = max(0, 1/M - S_j,K-2 / (M s))
   i.e. w_jk / (M s) to every neighbour whose breakpoint is at most s and the rest of its 1/M to
   the next one. A candidate's probability is the sum over the queries that reach it; Σ p = 1.

Differences from the original, all deliberate: the search is exact (float32 cosines on the run's
device, each pool shard read once) where the original uses an approximate FAISS ``IndexIVFFlat``
(nlist = sqrt(n)/2, nprobe 10); the KDE's kernel values are float32 on the device too (the
transport, steps 5-6, is float64 on the host: it is O(M K)); K is at least 2 and k_kde at least 1 on tiny pools (the original needs K >= 2 and
fails there); a query whose nearest neighbour alone exceeds its share at level s (S_j0 > s,
possible when alpha / C is large) gives that neighbour its whole 1/M, the limit of the formula
above, where the original stops on an assertion; and embeddings are unit-normalised (the
original uses the embeddings it is given and asks for C "in the same scale as the norm of the
embeddings"; on unit vectors its defaults C = 5 and σ = 0.75 mean the same for every model,
whatever the scale of its hidden states).

The original then draws N examples *with replacement* from p (``np.random.multinomial``).
:func:`draw_order` instead ranks the whole pool: candidates with p > 0 in the order of a seeded
sample *without replacement* proportional to p (Efraimidis–Spirakis keys), then those with p = 0
by their best cosine to the domain, so the first N are always N distinct examples.

:class:`TsdsSelector` (at the end) makes this ``--method tsds``: one class and one registration,
the worked example of ``docs/ADDING_A_SELECTOR.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ntkselect.selection.base import Ranking, SelectionContext, Selector
from ntkselect.selection.ntk.stage1 import SEARCH_BUDGET, as_shards, search, unit_rows
from ntkselect.selection.registry import register_selector

__all__ = ["TsdsResult", "neighbour_caps", "neighbours", "kde", "transport", "tsds", "best_cosine", "draw_order", "TsdsSelector"]

_DRAW_TAG = 0x54534453  # "TSDS": the draw's own numpy stream, apart from the other seeded uses of --seed


@dataclass
class TsdsResult:
    probs: np.ndarray  # (n_pool,) float64, sums to 1
    kde: np.ndarray  # (n_pool,) float64, ρ of the candidates in U (>= 1), 0 outside U
    nearest: np.ndarray  # (n_pool,) float64, best cosine to a domain example (orders the p = 0 candidates)
    k: int  # K, neighbours per query
    kde_k: int  # k_kde
    level: float  # s
    stopped: bool  # the alpha / C condition fixed s (False: every query spread over all K)
    neighbourhood: int  # |U|
    near_duplicates: float | None  # mean over U of the members within σ among its k_kde nearest, itself excluded (the original logs it); None for σ = 0
    capped_queries: int  # queries with S_j0 > s: their whole 1/M on their nearest candidate
    seconds: dict = field(default_factory=dict)


def neighbour_caps(n_pool: int, max_k: int, kde_k: int) -> tuple[int, int]:
    """(K, k_kde): the original's min(cap, n_pool // 10), at least 2 and 1, at most n_pool."""
    k = min(n_pool, max(2, min(max_k, n_pool // 10)))
    return k, min(n_pool, max(1, min(kde_k, n_pool // 10)))


def _distance(cos: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of unit vectors from their cosine: d² = 2 - 2 cos (>= 0)."""
    return np.maximum(2.0 - 2.0 * cos, 0.0)


def neighbours(domain_emb: np.ndarray, pool_emb, k: int, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Each domain example's k nearest candidates: distances (M, k) ascending and pool indices (M, k)."""
    cos, idx = search(np.asarray(domain_emb), as_shards(pool_emb), k, device)  # (M, k) each, one read of the pool
    return np.sqrt(_distance(cos)), idx


def _rows(shards, bounds: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The rows ``idx`` (sorted pool indices) of the sharded pool, as one (len(idx), d) array,
    each shard visited once."""
    parts = []
    for shard, lo, hi in zip(shards, bounds[:-1], bounds[1:]):
        loc = idx[(idx >= lo) & (idx < hi)] - lo
        if len(loc):
            parts.append(np.asarray(shard[loc]))
    return np.concatenate(parts)


def kde(pool_emb, members: np.ndarray, sigma: float, k: int, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """ρ(x) for x in ``members`` (sorted unique pool indices): the sum over the k nearest members
    (x included) of max(0, 1 - ||x - y||² / σ²); and how many of those k lie within σ.

    The kernel falls with the distance, so that sum is the sum of x's k largest kernel values
    among the members (ties do not change a sum): exact in float32, on ``device``. The members'
    rows are read once (one visit per shard) and held there, (|U|, d); the |U|² kernel values
    (the KDE among U is quadratic in |U|, as the original's index over U is) are made in chunks
    of members of at most :data:`~ntkselect.selection.ntk.stage1.SEARCH_BUDGET` entries."""
    shards = as_shards(pool_emb)
    bounds = np.cumsum([0] + [len(s) for s in shards])  # (n_shards + 1,)
    x = unit_rows(_rows(shards, bounds, members), device)  # (|U|, d)
    n = len(x)
    width = min(k, n)
    rows = max(1, SEARCH_BUDGET // n)
    rho, within = np.empty(n), np.empty(n, dtype=np.int64)
    for a in range(0, n, rows):
        cos = x[a : a + rows] @ x.T  # (r, |U|)
        kern = (1.0 - (2.0 - 2.0 * cos).clamp_min(0.0) / sigma**2).clamp_min(0.0)  # (r, |U|)
        rho[a : a + rows] = torch.topk(kern, width, dim=1, sorted=False).values.double().sum(1).cpu().numpy()
        within[a : a + rows] = (kern > 0).sum(1).clamp_max(k).cpu().numpy()
    return rho, within


def transport(dist: np.ndarray, rho: np.ndarray, alpha: float, c: float) -> tuple[np.ndarray, float, bool]:
    """Steps 5 and 6: (p (M, K) the mass query j gives its neighbour k, level s, whether the
    alpha / C condition stopped the sweep). ``dist`` (M, K) ascending, ``rho`` (M, K) the KDE of
    each neighbour."""
    m, k = dist.shape
    if k < 2:  # a one-candidate pool: nothing to trade off
        return np.full((m, k), 1.0 / m), 0.0, False
    w = 1.0 / rho  # (M, K)
    big_s = np.cumsum(w, 1)  # (M, K) S_jk
    big_w = np.cumsum(dist * w, 1)  # (M, K) W_jk
    bp = big_s[:, :-1]  # (M, K-1) breakpoints, k <= K - 2
    cost = dist[:, 1:] * bp - big_w[:, :-1]  # (M, K-1) c_jk
    inc = np.diff(cost, axis=1, prepend=0.0)  # (M, K-1) change of T when (j, k) is swept
    jj, kk = np.indices(bp.shape)
    order = np.lexsort((jj.ravel(), kk.ravel(), bp.ravel()))  # (M (K-1),) by S, then k, then j
    total = np.cumsum(inc.ravel()[order])  # T after each breakpoint
    hit = np.flatnonzero(alpha / c * total >= (1 - alpha) * m)
    stopped = len(hit) > 0
    s = float(bp.ravel()[order[hit[0] if stopped else -1]])
    prev = np.concatenate([np.zeros((m, 1)), bp], 1)  # (M, K) S_j,k-1
    rest = 1.0 / m - prev / (m * s)  # (M, K) what is left of query j's 1/M before neighbour k
    p = np.clip(rest, 0.0, w / (m * s))  # (M, K)
    p[:, -1] = np.maximum(rest[:, -1], 0.0)  # the last neighbour takes whatever is left
    return p, s, stopped


def best_cosine(domain_emb: np.ndarray, pool_emb, device: str | torch.device = "cpu") -> np.ndarray:
    """(n_pool,) float64: each candidate's best cosine to a domain example (float32 values), one read of the pool."""
    q = unit_rows(domain_emb, device)  # (M, d)
    piece = max(1, SEARCH_BUDGET // max(1, len(q)))
    parts = [unit_rows(np.asarray(s[a : a + piece]), device) @ q.T for s in as_shards(pool_emb) for a in range(0, len(s), piece)]  # (s, M) each
    return np.concatenate([c.max(1).values.double().cpu().numpy() for c in parts])


def tsds(
    domain_emb: np.ndarray,
    pool_emb,
    alpha: float = 0.5,
    c: float = 5.0,
    sigma: float = 0.75,
    max_k: int = 5000,
    kde_k: int = 1000,
    device: str | torch.device = "cpu",
) -> TsdsResult:
    """TSDS probabilities over the pool (steps 1-6 above). ``pool_emb``: one (n_pool, d) array or
    a list of shards in pool order; the result does not depend on the sharding. The defaults are
    the authors' ``config.yaml`` (alpha 0.5, C 5.0, sigma 0.75, max_K 5000, kde_K 1000). The
    search and the KDE run on ``device``; the pool is read once for the search (which also gives
    each candidate's best cosine) and U's rows once more for the KDE."""
    shards = as_shards(pool_emb)
    n_pool = sum(len(s) for s in shards)
    k, k_kde = neighbour_caps(n_pool, max_k, kde_k)
    t0 = time.perf_counter()
    cos, idx, nearest32 = search(np.asarray(domain_emb), shards, k, device, best=True)  # (M, K), (M, K), (n_pool,)
    dist = np.sqrt(_distance(cos))  # (M, K) ascending
    t1 = time.perf_counter()
    members = np.unique(idx)  # (|U|,) sorted
    if sigma == 0:
        rho_u, within = np.ones(len(members)), None
    else:
        rho_u, within = kde(shards, members, sigma, k_kde, device)  # (|U|,) each
    rho = rho_u[np.searchsorted(members, idx)]  # (M, K)
    t2 = time.perf_counter()
    p, s, stopped = transport(dist, rho, alpha, c)
    probs = np.bincount(idx.ravel(), weights=p.ravel(), minlength=n_pool)  # (n_pool,)
    kde_all = np.zeros(n_pool)
    kde_all[members] = rho_u
    nearest = nearest32.astype(np.float64)
    t3 = time.perf_counter()
    return TsdsResult(
        probs=probs,
        kde=kde_all,
        nearest=nearest,
        k=k,
        kde_k=k_kde,
        level=s,
        stopped=stopped,
        neighbourhood=len(members),
        near_duplicates=None if within is None else float(within.mean() - 1.0),
        capped_queries=int((1.0 / rho[:, 0] > s).sum()) if k >= 2 else 0,
        seconds={"knn": t1 - t0, "kde": t2 - t1, "transport": t3 - t2},
    )


def draw_order(probs: np.ndarray, nearest: np.ndarray, seed: int) -> np.ndarray:
    """The whole pool, ranked: candidates with p > 0 in the order of a seeded sample without
    replacement proportional to p, then those with p = 0 by best cosine to the domain (then pool
    position).

    The draw is Efraimidis–Spirakis: candidate i gets the key u_i^(1/p_i), u_i uniform from
    ``numpy.random.default_rng([seed, tag])``, and the keys are sorted highest first. Computed as
    E_i / p_i ascending with E_i = -log u_i ~ Exp(1), it is a race of exponential clocks, so each
    next candidate is drawn with probability p_i / (the p still left): the successive sampling
    that TSDS's draws with replacement become once repeats are skipped."""
    n = len(probs)
    e = np.random.default_rng([int(seed), _DRAW_TAG]).standard_exponential(n)  # (n_pool,) one clock per candidate
    pos = np.flatnonzero(probs > 0)
    drawn = pos[np.lexsort((pos, e[pos] / probs[pos]))]
    zero = np.flatnonzero(~(probs > 0))
    return np.concatenate([drawn, zero[np.lexsort((zero, -nearest[zero]))]]).astype(np.int64)


# -- the selector ----------------------------------------------------------------------------


@register_selector(
    "tsds",
    uses_model=True,
    uses_embeddings=True,
    options=("tsds_alpha", "tsds_c", "tsds_sigma", "tsds_max_k", "tsds_kde_k"),
    summary="TSDS, Liu et al. 2024, on stage-1 embeddings",
)
class TsdsSelector(Selector):
    """``--method tsds``: :func:`tsds` on stage 1's embeddings, then :func:`draw_order`."""

    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        cfg = ctx.cfg
        dom, pool = ctx.embeddings()
        t = time.perf_counter()
        r = tsds(dom, pool, alpha=cfg.tsds_alpha, c=cfg.tsds_c, sigma=cfg.tsds_sigma, max_k=cfg.tsds_max_k, kde_k=cfg.tsds_kde_k, device=ctx.rt.device)
        order = draw_order(r.probs, r.nearest, cfg.seed)
        nonzero = int((r.probs > 0).sum())
        ctx.log(
            f"ntkselect: tsds K = {r.k}, KDE K = {r.kde_k}, {r.neighbourhood} candidates in the domain's neighbourhoods, "
            f"{nonzero} with nonzero probability" + ("" if r.stopped else "; the alpha/C condition never held, every domain example spread over all K")
        )
        if nonzero < n:
            ctx.log(
                f"ntkselect: tsds: only {nonzero} candidates have nonzero probability; the other {n - nonzero} selected are the "
                "zero-probability candidates with the best cosine to the domain"
            )
        own = time.perf_counter() - t
        return Ranking(
            order,
            r.probs[order],
            columns={"kde": r.kde[order]},
            seconds=own,
            shared=("warmup", "embeddings"),
            timings={"embeddings": ctx.shared_seconds.get("embeddings", 0.0), "select": own},
            info={
                "rule": "TSDS (Liu et al. 2024, KNN-KDE as in the authors' tsds.py): score = the candidate's probability; order = a seeded "
                "draw without replacement in proportion to it, then the zero-probability candidates",
                "alpha": cfg.tsds_alpha,
                "C": cfg.tsds_c,
                "sigma": cfg.tsds_sigma,
                "max_k": cfg.tsds_max_k,
                "kde_k": cfg.tsds_kde_k,
                "k_used": r.k,
                "kde_k_used": r.kde_k,
                "caps": "K = min(max_k, pool // 10) >= 2, KDE K = min(kde_k, pool // 10) >= 1",
                "embeddings": "stage-1 embeddings, L2-normalised; Euclidean distance",
                "search": "exact float32 kNN on the run's device (the original: approximate FAISS IndexIVFFlat); "
                "the KDE among the candidates in the neighbourhoods",
                "kernel": "max(0, 1 - |x - y|^2 / sigma^2) summed over the KDE K nearest, the candidate itself included",
                "level_s": r.level,
                "stopped_by_alpha_c": r.stopped,
                "neighbourhood": r.neighbourhood,
                "nonzero_probability": nonzero,
                "capped_domain_examples": r.capped_queries,
                "mean_near_duplicates": r.near_duplicates,
                "sampling": "Efraimidis-Spirakis without replacement: keys u^(1/p), u from numpy default_rng([seed, 0x54534453]), highest first "
                "(the original draws N with replacement, np.random.multinomial); then p = 0 candidates by best cosine to D, then pool position",
                "seconds": r.seconds,
            },
        )
