"""Diversity-aware greedy selection: the mean-kernel score traded against redundancy.

Given the candidates' scores s_j and unit feature vectors u_j, the rule picks greedily

    j* = argmax_{j ∉ S}  s_j − λ · σ_s · m_j,     m_j = max(0, max_{k ∈ S} ⟨u_j, u_k⟩)

(m_j = 0 while S is empty), where σ_s is the standard deviation of the scores over the
candidates, so λ is in units of it: a candidate whose features point the same way as one
already selected (cosine 1) loses λ standard deviations of score. λ = 0 is top-N by score.
Ties go to the higher score, then to the earlier pool position, so λ = 0 gives exactly
:func:`~ntkselect.selection.base.ordered`'s order.

Every candidate's gain can only fall as S grows (m_j only rises), and the rule takes the
largest, so the gains of the picks are non-increasing: they are the ranking's scores.

The features (:func:`unit_features`) are the candidates' projected kernel features, centred on
their mean: the summed-logit gradients of different examples share a large common direction,
which would make every cosine close to 1 and the penalty a constant.
"""

from __future__ import annotations

import numpy as np

__all__ = ["unit_features", "diverse_order"]


def unit_features(features: np.ndarray) -> np.ndarray:
    """(M, p) float64: the rows centred on their mean and scaled to unit length (a zero row stays 0)."""
    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(axis=0, keepdims=True)
    n = np.linalg.norm(f, axis=1, keepdims=True)
    return np.divide(f, n, out=np.zeros_like(f), where=n > 0)


def diverse_order(idx: np.ndarray, scores: np.ndarray, units: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy order of all M candidates: (pool indices, gains at the pick, m_j at the pick), each (M,).

    ``idx`` (M,) pool positions, ``scores`` (M,), ``units`` (M, p) unit features (:func:`unit_features`)."""
    idx = np.asarray(idx, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    M = len(idx)
    if lam < 0 or not np.isfinite(lam):
        raise ValueError(f"lambda must be a finite number >= 0 (got {lam})")
    pen = float(lam) * (float(s.std()) if M > 1 else 0.0)
    tie = np.empty(M, dtype=np.int64)
    tie[np.lexsort((idx, -s))] = np.arange(M)  # the tie-break: higher score, then earlier pool position
    maxsim = np.zeros(M)
    left = np.ones(M, dtype=bool)
    order = np.empty(M, dtype=np.int64)
    gains, sims = np.empty(M), np.empty(M)
    for step in range(M):
        gain = s - pen * maxsim if pen else s
        g = np.where(left, gain, -np.inf)
        best = np.flatnonzero(g == g.max())
        j = int(best[np.argmin(tie[best])]) if len(best) > 1 else int(best[0])
        order[step], gains[step], sims[step] = j, gain[j], maxsim[j]
        left[j] = False
        if pen:
            np.maximum(maxsim, units @ units[j], out=maxsim)
    return idx[order], gains, sims
