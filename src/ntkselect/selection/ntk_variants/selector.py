"""``--method ntk-plus`` and its one-change presets: NTK-Selector with another kernel,
normalised scores, a diversity-aware selection rule or a checkpoint ensemble.

Stage 1 is NTK-Selector's (:func:`~ntkselect.selection.ntk.stage1.preselect`: M = factor x N
candidates by kNN votes), so every variant scores the same candidates as ``--method ntk``
(which stays the paper's method, unchanged), except with

0. ``--weighted-vote``: stage 1 keeps the M with the largest summed ``--vote-weight`` (rank or
   similarity weighted votes), which still order the candidates when every one has |D| votes.

Stage 2:

1. the kernel (``--kernel``, :mod:`~ntkselect.selection.ntk_variants.kernels`): ``sum`` (the
   paper's summed logits), ``trace`` (a Hutchinson estimate of the multi-output trace kernel
   with ``--probes`` R sign vectors) or ``loss`` (gradients of the example's mean NLL);
   s_j = (1/G) Σ_g ⟨φ*(φ(ḡ_g)), ∇f_g(c_j)⟩, with ``--proj-dim`` as for ntk;
2. ``--normalise``: s_j / √Θ(c_j, c_j), the unprojected gradient norm ‖∇f(c_j)‖ (for ``trace``
   the root of its diagonal estimate), from the same pass;
3. ``--diverse``: the greedy score-minus-redundancy rule of
   :mod:`~ntkselect.selection.ntk_variants.diversity` with weight ``--diversity-lambda`` on
   the candidates' projected kernel features (:data:`DIVERSITY_DIM` dimensions); without it,
   top N by score;
4. ``--ensemble``: the kernel (scores and diagonal) averaged over ``--checkpoints`` warm-up
   checkpoints (:mod:`~ntkselect.selection.ntk_variants.ensemble`);
5. ``--cosine``: the cosine kernel Θ(x, c) / √(Θ(x, x) Θ(c, c)), mean over D, the length of
   neither side counting: the domain side through weights 1 / √Θ(x_i, x_i) in ḡ (one more pass
   over D for the norms, :func:`~ntkselect.selection.ntk_variants.kernels.domain_vectors`), the
   candidate side as ``--normalise``. With ``--proj-dim`` the inner products are projected and
   the norms are not.

The presets fix one change each and read only its own knob, so ``ntkselect evaluate`` can put
each next to ``ntk``: ``ntk-norm`` (2), ``ntk-trace`` (1 with ``trace``, ``--probes``),
``ntk-loss`` (1 with ``loss``), ``ntk-diverse`` (3, ``--diversity-lambda``), ``ntk-ensemble``
(4, ``--checkpoints``), ``ntk-cos`` (5) and ``ntk-vote`` (0, ``--vote-weight``). ``ntk-plus`` takes every option, so it is any combination (with the
defaults, ntk's scores).
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
from ntkselect.grads.projection import make_projector, pass_bytes
from ntkselect.selection.base import Ranking, SelectionContext, Selector, ordered
from ntkselect.selection.ntk.stage1 import preselect, vote_degeneracy
from ntkselect.selection.ntk_variants.diversity import diverse_order, unit_features
from ntkselect.selection.ntk_variants.ensemble import checkpoint_steps, swapped_adapter, warmup_checkpoints
from ntkselect.selection.ntk_variants.kernels import VARIANT_SCORE, Kernel, VariantPayload, domain_vectors, kernel_features
from ntkselect.selection.registry import find_selector, register_selector
from ntkselect.training.warmup import WarmupOptions, warmup_steps

__all__ = ["Variant", "PRESETS", "variant_of", "NtkPlusSelector", "variant_cost", "DIVERSITY_DIM", "SELECTORS", "VARIANT_OPTIONS", "ignored_options"]

#: dimensions of the projected kernel features the diversity rule compares (cosines to about ±1/√p = ±0.03)
DIVERSITY_DIM = 1024


@dataclass(frozen=True)
class Variant:
    """What a variant changes: the kernel (and its probes), normalisation, the diversity weight (0: top N)."""

    kernel: str = "sum"
    probes: int = 1
    normalise: bool = False
    diversity: float = 0.0
    checkpoints: int = 1
    cosine: bool = False
    vote: str = "count"

    def describe(self) -> dict:
        return {
            "kernel": self.kernel,
            "probes": self.probes,
            "normalise": self.normalise,
            "diversity_lambda": self.diversity,
            "checkpoints": self.checkpoints,
            "cosine": self.cosine,
            "vote": self.vote,
        }


#: --method name -> the variant it runs for a configuration
PRESETS: dict[str, Callable[[SelectConfig], Variant]] = {
    "ntk-plus": lambda c: Variant(
        c.kernel,
        c.probes if c.kernel == "trace" else 1,
        c.normalise,
        c.diversity_lambda if c.diverse else 0.0,
        c.checkpoints if c.ensemble else 1,
        c.cosine,
        c.vote_weight if c.weighted_vote else "count",
    ),
    "ntk-norm": lambda c: Variant(normalise=True),
    "ntk-trace": lambda c: Variant("trace", c.probes),
    "ntk-loss": lambda c: Variant("loss"),
    "ntk-diverse": lambda c: Variant(diversity=c.diversity_lambda),
    "ntk-ensemble": lambda c: Variant(checkpoints=c.checkpoints),
    "ntk-cos": lambda c: Variant(cosine=True),
    "ntk-vote": lambda c: Variant(vote=c.vote_weight),
}


def variant_of(cfg: SelectConfig) -> Variant:
    return PRESETS[cfg.method](cfg)


def variant_cost(plan) -> None:
    """Dry run: as ntk's stage 2 (forward + backward of D and of M candidates of the pool's mean
    length), times the G objectives per example (R probes for ``trace``) and the C checkpoints, with
    the loss kernel's logits in its batches; C·G projections of ḡ (two passes over the blocks each)
    for ``--proj-dim``; for an ensemble the warm-up replay to its last earlier checkpoint; for the
    diversity rule one more per-example pass over the candidates and their projection to
    :data:`DIVERSITY_DIM` dimensions."""
    cfg, D = plan.cfg, plan.grad_dim
    var = variant_of(cfg)
    G = var.probes if var.kernel == "trace" else 1
    C, replay = 1, 0.0
    if var.checkpoints > 1:
        total = warmup_steps(len(plan.dom_len), WarmupOptions(epochs=cfg.warmup_epochs, batch_size=cfg.warmup_batch_size))
        steps = checkpoint_steps(total, var.checkpoints)
        C = max(1, len(steps))
        replay = steps[-2] / total if len(steps) > 1 else 0.0
    warm = next((s for s in plan.stages if s["stage"] == "warm-up"), None)
    if replay and warm is not None:
        plan.add_stage(
            "warm-up replay",
            warm["pass"],
            warm["tokens"] * replay,
            None if warm["padded_tokens"] is None else warm["padded_tokens"] * replay,
            None if warm["flops"] is None else warm["flops"] * replay,
            warm["seconds"] * replay,
        )
    kind_dom, kind_pool = ("less", "less") if var.kernel == "loss" else ("sum", "sum")
    m = min(int(round(cfg.preselect_factor * cfg.n)), plan.n_pool)
    plan.candidates = plan.score_rows = m
    plan.proj_dim = proj = cfg.proj_dim
    dom_b, pool_b = plan.batches(kind_dom, plan.dom_len, plan.dom_tr), plan.batches(kind_pool, plan.pool_len, plan.pool_tr, plan.shards)
    mean_pool = plan.pool_stats.tokens / max(1, plan.n_pool)
    mean_pad = plan.padded(pool_b) / max(1, plan.n_pool)
    extra_s = 0.0
    if proj:
        block_s, block_rows = plan.block_seconds()
        extra_s = 2 * C * G * math.ceil(D / block_rows) * block_s
    dom_passes = 2 if var.cosine else 1  # the cosine kernel's domain norms: one more pass over D
    tokens = C * G * (dom_passes * plan.dom_stats.tokens + m * mean_pool)
    plan.stage("stage 2", "forward+backward", tokens, C * G * (dom_passes * plan.padded(dom_b) + m * mean_pad), extra_seconds=extra_s)
    plan.activations["stage 2"] = max(plan.worst(kind_dom, dom_b), plan.worst(kind_pool, pool_b))
    plan.projection_bytes = 4 * 2 * G * D + (pass_bytes(D, proj, plan.device, torch.float32, m * G, 1 << 30) if proj else 0)
    if var.diversity > 0:
        plan.proj_dim = DIVERSITY_DIM
        block_s, block_rows = plan.block_seconds()
        chunk = max(1, min(m * G, (1 << 30) // (4 * D)))
        passes = C * math.ceil(m * G / chunk) * math.ceil(D / block_rows)
        plan.stage(
            "diversity",
            "forward+backward",
            C * G * m * mean_pool,
            C * G * m * mean_pad,
            extra_flops=2 * C * G * m * D * DIVERSITY_DIM + 2 * m * m * C * G * DIVERSITY_DIM,
            extra_seconds=passes * block_s,
        )
        plan.activations["diversity"] = plan.worst(kind_pool, pool_b)
        plan.projection_bytes = max(plan.projection_bytes, pass_bytes(D, DIVERSITY_DIM, plan.device, torch.float32, m * G, 1 << 30))
        plan.proj_dim = proj


_SCORE_RULE = "(1/C) sum_c (1/G) sum_g <phi*(phi(mean_i grad f_g(x_i))), grad f_g(c_j)> (C checkpoints, G objectives)"
_NORM_RULE = " / sqrt((1/C) sum_c (1/G) sum_g |grad f_g(c_j)|^2)"
_COS_RULE = "(1/C) sum_c mean_i Theta_c(x_i, c_j) / sqrt(Theta_c(x_i, x_i)) (G objectives averaged in Theta)"
_FEATURES = f"Rademacher-projected kernel features, p = {DIVERSITY_DIM} per objective, centred, unit length"


class NtkPlusSelector(Selector):
    """Stage 1 as ntk, then the variant's stage 2 (:data:`PRESETS`)."""

    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        cfg, rt = ctx.cfg, ctx.rt
        var = PRESETS[self.name](cfg)
        dom_emb, pool_emb = ctx.embeddings()
        t = time.perf_counter()
        s1 = preselect(dom_emb, pool_emb, int(round(cfg.preselect_factor * n)), cfg.knn_k, ctx.rt.device, weight=var.vote)
        cand = s1.selected
        t2 = time.perf_counter()
        model = ctx.model()
        kernel = Kernel(var.kernel, var.probes if var.kernel == "trace" else 1, cfg.seed)
        cand_ex = [ctx.pool_ex[int(i)] for i in cand]
        pool_ids = ids_of(ctx.pool)  # without reading the records back
        ids = [pool_ids[int(i)] for i in cand]
        cand_tokens = kernel.groups * sum(len(e.input_ids) for e in cand_ex)
        states, steps, replayed = warmup_checkpoints(ctx, var.checkpoints) if var.checkpoints > 1 else ([None], [], 0)
        C = len(states)
        total = np.zeros((len(cand), 2))
        toks = 0
        for c, state in enumerate(states):  # the kernel at each checkpoint, averaged (one checkpoint: the warmed-up adapter)
            with swapped_adapter(model, state):
                vecs, info = domain_vectors(model, ctx.dom_ex, rt, kernel, cfg.proj_dim, cfg.seed, ids=[r.id for r in ctx.domain], cosine=var.cosine)
            payload = VariantPayload({k: v.detach().cpu() for k, v in vecs.items()}, kernel, state)
            stage, key = (self.name, ()) if C == 1 else (f"{self.name}-checkpoint{c + 1}", (steps[c], len(steps)))
            key = (*key, "cosine") if var.cosine else key  # the domain vector differs: never reuse the plain kernel's shards
            desc = f"{self.name}: candidates" + (f" (checkpoint {c + 1} of {C})" if C > 1 else "")
            parts = ctx.run_sharded(stage, VARIANT_SCORE, cand_ex, payload, desc, ids, self.name, kernel.describe(), cfg.proj_dim, ids, *key)
            total += np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in parts])  # (M, 2) [score, Θ(c, c)]
            toks += 2 * (info["tokens"] + cand_tokens)
        if replayed:
            toks += int(round(ctx.shared_tokens.get("warmup", 0) * replayed / max(1, steps[-1])))
        raw, diag = total[:, 0] / C, total[:, 1] / C
        norm = np.sqrt(np.maximum(diag, 0.0))
        score = raw / np.maximum(norm, 1e-30) if var.normalise or var.cosine else raw
        columns: dict = {"kernel_score": raw, "grad_norm": norm}
        t3 = time.perf_counter()
        if var.diversity > 0:
            projector = make_projector(info["grad_dim"], DIVERSITY_DIM, cfg.seed, device=rt.device)
            feats = []
            for c, state in enumerate(states):
                with swapped_adapter(model, state):
                    desc = f"{self.name}: candidate features" + (f" (checkpoint {c + 1} of {C})" if C > 1 else "")
                    feats.append(kernel_features(model, cand_ex, rt, kernel, projector, desc=desc, ids=ids))
            order, gains, sims = diverse_order(cand, score, unit_features(np.concatenate(feats, axis=1)), var.diversity)
            pos = {int(c): j for j, c in enumerate(cand)}
            perm = np.array([pos[int(i)] for i in order], dtype=np.int64)
            sc = gains
            columns = {k: v[perm] for k, v in columns.items()}
            columns["max_similarity"] = sims
            if var.normalise or var.cosine:
                columns["normalised_score"] = score[perm]
            toks += 2 * C * cand_tokens
            rule = "greedy: argmax_j score_j - lambda * sd(score) * max(0, max_{k selected} cos(F_j, F_k)); ties: score desc, pool position asc"
        else:
            order, sc = ordered(cand, score)
            perm = np.lexsort((cand, -score))
            columns = {k: v[perm] for k, v in columns.items()}
            rule = "score desc, pool position asc"
        columns["votes"] = s1.votes[order]
        if s1.weight is not None:
            columns["vote_weight"] = s1.weight[order]
        ctx.log(f"ntkselect: stage 1 kept {len(cand)} candidates (K = {s1.k_used}, {int((s1.votes > 0).sum())} got a vote)")
        end = time.perf_counter()
        timings = {"stage1": ctx.shared_seconds.get("embeddings", 0.0) + (t2 - t), "stage2": t3 - t2}
        if var.diversity > 0:
            timings["diversity"] = end - t3
        stage2 = {
            "kernel": kernel.describe(),
            "grad_dim": info["grad_dim"],
            "proj_dim": info["proj_dim"],
            "projector": info["projector"],
            "seconds": info["seconds"],
            "score": (_COS_RULE if var.cosine else _SCORE_RULE) + (_NORM_RULE if var.normalise or var.cosine else ""),
        }
        if var.checkpoints > 1:
            stage2["checkpoints"] = {"steps": steps, "weights": "equal", "replayed_steps": replayed, "requested": var.checkpoints}
        selection: dict = {"rule": rule}
        if var.diversity > 0:
            selection.update({"lambda": var.diversity, "features": _FEATURES})
        return Ranking(
            order,
            sc,
            columns=columns,
            seconds=end - t,
            tokens=toks,
            shared=("warmup", "embeddings"),
            timings=timings,
            info={
                "variant": var.describe(),
                "stage1": {
                    "m": int(len(cand)),
                    "k_requested": cfg.knn_k,
                    "k_used": s1.k_used,
                    "vote": var.vote,
                    "vote_degeneracy": vote_degeneracy(s1),
                    "seconds": s1.seconds,
                },
                "stage2": stage2,
                "selection": selection,
            },
        )


