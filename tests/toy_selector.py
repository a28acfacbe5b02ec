"""A selector added the way docs/ADDING_A_SELECTOR.md describes: one module, one registration.

``--method longest``: the pool examples with the most tokens first. It needs no model, so the
run writes no adapter/, and its cost model tells the dry run what its own work costs.
"""

from __future__ import annotations

import time

import numpy as np

from ntkselect import Ranking, SelectionContext, Selector, register_selector
from ntkselect.selection import ordered


def longest_cost(plan) -> None:
    """Dry run: one pass over the pool's token counts."""
    plan.add_stage("longest", "count tokens", plan.pool_stats.tokens, seconds=1e-7 * plan.n_pool)


@register_selector("longest", cost=longest_cost, summary="the longest pool examples first")
class LongestSelector(Selector):
    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        t = time.perf_counter()
        lengths = np.array([len(e.input_ids) for e in ctx.pool_ex], dtype=np.float64)  # (n_pool,) tokens per candidate
        order, scores = ordered(np.arange(len(ctx.pool)), lengths)  # most tokens first, ties by pool position
        return Ranking(order, scores, info={"rule": "tokens per example, most first"}, seconds=time.perf_counter() - t)
