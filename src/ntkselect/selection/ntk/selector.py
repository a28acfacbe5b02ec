"""``--method ntk``: NTK-Selector. Stage 1's votes keep M = factor x N candidates
(:mod:`~ntkselect.selection.ntk.stage1`); stage 2 scores them by the Jacobian-free NTK mean
score (:func:`~ntkselect.selection.ntk.stage2.run_stage2`, the same function the Python API
offers)."""

from __future__ import annotations

import math
import time

import torch

from ntkselect.data.pool import ids_of
from ntkselect.grads.projection import pass_bytes
from ntkselect.selection.base import Ranking, SelectionContext, Selector, ordered
from ntkselect.selection.ntk.stage1 import preselect, vote_degeneracy
from ntkselect.selection.ntk.stage2 import SCORE, run_stage2
from ntkselect.selection.registry import register_selector

__all__ = ["NtkSelector", "ntk_cost"]


def ntk_cost(plan) -> None:
    """Dry run: stage 2 is forward + backward of D and of M candidates of the pool's mean length
    (which M is known only after stage 1), plus two passes over the projection blocks for v."""
    cfg, D = plan.cfg, plan.grad_dim
    m = min(int(round(cfg.preselect_factor * cfg.n)), plan.n_pool)
    plan.candidates = plan.score_rows = m
    plan.proj_dim = proj = cfg.proj_dim
    dom_b, pool_b = plan.batches("sum", plan.dom_len, plan.dom_tr), plan.batches("dot", plan.pool_len, plan.pool_tr, plan.shards)
    mean_pool = plan.pool_stats.tokens / max(1, plan.n_pool)
    mean_pad = plan.padded(pool_b) / max(1, plan.n_pool)
    extra_s = 0.0
    if proj:  # v = φ*(φ(ḡ)): two passes over the blocks
        block_s, block_rows = plan.block_seconds()
        extra_s = 2 * math.ceil(D / block_rows) * block_s
    plan.stage("stage 2", "forward+backward", plan.dom_stats.tokens + m * mean_pool, plan.padded(dom_b) + m * mean_pad, extra_seconds=extra_s)
    # the candidates are M of the pool, known after stage 1: the pool's worst batch bounds theirs
    plan.activations["stage 2"] = max(plan.worst("sum", dom_b), plan.worst("dot", pool_b))
    # ḡ_D and v, and with a projection its pass over the M candidates (gathered rows and the signs being made)
    plan.projection_bytes = 4 * 2 * D + (pass_bytes(D, proj, plan.device, torch.float32, m, 1 << 30) if proj else 0)


@register_selector(
    "ntk",
    uses_model=True,
    uses_embeddings=True,
    options=("knn_k", "preselect_factor", "proj_dim"),
    cost=ntk_cost,
    tasks=(SCORE,),
    paths=("ntk",),
    summary="NTK-Selector",
)
class NtkSelector(Selector):
    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        cfg = ctx.cfg
        dom_emb, pool_emb = ctx.embeddings()
        t = time.perf_counter()
        s1 = preselect(dom_emb, pool_emb, int(round(cfg.preselect_factor * n)), cfg.knn_k, ctx.rt.device)
        cand = s1.selected
        t2 = time.perf_counter()
        pool_ids = ids_of(ctx.pool)
        ids = [pool_ids[int(i)] for i in cand]
        s2 = run_stage2(
            ctx.model(),
            ctx.dom_ex,
            [ctx.pool_ex[int(i)] for i in cand],
            ctx.rt,
            cfg.proj_dim,
            cfg.seed,
            domain_ids=[r.id for r in ctx.domain],
            candidate_ids=ids,
            sharding=ctx.sharding(),
        )
        if s2.resumed:
            ctx.resumed["stage2_vector"] = True
        order, sc = ordered(cand, s2.scores)
        votes = s1.votes[order]
        ctx.log(f"ntkselect: stage 1 kept {len(cand)} candidates (K = {s1.k_used}, {int((s1.votes > 0).sum())} got a vote)")
        toks = 2 * (s2.tokens["domain"] + s2.tokens["candidates"])
        timings = {"stage1": ctx.shared_seconds.get("embeddings", 0.0) + (t2 - t), "stage2": time.perf_counter() - t2}
        return Ranking(
            order,
            sc,
            columns={"votes": votes},
            seconds=time.perf_counter() - t,
            tokens=toks,
            shared=("warmup", "embeddings"),
            timings=timings,
            info={
                "stage1": {
                    "m": int(len(cand)),
                    "k_requested": cfg.knn_k,
                    "k_used": s1.k_used,
                    "voted_candidates": int((s1.votes > 0).sum()),
                    "tie_break": "votes desc, best cosine desc, pool position asc",
                    "vote_degeneracy": vote_degeneracy(s1),
                    "seconds": s1.seconds,
                },
                "stage2": {
                    "grad_dim": s2.grad_dim,
                    "proj_dim": s2.proj_dim,
                    "projector": s2.projector,
                    "seconds": s2.seconds,
                    "tokens": s2.tokens,
                    "objective": "f(x) = (1/T) sum_t sum_k logit[t,k], via h_t . sum_k w_k",
                    "score": "mean_i <phi(g(x_i)), phi(g(c_j))> = <phi*(phi(mean_i g(x_i))), g(c_j)>",
                    "tie_break": "score desc, pool position asc",
                },
            },
        )
