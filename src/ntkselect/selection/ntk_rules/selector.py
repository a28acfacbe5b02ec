"""``--method ntk-max``, ``ntk-rr``, ``ntk-whiten``, ``ntk-tsds`` and ``ntk-rules``: NTK-Selector's
stage 1, then a rule on the explicit gradient features of D and of the M candidates
(:mod:`~ntkselect.selection.ntk_rules.rules`).

1. Stage 1 as ntk (:func:`~ntkselect.selection.ntk.stage1.preselect`), or with ``ntk-rules
   --weighted-vote`` the vote weighted by ``--vote-weight``;
2. the features F(x) of the kernel's objectives (the summed logits of ntk; ``ntk-rules`` reads
   ``--kernel`` and ``--probes``), projected to ``--feature-dim`` p
   (:mod:`~ntkselect.selection.ntk_rules.features`);
3. a transform (``--features``: unit, centre, whiten with ``--whiten-shrinkage``) and the cosines
   of every domain example with every candidate;
4. an aggregation (``--aggregate``: mean, max, rr, tsds with the ``--tsds-*`` options).

The presets fix 3 and 4 and read only their own knobs: ``ntk-max`` (unit, max), ``ntk-rr``
(unit, rr), ``ntk-whiten`` (whiten, mean), ``ntk-tsds`` (whiten, tsds: TAROT's whitened
gradient features under TSDS's transport and density). ``ntk-rules`` takes every option. The
exact cosine-kernel mean (unit, mean, no projection) is ``ntk-cos``
(:mod:`~ntkselect.selection.ntk_variants`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ntkselect.config import SelectConfig
from ntkselect.data.pool import ids_of
from ntkselect.grads.fused import lora_parameters
from ntkselect.grads.projection import pass_bytes
from ntkselect.selection.base import Ranking, SelectionContext, Selector
from ntkselect.selection.ntk.stage1 import preselect, vote_degeneracy
from ntkselect.selection.ntk_rules.features import FEATURES, FeaturePayload, features_of
from ntkselect.selection.ntk_rules.rules import cosines, round_robin, transform
from ntkselect.selection.ntk_variants.kernels import Kernel
from ntkselect.selection.registry import register_selector
from ntkselect.selection.tsds import draw_order, tsds

__all__ = ["Rule", "PRESETS", "rule_of", "rules_cost", "RulesSelector", "SELECTORS", "CHUNK_BYTES"]

#: per-example gradients gathered before one projection (each chunk is one pass over the projection blocks)
CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class Rule:
    """What a rule does: its objectives (kernel, probes), transform, aggregation and stage-1 vote."""

    features: str = "unit"
    aggregate: str = "mean"
    kernel: str = "sum"
    probes: int = 1
    vote: str = "count"

    def describe(self) -> dict:
        return {"features": self.features, "aggregate": self.aggregate, "kernel": self.kernel, "probes": self.probes, "vote": self.vote}


#: --method name -> the rule it runs for a configuration
PRESETS: dict[str, Callable[[SelectConfig], Rule]] = {
    "ntk-max": lambda c: Rule("unit", "max"),
    "ntk-rr": lambda c: Rule("unit", "rr"),
    "ntk-whiten": lambda c: Rule("whiten", "mean"),
    "ntk-tsds": lambda c: Rule("whiten", "tsds"),
    "ntk-rules": lambda c: Rule(c.features, c.aggregate, c.kernel, c.probes if c.kernel == "trace" else 1, c.vote_weight if c.weighted_vote else "count"),
}


def rule_of(cfg: SelectConfig) -> Rule:
    return PRESETS[cfg.method](cfg)


def rules_cost(plan) -> None:
    """Dry run: forward + backward of D and of M candidates of the pool's mean length, G times
    (the trace kernel's probes), their per-example gradients projected chunk by chunk (one pass
    over the projection blocks per chunk), the cosines (|D| x M x G p) and the whitening (an
    eigendecomposition of the smaller of the Gram and covariance matrices); the candidates'
    features are temporary files."""
    cfg, D = plan.cfg, plan.grad_dim
    rule = rule_of(cfg)
    G = rule.probes if rule.kernel == "trace" else 1
    m = min(int(round(cfg.preselect_factor * cfg.n)), plan.n_pool)
    n_dom = len(plan.dom_len)
    plan.candidates = plan.score_rows = m
    plan.proj_dim = p = cfg.feature_dim
    q = G * (p or D)  # the features' width
    kind = "less" if rule.kernel == "loss" else "sum"  # the measured costs closest to a per-example pass (as ntk-diverse prices its features)
    dom_b, pool_b = plan.batches(kind, plan.dom_len, plan.dom_tr), plan.batches(kind, plan.pool_len, plan.pool_tr, plan.shards)
    mean_pool = plan.pool_stats.tokens / max(1, plan.n_pool)
    mean_pad = plan.padded(pool_b) / max(1, plan.n_pool)
    chunk = max(1, min(G * max(n_dom, m), CHUNK_BYTES // (4 * D)))
    extra_s, extra_f = 0.0, 2.0 * n_dom * m * q  # the cosines
    if p:
        block_s, block_rows = plan.block_seconds()
        passes = math.ceil(G * n_dom / chunk) + math.ceil(G * m / chunk)
        extra_s = passes * math.ceil(D / block_rows) * block_s
        extra_f += 2.0 * G * (n_dom + m) * D * p
    if rule.features == "whiten":
        n = n_dom + m
        extra_f += 2.0 * n * n * q + 10.0 * n**3 if n <= q else 2.0 * n * q * q + 10.0 * q**3
    plan.stage(
        "features",
        "forward+backward",
        G * (plan.dom_stats.tokens + m * mean_pool),
        G * (plan.padded(dom_b) + m * mean_pad),
        extra_flops=extra_f,
        extra_seconds=extra_s,
    )
    plan.activations["features"] = max(plan.worst(kind, dom_b), plan.worst(kind, pool_b))
    plan.projection_bytes = pass_bytes(D, p, plan.device, torch.float32, G * max(n_dom, m), CHUNK_BYTES)
    plan.temporary["rule_features"] = 4 * m * q  # (M, G p) float32 shards


class RulesSelector(Selector):
    """Stage 1 as ntk, then the rule of :data:`PRESETS` on the gradient features."""

    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        cfg, rt = ctx.cfg, ctx.rt
        rule = PRESETS[self.name](cfg)
        dom_emb, pool_emb = ctx.embeddings()
        t = time.perf_counter()
        s1 = preselect(dom_emb, pool_emb, int(round(cfg.preselect_factor * n)), cfg.knn_k, ctx.rt.device, weight=rule.vote)
        cand = s1.selected  # (M,) pool indices
        ctx.log(f"ntkselect: stage 1 kept {len(cand)} candidates (K = {s1.k_used}, {int((s1.votes > 0).sum())} got a vote)")
        t2 = time.perf_counter()
        model = ctx.model()
        kernel = Kernel(rule.kernel, rule.probes, cfg.seed)
        dim = sum(math.prod(p.shape) for _, p in lora_parameters(model))
        payload = FeaturePayload(kernel, dim, cfg.feature_dim, cfg.seed)
        cand_ex = [ctx.pool_ex[int(i)] for i in cand]
        pool_ids = ids_of(ctx.pool)
        ids = [pool_ids[int(i)] for i in cand]
        dom_ids = [r.id for r in ctx.domain]
        dom_f = features_of(model, ctx.dom_ex, rt, payload, ids=dom_ids, desc=f"{self.name}: domain features")  # (|D|, G p)
        parts = ctx.run_sharded(
            "rule-features", FEATURES, cand_ex, payload, f"{self.name}: candidate features", ids, "features", kernel.describe(), cfg.feature_dim, ids
        )
        cand_f = np.concatenate([np.asarray(p) for p in parts])  # (M, G p)
        t3 = time.perf_counter()
        dom_u, cand_u, tinfo = transform(dom_f, cand_f, rule.features, cfg.whiten_shrinkage)
        sims = cosines(dom_u, cand_u)  # (|D|, M)
        columns: dict = {"mean_cosine": sims.mean(0), "max_cosine": sims.max(0)}  # by candidate position, permuted below
        selection: dict = {}
        if rule.aggregate in ("mean", "max"):
            score = columns[f"{rule.aggregate}_cosine"]
            perm = np.lexsort((cand, -score))
            selection["rule"] = f"{rule.aggregate} over D of the cosine of the {rule.features} features; score desc, pool position asc"
        elif rule.aggregate == "rr":
            perm, picker, rounds = round_robin(sims)
            score = sims[picker, perm]  # each take's cosine to the domain example that took it
            columns["round"] = np.empty(len(cand), dtype=np.int64)
            columns["round"][perm] = rounds
            columns["taken_by"] = np.empty(len(cand), dtype=object)
            columns["taken_by"][perm] = [dom_ids[int(i)] for i in picker]
            score = _scatter(score, perm)
            selection["rule"] = (
                "round robin over D: each domain example in turn takes its best untaken candidate by cosine (ties: pool position); score: that cosine"
            )
        else:
            r = tsds(dom_u, cand_u, alpha=cfg.tsds_alpha, c=cfg.tsds_c, sigma=cfg.tsds_sigma, max_k=cfg.tsds_max_k, kde_k=cfg.tsds_kde_k)
            perm = draw_order(r.probs, r.nearest, cfg.seed)
            score = r.probs
            columns["kde"] = r.kde
            selection.update(
                rule="TSDS (transport to D + KDE density) on the features, then its seeded draw without replacement",
                alpha=cfg.tsds_alpha,
                c=cfg.tsds_c,
                sigma=cfg.tsds_sigma,
                k=r.k,
                kde_k=r.kde_k,
                stopped=r.stopped,
                nonzero=int((r.probs > 0).sum()),
            )
        order = cand[perm]
        columns = {k: v[perm] for k, v in columns.items()}
        columns["votes"] = s1.votes[order]
        if s1.weight is not None:
            columns["vote_weight"] = s1.weight[order]
        end = time.perf_counter()
        toks = 2 * kernel.groups * (sum(len(e.input_ids) for e in ctx.dom_ex) + sum(len(e.input_ids) for e in cand_ex))
        return Ranking(
            order,
            np.asarray(score, dtype=np.float64)[perm],
            columns=columns,
            seconds=end - t,
            tokens=toks,
            shared=("warmup", "embeddings"),
            timings={"stage1": ctx.shared_seconds.get("embeddings", 0.0) + (t2 - t), "features": t3 - t2, "rule": end - t3},
            info={
                "rule": rule.describe(),
                "stage1": {
                    "m": int(len(cand)),
                    "k_requested": cfg.knn_k,
                    "k_used": s1.k_used,
                    "vote": rule.vote,
                    "vote_degeneracy": vote_degeneracy(s1),
                    "seconds": s1.seconds,
                },
                "features": {
                    "kernel": kernel.describe(),
                    "grad_dim": dim,
                    "feature_dim": cfg.feature_dim,
                    "width": int(cand_f.shape[1]),
                    "projector": "seeded Rademacher, the seed of --seed" if cfg.feature_dim else None,
                    **tinfo,
                },
                "selection": selection,
            },
        )


def _scatter(values: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``values`` given in the order ``perm`` back by candidate position."""
    out = np.empty(len(perm), dtype=np.float64)
    out[perm] = values
    return out


