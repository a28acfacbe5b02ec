"""``--method embedding``: stage 1's embeddings alone, the top N by mean cosine to D."""

from __future__ import annotations

import time

import numpy as np

from ntkselect.selection.base import Ranking, SelectionContext, Selector, ordered
from ntkselect.selection.registry import register_selector

__all__ = ["EmbeddingSelector"]


@register_selector("embedding", uses_model=True, uses_embeddings=True, summary="mean cosine of stage-1 embeddings")
class EmbeddingSelector(Selector):
    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        dom, pool = ctx.embeddings()
        t = time.perf_counter()
        d = dom / np.maximum(np.linalg.norm(dom, axis=1, keepdims=True), 1e-12)  # (n_dom, d)
        centre = d.mean(0).astype(np.float64)  # mean_i x̂_i: mean cosine = x̂_j · centre
        parts = []
        for shard in pool:  # one memory-mapped shard at a time
            x = np.asarray(shard, dtype=np.float64)  # (s, d)
            parts.append((x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)) @ centre)
        scores = np.concatenate(parts) if parts else np.zeros(0)
        order, sc = ordered(np.arange(len(ctx.pool)), scores)
        own = time.perf_counter() - t
        return Ranking(
            order,
            sc,
            info={"rule": "mean cosine of the stage-1 embedding to the domain embeddings"},
            seconds=own,
            shared=("warmup", "embeddings"),
            timings={"embeddings": ctx.shared_seconds.get("embeddings", 0.0), "select": own},
        )