_COMMON = ("knn_k", "preselect_factor", "proj_dim")
_OPTIONS = {
    "ntk-plus": (*_COMMON, "kernel", "probes", "normalise", "diverse", "diversity_lambda", "ensemble", "checkpoints", "cosine", "weighted_vote", "vote_weight"),
    "ntk-norm": _COMMON,
    "ntk-trace": (*_COMMON, "probes"),
    "ntk-loss": _COMMON,
    "ntk-diverse": (*_COMMON, "diversity_lambda"),
    "ntk-ensemble": (*_COMMON, "checkpoints"),
    "ntk-cos": _COMMON,
    "ntk-vote": (*_COMMON, "vote_weight"),
}
_SUMMARY = {
    "ntk-plus": "NTK-Selector with --kernel, --normalise, --diverse and --ensemble",
    "ntk-norm": "ntk's score divided by the candidate's gradient norm",
    "ntk-trace": "ntk with the Hutchinson trace kernel over the vocabulary",
    "ntk-loss": "ntk with loss gradients instead of summed logits",
    "ntk-diverse": "ntk's score, selected greedily against redundancy",
    "ntk-ensemble": "ntk's kernel averaged over warm-up checkpoints",
    "ntk-cos": "ntk with the cosine kernel: gradients unit-normalised on both sides",
    "ntk-vote": "ntk with a stage-1 vote weighted by rank or similarity",
}
_PATHS = {"ntk-plus": ("ntk", "less"), "ntk-loss": ("less",)}


