"""``--method less``: LESS (Xia et al. 2024).

Warm-up LoRA, Adam-preconditioned per-example loss gradients of the candidates, SGD gradients
of D, Rademacher-projected, cosine, max over D. The candidates' features are computed shard by
shard (the :data:`LESS` shard task) on the run's executor, each shard resumable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ntkselect.config import SelectConfig
from ntkselect.data.pool import ids_of, lengths_of
from ntkselect.errors import NtkSelectError
from ntkselect.grads.fused import flatten_grads, lora_parameters
from ntkselect.grads.projection import make_projector, pass_bytes
from ntkselect.runs.shards import ShardTask
from ntkselect.selection.base import Ranking, SelectionContext, Selector, ordered
from ntkselect.selection.ntk.stage2 import projected_features
from ntkselect.selection.registry import register_selector
from ntkselect.training.warmup import per_example_loss

__all__ = ["LessSelector", "LESS", "LessPayload", "CHUNK_BYTES"]

#: per-example gradients are gathered into chunks of this size before each projection pass
CHUNK_BYTES = 2 << 30


@dataclass
class LessPayload:
    """The :data:`LESS` task's input: the warm-up's Adam moments (flat, CPU) and the projection."""

    m: torch.Tensor  # (D,) first moments
    v: torch.Tensor  # (D,) second moments
    b1: float
    b2: float
    eps: float
    dim: int
    proj_dim: int
    seed: int
    chunk_bytes: int = 1 << 30


def _less_shard(model, examples, rt, payload: LessPayload, ids=None, desc="less: gradients") -> np.ndarray:
    m, v = payload.m.to(rt.device), payload.v.to(rt.device)
    b1, b2, eps = payload.b1, payload.b2, payload.eps

    def adam(g):  # (B, D) -> (B, D): LESS's Adam update direction from the warm-up's moments
        g = g.float()
        return (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps)

    proj = make_projector(payload.dim, payload.proj_dim, payload.seed, device=rt.device)
    return projected_features(
        model, examples, proj, rt, objective=per_example_loss, transform=adam, chunk_bytes=payload.chunk_bytes, ids=ids, desc=desc
    )  # (n, p) float32


#: the shard task of the candidates' LESS features
LESS = ShardTask("less", _less_shard, LessPayload)

_NEEDS_WARMUP = "--method less needs --warmup-epochs > 0: its candidate gradients are preconditioned by the warm-up's Adam state"


def _check(cfg: SelectConfig) -> None:
    if cfg.warmup_epochs <= 0:
        raise NtkSelectError(_NEEDS_WARMUP)


def less_cost(plan) -> None:
    """Dry run: forward + backward of D and the whole pool, the projection of every chunk of
    per-example gradients, the chunk buffer, and the pool's features on disk."""
    cfg, D, n_dom, n_pool = plan.cfg, plan.grad_dim, len(plan.dom_len), plan.n_pool
    plan.proj_dim = proj = cfg.less_proj_dim
    chunk = max(1, min(max(n_dom, n_pool), CHUNK_BYTES // (4 * D)))
    passes = math.ceil(n_dom / chunk) + math.ceil(n_pool / chunk)  # each chunk visits every block once
    block_s, block_rows = plan.block_seconds()
    less_b = plan.batches("less", plan.dom_len, plan.dom_tr) + plan.batches("less", plan.pool_len, plan.pool_tr, plan.shards)
    plan.stage(
        "less",
        "forward+backward",
        plan.dom_stats.tokens + plan.pool_stats.tokens,
        plan.padded(less_b),
        extra_flops=2 * (n_dom + n_pool) * D * proj,
        extra_seconds=passes * math.ceil(D / block_rows) * block_s,
    )
    plan.activations["less"] = plan.worst("less", less_b)
    plan.projection_bytes = pass_bytes(D, proj, plan.device, torch.float32, max(n_dom, n_pool), CHUNK_BYTES) + 4 * 4 * D  # chunk, signs, Adam m, v
    plan.temporary["less_features"] = n_pool * proj * 4  # (n_pool, p) float32 memmap, temporary


@register_selector(
    "less", uses_model=True, options=("less_proj_dim",), cost=less_cost, tasks=(LESS,), check=_check, paths=("less",), summary="LESS, Xia et al. 2024"
)
class LessSelector(Selector):
    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        cfg, rt = ctx.cfg, ctx.rt
        _check(cfg)
        model = ctx.model()
        state = ctx.adam_state()
        t = time.perf_counter()
        names_shapes = [(nm, p.shape) for nm, p in lora_parameters(model)]
        names = [nm for nm, _ in names_shapes]
        dim = sum(math.prod(s) for _, s in names_shapes)
        m = flatten_grads({nm: state[nm][0].unsqueeze(0) for nm in names}, names)[0].to(rt.device).float()  # (D,)
        v = flatten_grads({nm: state[nm][1].unsqueeze(0) for nm in names}, names)[0].to(rt.device).float()  # (D,)
        (b1, b2), eps = state["_betas"], state["_eps"]
        # LESS's Γ (applied per shard, _less_shard): one more Adam step's update direction from the
        # warm-up's moments, m' / sqrt(v' + eps), as in its code (no bias correction)
        p = cfg.less_proj_dim
        projector = make_projector(dim, p, cfg.seed, device=rt.device)
        dom = projected_features(
            model, ctx.dom_ex, projector, rt, objective=per_example_loss, chunk_bytes=CHUNK_BYTES, desc="less: domain gradients", ids=[r.id for r in ctx.domain]
        )  # (n_dom, p)
        payload = LessPayload(m.cpu(), v.cpu(), b1, b2, eps, dim, p, cfg.seed, CHUNK_BYTES)
        shards = ctx.run_sharded("less", LESS, ctx.pool_ex, payload, "less: pool gradients", ids_of(ctx.pool), "less", p)
        d = torch.from_numpy(dom).double()
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-30)  # (n_dom, p)
        parts = []
        for shard in shards:
            x = torch.from_numpy(np.asarray(shard)).double()  # (s, p)
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
            parts.append((x @ d.T).max(dim=1).values.numpy())  # max over D of the cosine
        scores = np.concatenate(parts)
        order, sc = ordered(np.arange(len(ctx.pool)), scores)
        toks = 2 * (int(lengths_of(ctx.dom_ex).sum() + lengths_of(ctx.pool_ex).sum()))  # forward + backward
        return Ranking(
            order,
            sc,
            seconds=time.perf_counter() - t,
            tokens=toks,
            shared=("warmup",),
            info={
                "rule": "max over D of cos(phi(Gamma(grad loss(c))), phi(grad loss(x_i))); Gamma = Adam step from the warm-up's moments",
                "proj_dim": p,
                "grad_dim": dim,
                "projector": projector.describe(),
                "adam_betas": [b1, b2],
                "adam_eps": eps,
                "checkpoints": "the single warm-up checkpoint (LESS averages several, weighted by learning rate)",
            },
        )
