"""The selection rules on gradient features: a transform, then cosines to the domain examples,
then an aggregation over them. Plain numpy on (n, q) feature matrices, float64 throughout.

**Transforms** (:func:`transform`, ``--features``) of the domain features X (|D|, q) and the
candidates' C (M, q), each row then scaled to unit length (a zero row stays zero: cosine 0):

* ``unit``: the rows as they are (LESS normalises both sides so; its §3.2: short sequences have
  larger gradients, and an inner product would prefer them);
* ``centre``: minus μ, the mean of all |D| + M rows (summed-logit gradients share one large
  direction, which would put every cosine near 1);
* ``whiten``: centred, then multiplied by Σ_ρ^{-1/2} with Σ = the covariance of the centred rows
  and Σ_ρ = (1 - ρ) Σ + ρ τ I, τ = tr Σ / q (TAROT whitens by the candidates' and targets'
  joint covariance so that dominant directions stop driving the distance). With fewer rows than
  dimensions Σ is singular and full whitening (ρ → 0) makes all centred rows equidistant, so ρ
  (``--whiten-shrinkage``) shrinks it towards τ I: directions of variance well above ρ τ / (1 - ρ)
  are equalised, weaker ones keep their proportions. ρ = 1 is ``centre``. Computed in the rows'
  span: from the eigenvectors of the n x n Gram matrix when n <= q, of Σ otherwise (the
  whitened rows in an orthonormal basis of that span: the same cosines as Σ_ρ^{-1/2} applied in
  q dimensions).

**Aggregations** of the cosines S (|D|, M), S_ij = cos(x_i, c_j):

* ``mean``: s_j = mean_i S_ij (the cosine kernel's mean score);
* ``max``: s_j = max_i S_ij (LESS's max over the target's examples);
* ``rr``: round robin (RDS+, TIS): domain examples 0, 1, ..., |D|-1, 0, 1, ... in turn each take
  their best candidate not yet taken (ties: the earlier pool position); the order of the takes is
  the ranking, so N = k |D| gives every domain example its k best unshared candidates. Every
  domain example takes equally often, however many candidates resemble it;
* ``tsds``: TSDS's optimal transport to the domain and density penalty
  (:func:`~ntkselect.selection.tsds.tsds`) with the transformed features as its embeddings, over
  the M candidates, and its seeded draw (:func:`~ntkselect.selection.tsds.draw_order`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TRANSFORMS", "AGGREGATES", "transform", "unit_rows", "cosines", "round_robin"]

TRANSFORMS = ("unit", "centre", "whiten")
AGGREGATES = ("mean", "max", "rr", "tsds")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(n, q) float64: each row over its length (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def _whitened(xc: np.ndarray, rho: float) -> tuple[np.ndarray, dict]:
    """The centred rows ``xc`` (n, q) whitened by Σ_ρ^{-1/2}, in an orthonormal basis of their span."""
    n, q = xc.shape
    tau = float((xc**2).sum()) / (n * q)  # tr Σ / q
    if tau == 0.0:  # every row equal: nothing to whiten
        return np.zeros((n, 1)), {"tau": 0.0, "rank": 0}
    if n <= q:
        e, u = np.linalg.eigh(xc @ xc.T / n)  # (n,), (n, n): Gram = U diag(e) Uᵀ; Σ's nonzero eigenvalues are e
        e = np.maximum(e, 0.0)
        z = u * np.sqrt(n * e / ((1 - rho) * e + rho * tau))  # (n, n): Xc V diag((1-ρ)e + ρτ)^(-1/2), Xc V = U diag(√(n e))
    else:
        e, v = np.linalg.eigh(xc.T @ xc / n)  # (q,), (q, q)
        e = np.maximum(e, 0.0)
        z = (xc @ v) / np.sqrt((1 - rho) * e + rho * tau)  # (n, q)
    return z, {"tau": tau, "rank": int((e > e.max() * 1e-12).sum()), "equalised": int((e > rho * tau / max(1 - rho, 1e-300)).sum())}


def transform(dom: np.ndarray, cand: np.ndarray, kind: str, rho: float = 0.5) -> tuple[np.ndarray, np.ndarray, dict]:
    """(|D|, q') and (M, q') unit rows of the ``kind`` transform of the domain and candidate features, and what it did."""
    if kind not in TRANSFORMS:
        raise ValueError(f"features {kind!r}: use one of {', '.join(TRANSFORMS)}")
    x = np.concatenate([np.asarray(dom, dtype=np.float64), np.asarray(cand, dtype=np.float64)])  # (|D| + M, q)
    info: dict = {"transform": kind}
    if kind != "unit":
        x = x - x.mean(axis=0, keepdims=True)
    if kind == "whiten":
        if not 0 < rho <= 1:
            raise ValueError(f"shrinkage must be in (0, 1] (got {rho})")
        x, w = _whitened(x, rho)
        info.update(shrinkage=rho, **w)
    u = unit_rows(x)
    info["zero_rows"] = int((np.abs(u).sum(1) == 0).sum())
    return u[: len(dom)], u[len(dom) :], info


def cosines(dom_u: np.ndarray, cand_u: np.ndarray) -> np.ndarray:
    """(|D|, M) S_ij = ⟨x_i, c_j⟩ of unit rows."""
    return np.asarray(dom_u) @ np.asarray(cand_u).T


def round_robin(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round robin over the rows of ``sims`` (|D|, M): (the M candidate positions in the order
    taken, the domain example that took each, the round it was taken in), each (M,)."""
    n_d, m = sims.shape
    cols = np.broadcast_to(np.arange(m), sims.shape)
    prefs = np.lexsort((cols, -sims), axis=-1)  # (|D|, M): each domain example's candidates, best first, ties by position
    ptr = np.zeros(n_d, dtype=np.int64)
    taken = np.zeros(m, dtype=bool)
    order, picker, rounds = (np.empty(m, dtype=np.int64) for _ in range(3))
    for step in range(m):
        i = step % n_d
        while taken[prefs[i, ptr[i]]]:
            ptr[i] += 1
        j = prefs[i, ptr[i]]
        taken[j] = True
        order[step], picker[step], rounds[step] = j, i, step // n_d
    return order, picker, rounds