def _register(name: str) -> type:
    cls = type(f"{name.title().replace('-', '')}Selector", (NtkPlusSelector,), {"__module__": __name__, "__doc__": _SUMMARY[name]})
    return register_selector(
        name,
        cls,
        uses_model=True,
        uses_embeddings=True,
        options=_OPTIONS[name],
        cost=variant_cost,
        tasks=(VARIANT_SCORE,),
        paths=_PATHS.get(name, ("ntk",)),
        summary=_SUMMARY[name],
    )


#: the variants' own options and the selection rules' (ntkselect.selection.ntk_rules): what ignored_options checks
VARIANT_OPTIONS = (
    "kernel",
    "probes",
    "normalise",
    "diverse",
    "diversity_lambda",
    "ensemble",
    "checkpoints",
    "cosine",
    "weighted_vote",
    "vote_weight",
    "features",
    "aggregate",
    "feature_dim",
    "whiten_shrinkage",
)


def ignored_options(cfg: SelectConfig) -> list[str]:
    """One line per variant option that ``cfg`` sets away from its default but its method does not
    use (``--method ntk --kernel trace`` runs the paper's kernel: say so rather than ignore it)."""
    from dataclasses import fields

    spec = find_selector(cfg.method)
    defaults = {f.name: f.default for f in fields(SelectConfig)}
    flag = lambda o: "--" + o.replace("_", "-")  # noqa: E731
    changed = [o for o in VARIANT_OPTIONS if getattr(cfg, o) != defaults[o]]
    out = [f"{flag(o)} is not read by --method {cfg.method}, so it has no effect" for o in changed if spec is None or o not in spec.options]
    needs = {
        "probes": ("kernel", "trace", "--kernel trace"),
        "vote_weight": ("weighted_vote", True, "--weighted-vote"),
    }
    if cfg.method == "ntk-plus":
        needs.update(diversity_lambda=("diverse", True, "--diverse"), checkpoints=("ensemble", True, "--ensemble"))
    if cfg.method == "ntk-rules":
        needs["whiten_shrinkage"] = ("features", "whiten", "--features whiten")
    if cfg.method in ("ntk-plus", "ntk-rules"):
        out += [f"{flag(o)} has no effect without {needs[o][2]}" for o in changed if o in needs and getattr(cfg, needs[o][0]) != needs[o][1]]
    return [f"ntkselect: note: {line}" for line in out]


#: the registered selector classes, by --method name
SELECTORS = {name: _register(name) for name in PRESETS}
