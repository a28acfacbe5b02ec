"""Paired statistics for ``ntkselect evaluate``: per-example differences between two methods
trained with the same seeds and scored on the same test records.

A cell is one (method, seed); its per-example values (held-out loss or correctness) form a
(seeds, examples) array. Two methods are compared on the same seeds and the same examples, so
every statistic here is paired: seed s of method A against seed s of method B, example i
against example i.

* :func:`paired_sign_flip_test`: two-sided p-value of "the mean per-example difference is 0",
  by random sign flips over examples (exact for few non-zero differences).
* :func:`paired_bootstrap`: a percentile interval for the mean difference that resamples
  seeds and examples (both are sources of variance: a selector's gain must hold across seeds
  of the selection and fine-tune, and across test questions).
* :func:`gap_closed`: (L_random − L_method) / (L_random − L_oracle), with its interval from the
  same resamples, so the three means move together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["paired_sign_flip_test", "bootstrap_indices", "paired_bootstrap", "gap_closed", "GapClosed"]


def paired_sign_flip_test(diff: np.ndarray, n_perm: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of mean(diff) = 0 for paired per-question differences, by random sign
    flips (exact permutation test for small n). Add-one smoothing keeps p > 0."""
    diff = np.asarray(diff, dtype=np.float64)
    if len(diff) == 0 or not np.any(diff):
        return 1.0
    nz = diff[diff != 0]  # zero differences do not change under a flip
    obs = abs(diff.sum())
    if len(nz) <= 16:  # exact: every sign pattern
        signs = ((np.arange(2 ** len(nz))[:, None] >> np.arange(len(nz))) & 1) * 2 - 1
        stats = np.abs(signs @ nz)
        return float((stats >= obs - 1e-12).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for s in range(0, n_perm, 2000):
        b = min(2000, n_perm - s)
        signs = rng.integers(0, 2, size=(b, len(nz))) * 2 - 1
        hits += int((np.abs(signs @ nz) >= obs - 1e-12).sum())
    return float((hits + 1) / (n_perm + 1))


def bootstrap_indices(n_seeds: int, n_examples: int, n_boot: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n_boot, n_seeds) seed indices and (n_boot, n_examples) example indices, drawn with
    replacement; one draw serves every method, so paired statistics stay paired."""
    rng = np.random.default_rng([seed, 0x424F4F54])
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds)), rng.integers(0, n_examples, size=(n_boot, n_examples))


def _resampled_means(values: np.ndarray, idx: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(n_boot,) mean over the resampled seeds and examples of a (seeds, examples) array."""
    s_idx, e_idx = idx
    # mean over resampled seeds first (B, n_examples), then over resampled examples
    per_example = values[s_idx].mean(axis=1)  # (B, n_examples)
    return np.take_along_axis(per_example, e_idx, axis=1).mean(axis=1)  # (B,)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, idx: tuple[np.ndarray, np.ndarray] | None = None, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(a − b) for two (seeds, examples) arrays of paired values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired arrays must share one (seeds, examples) shape, got {a.shape} and {b.shape}")
    idx = idx if idx is not None else bootstrap_indices(*a.shape)
    d = _resampled_means(a - b, idx)
    q = (1 - level) / 2
    return float(np.quantile(d, q)), float(np.quantile(d, 1 - q))


@dataclass
class GapClosed:
    value: float  # (L_random − L_method) / (L_random − L_oracle) on the means
    low: float  # percentile interval over the bootstrap resamples
    high: float
    denominator: float  # L_random − L_oracle: how much room there is to close


def gap_closed(method: np.ndarray, random: np.ndarray, oracle: np.ndarray, idx: tuple[np.ndarray, np.ndarray] | None = None, level: float = 0.95) -> GapClosed:
    """How much of the loss gap between random and the oracle a method closes: 0 = no better
    than random, 1 = as good as in-domain data, < 0 worse than random. Arrays are (seeds,
    examples) losses on the same seeds and examples. The interval comes from resampling seeds
    and examples jointly for the three methods; resamples where the oracle is not better than
    random (no gap to close) are dropped from it, and an interval is NaN when most are."""
    m, r, o = (np.asarray(x, dtype=np.float64) for x in (method, random, oracle))
    if not (m.shape == r.shape == o.shape) or m.ndim != 2:
        raise ValueError("method, random and oracle must share one (seeds, examples) shape")
    den = float(r.mean() - o.mean())
    value = float((r.mean() - m.mean()) / den) if den > 0 else float("nan")
    idx = idx if idx is not None else bootstrap_indices(*m.shape)
    bm, br, bo = (_resampled_means(x, idx) for x in (m, r, o))
    bden = br - bo
    ok = bden > 0
    if ok.mean() < 0.5:
        return GapClosed(value, float("nan"), float("nan"), den)
    g = (br[ok] - bm[ok]) / bden[ok]
    q = (1 - level) / 2
    return GapClosed(value, float(np.quantile(g, q)), float(np.quantile(g, 1 - q)), den)
