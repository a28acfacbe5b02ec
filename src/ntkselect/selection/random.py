"""``--method random``: a seeded uniform sample of the pool (the baseline every method must beat)."""

from __future__ import annotations

import time

import numpy as np

from ntkselect.selection.base import Ranking, SelectionContext, Selector, ordered
from ntkselect.selection.registry import register_selector

__all__ = ["RandomSelector"]

_TAG = 0x52414E44  # "RAND": this selector's own numpy stream, apart from the other seeded uses of --seed


@register_selector("random")
class RandomSelector(Selector):
    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        t = time.perf_counter()
        u = np.random.default_rng([ctx.cfg.seed, _TAG]).random(len(ctx.pool))  # (n_pool,) seeded uniform keys
        order, scores = ordered(np.arange(len(ctx.pool)), u)
        return Ranking(order, scores, info={"rule": "seeded uniform keys (numpy default_rng([seed, tag])), highest first"}, seconds=time.perf_counter() - t)