_COMMON = ("knn_k", "preselect_factor", "feature_dim")
_TSDS = ("tsds_alpha", "tsds_c", "tsds_sigma", "tsds_max_k", "tsds_kde_k")
_OPTIONS = {
    "ntk-max": _COMMON,
    "ntk-rr": _COMMON,
    "ntk-whiten": (*_COMMON, "whiten_shrinkage"),
    "ntk-tsds": (*_COMMON, "whiten_shrinkage", *_TSDS),
    "ntk-rules": (*_COMMON, "features", "aggregate", "whiten_shrinkage", "kernel", "probes", "weighted_vote", "vote_weight", *_TSDS),
}
_SUMMARY = {
    "ntk-max": "max over D of the cosine of NTK gradient features",
    "ntk-rr": "round robin over D on the cosine of NTK gradient features",
    "ntk-whiten": "mean cosine of whitened NTK gradient features",
    "ntk-tsds": "TSDS's transport and density on whitened NTK gradient features",
    "ntk-rules": "NTK gradient features with --features, --aggregate, --kernel and --weighted-vote",
}


def _register(name: str) -> type:
    cls = type(f"{name.title().replace('-', '')}Selector", (RulesSelector,), {"__module__": __name__, "__doc__": _SUMMARY[name]})
    return register_selector(
        name,
        cls,
        uses_model=True,
        uses_embeddings=True,
        options=_OPTIONS[name],
        cost=rules_cost,
        tasks=(FEATURES,),
        paths=("ntk", "less") if name == "ntk-rules" else ("ntk",),
        summary=_SUMMARY[name],
    )


#: the registered selector classes, by --method name
SELECTORS = {name: _register(name) for name in PRESETS}
