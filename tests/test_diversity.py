"""The diversity-aware selection rule of the NTK-Selector variants: lambda = 0 is top N, ties by
pool position; a near-duplicate of a selected candidate falls back; the gains never rise."""

from __future__ import annotations

import numpy as np
import pytest

from ntkselect.selection.ntk_variants.diversity import diverse_order, unit_features


def test_diversity_with_lambda_0_is_top_n_with_ties_by_pool_position():
    from ntkselect.selection.base import ordered

    rng = np.random.default_rng(0)
    idx = rng.permutation(200)[:40]
    scores = rng.integers(0, 6, size=40).astype(np.float64)  # many ties
    units = unit_features(rng.normal(size=(40, 16)))
    order, gains, sims = diverse_order(idx, scores, units, 0.0)
    want, want_scores = ordered(idx, scores)
    assert np.array_equal(order, want) and np.array_equal(gains, want_scores) and not sims.any()


def test_diversity_skips_a_near_duplicate_and_gains_never_rise():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 32))
    feats = np.concatenate([base, base[:1] + 1e-3 * rng.normal(size=(1, 32))])  # candidate 6 duplicates candidate 0
    scores = np.array([5.0, 1.0, 2.0, 1.5, 0.5, 0.0, 4.9])
    idx = np.arange(7)
    top, _, _ = diverse_order(idx, scores, unit_features(feats), 0.0)
    assert list(top[:2]) == [0, 6]
    order, gains, sims = diverse_order(idx, scores, unit_features(feats), 2.0)
    assert order[0] == 0 and list(order).index(6) > 1 and sorted(order.tolist()) == list(range(7))
    assert np.all(np.diff(gains) <= 0) and sims[0] == 0 and sims[list(order).index(6)] > 0.99
    with pytest.raises(ValueError, match="lambda"):
        diverse_order(idx, scores, unit_features(feats), -1.0)
