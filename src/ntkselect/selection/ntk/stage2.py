"""Stage 2: Jacobian-free NTK scores.

g(x) = ∇_LoRA f(x), f(x) = (1/T) Σ_t Σ_k logit[t,k](x); Θ̃(x, x') = ⟨φ(g(x)), φ(g(x'))⟩ with
the seeded Rademacher projection φ (or the identity when ``proj_dim = 0``), and
s_j = mean_i Θ̃(x_i, c_j).

Both the mean over D and the projection are linear, so

    s_j = ⟨φ(ḡ_D), φ(g(c_j))⟩ = ⟨v, g(c_j)⟩,   ḡ_D = mean_i g(x_i),   v = φ*(φ(ḡ_D)),

and the score of every candidate is one inner product with a fixed vector v. Stage 2 therefore
(1) accumulates ḡ_D from batched per-example gradients, (2) computes v with two passes over
the projection blocks, and (3) scores candidates in batches by contracting the per-token
gradient factors inside the LoRA hooks against v, never forming a per-example gradient or the
domain × candidate kernel. The result is the paper's projected mean-kernel score, not an
approximation of it; :func:`projected_features` computes φ(g) explicitly for tests and for
per-pair kernels.

:func:`run_stage2` is stage 2 end to end, the one implementation ``ntkselect select``, the
Python API and the tests share. Given a :class:`~ntkselect.runs.shards.Sharding` (what a run
passes) v is kept on disk with a completion marker and the candidates are scored shard by
shard (the :data:`SCORE` shard task) on the run's executor, each shard resumable; without one,
everything runs here, in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ntkselect.data.batching import collate, make_batches
from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_open, atomic_write_json
from ntkselect.grads.fused import flatten_grads, gradient_hooks, lora_parameters
from ntkselect.grads.projection import AbstractProjector, chunk_bytes_for, make_projector
from ntkselect.model.lm import summed_head, summed_logits
from ntkselect.model.memory import gradient_pass
from ntkselect.model.runtime import Runtime, is_oom
from ntkselect.progress import Progress
from ntkselect.runs.shards import Sharding, ShardTask, digest, register_task
from ntkselect.training.warmup import per_example_loss

__all__ = [
    "Stage2Result",
    "sum_pass",
    "dot_pass",
    "backward_batches",
    "per_example_gradients",
    "domain_mean_gradient",
    "domain_vector",
    "score_against",
    "projected_features",
    "run_stage2",
    "SCORE",
    "ScorePayload",
]

logger = logging.getLogger(__name__)


@dataclass
class Stage2Result:
    scores: np.ndarray  # (n_candidates,) float64, in the order of the candidates given
    grad_dim: int
    proj_dim: int
    seconds: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    projector: dict | None = None
    resumed: bool = False  # v was read back from a finished earlier attempt (with a Sharding)


def _label(batch_pos: int, ids: Sequence[str] | None) -> str:
    return f"example id {ids[batch_pos]!r}" if ids is not None else f"example #{batch_pos}"


def _check_finite(f: torch.Tensor, batch, desc: str, ids: Sequence[str] | None = None) -> None:
    if not torch.isfinite(f).all():
        bad = int(batch.index[int((~torch.isfinite(f)).nonzero()[0, 0])])
        raise NtkSelectError(f"{desc}: {_label(bad, ids)} gives a non-finite summed logit; check its text or use --precision float32")


def backward_batches(
    model,
    examples,
    rt: Runtime,
    desc: str,
    fused: bool = True,
    ids: Sequence[str] | None = None,
    stream: tuple = (None,),
    objective=None,
    hooks=None,
    kind: str | None = None,
):
    """Yield (batch, hooks) after the backward pass of Σ_b f(x_b) for each batch.

    ``objective(model, batch, head) -> (B,)`` replaces f (the summed logits) by another
    per-example scalar, e.g. the loss for LESS; examples must not interact in it.
    ``hooks(model, fused)``, when given, makes the gradient hooks instead of
    :func:`~ntkselect.grads.fused.gradient_hooks` (a subclass that reduces differently), and
    ``kind`` names the measured memory cost of the pass (:mod:`ntkselect.model.memory`) instead
    of the one ``stream`` and ``objective`` imply.

    Batches are length-sorted and capped in examples and padded tokens. When a batch runs out
    of accelerator memory it is split in half and retried, and the smaller cap is kept for the
    rest of the run; results do not depend on the batch size, so nothing else changes."""
    model.eval()  # no dropout: g is the gradient of the deterministic network
    head = summed_head(model)
    prog = Progress(desc, len(examples), enabled=rt.progress)
    cap = rt.batch_size
    with backward_attention(model, rt):
        yield from _backward_loop(model, examples, rt, desc, fused, ids, stream, head, prog, cap, objective or summed_logits, hooks, kind)


@contextlib.contextmanager
def backward_attention(model, rt: Runtime):
    """On a CPU in bfloat16, PyTorch's fused attention backward is the slowest op of stage 2
    (a quarter of its time for SmolLM2); plain matmul attention gives the same gradients ~20%
    faster, so use it while gradients are taken. Elsewhere nothing changes."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(lm.config, "_attn_implementation", None)
    switch = rt.device.type == "cpu" and rt.dtype == torch.bfloat16 and before == "sdpa" and hasattr(lm, "set_attn_implementation")
    if switch:
        try:
            lm.set_attn_implementation("eager")
        except (ValueError, ImportError):
            switch = False
    try:
        yield
    finally:
        if switch:
            lm.set_attn_implementation(before)


def sum_pass(model, batch, rt: Runtime, tracker) -> None:
    """The domain gradients' pass on one batch (summed logits, gradients summed over the batch),
    ``tracker`` around it: the "sum" kind of :func:`~ntkselect.model.memory.measure_costs`."""
    gradient_pass(model, batch, rt, tracker, summed_logits, "sum", backward_attention(model, rt))


def dot_pass(model, batch, rt: Runtime, tracker) -> None:
    """The candidates' pass on one batch (summed logits, per-example dot products with the domain
    vector), ``tracker`` around it: the "dot" kind of :func:`~ntkselect.model.memory.measure_costs`."""
    gradient_pass(model, batch, rt, tracker, summed_logits, "dot", backward_attention(model, rt))


def _pass_kind(stream: tuple, objective) -> str:
    """Which measured cost (:mod:`ntkselect.model.memory`) a backward pass has."""
    if stream[0] in ("sum", "dot"):
        return stream[0]
    return "less" if objective is per_example_loss else "per_example"


def _backward_loop(
    model, examples, rt: Runtime, desc: str, fused: bool, ids, stream: tuple, head, prog: Progress, cap: int, objective, make_hooks=None, kind=None
):
    # capped in examples, padded tokens and, with a measured memory cost, bytes (ntkselect.model.memory)
    pending = make_batches(
        [len(e.input_ids) for e in examples],
        rt.batch_size,
        rt.max_batch_tokens,
        fits=rt.fits(kind or _pass_kind(stream, objective)),
        trained=[sum(e.train_mask[1:]) for e in examples],
    )
    with (make_hooks or gradient_hooks)(model, fused) as hooks:
        while pending:
            idx = pending.pop(0)
            if len(idx) > cap:
                pending[:0] = [idx[i : i + cap] for i in range(0, len(idx), cap)]
                continue
            batch = collate([examples[i] for i in idx], idx, rt.pad_id, rt.padding_side).to(rt.device)
            hooks.clear()
            hooks.set_mask(batch.attention_mask)
            hooks.stream(*stream)  # reduce during the backward pass where the caller allows it
            try:
                with rt.autocast():
                    f = objective(model, batch, head)  # (B,)
                _check_finite(f, batch, desc, ids)
                # Σ_b f_b: examples do not interact, so each example's share of the gradient is its own
                f.sum().backward()
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_oom(err):
                    raise
                hooks.clear()
                del batch
                if rt.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(idx) == 1:
                    raise NtkSelectError(
                        f"{desc}: out of memory on a single example ({_label(idx[0], ids)}, {len(examples[idx[0]].input_ids)} tokens); lower --max-length"
                    ) from None
                cap = max(1, len(idx) // 2)
                logger.warning(f"{desc}: out of memory with {len(idx)} examples per batch; retrying with {cap}")
                pending.insert(0, idx)
                continue
            yield batch, hooks
            prog.update(len(batch.index), batch.n_tokens)
    for _, p in lora_parameters(model):
        p.grad = None
    prog.close()
    rt.last_batch_cap = cap


def _per_example(fused: bool) -> tuple:
    """Per-example gradients reduced layer by layer during the backward pass (the fused path):
    (B, D) at most, instead of every layer's per-token factors."""
    return ("per_example",) if fused else (None,)


def per_example_gradients(model, examples: Sequence, rt: Runtime, fused: bool = True, objective=None) -> torch.Tensor:
    """(n, D) float32 per-example gradients in input order (for tests and small sets)."""
    names = [n for n, _ in lora_parameters(model)]
    out: torch.Tensor | None = None
    for batch, hooks in backward_batches(model, examples, rt, "gradients", fused, objective=objective, stream=_per_example(fused)):
        g = flatten_grads(hooks.per_example(), names).cpu()  # (B, D)
        if out is None:
            out = torch.zeros(len(examples), g.shape[1])
        out[batch.index] = g
    if out is None:  # no batch ran: D (the gradient dimension) is only known from the first one
        raise ValueError("per-example gradients: no examples")
    return out


def domain_mean_gradient(model, examples: Sequence, rt: Runtime, fused: bool = True, ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """ḡ_D = mean_i g(x_i), {name: param-shaped float32 tensor}, summed over each batch from the
    hooks' factors (Σ_b g_b needs no per-example tensor)."""
    total: dict[str, torch.Tensor] = {}
    for _batch, hooks in backward_batches(model, examples, rt, "stage 2: domain gradients", fused, ids, stream=("sum",)):
        for name, g in hooks.batch_sum().items():
            total[name] = total[name] + g if name in total else g
    out = {n: total[n] / len(examples) for n, _ in lora_parameters(model)}
    for name, g in out.items():
        if not torch.isfinite(g).all():
            raise NtkSelectError(f"stage 2: the mean domain gradient is not finite in {name}; use --precision float32 or check the domain data")
    return out


def score_against(
    model,
    examples: Sequence,
    vec: dict[str, torch.Tensor],
    rt: Runtime,
    desc: str = "stage 2: candidates",
    fused: bool = True,
    ids: Sequence[str] | None = None,
) -> np.ndarray:
    """(n,) float64: ⟨vec, g(x)⟩ for every example, by contraction inside the hooks."""
    vec = {n: v.to(rt.device) for n, v in vec.items()}
    scores = np.full(len(examples), np.nan, dtype=np.float64)
    for batch, hooks in backward_batches(model, examples, rt, desc, fused, ids, stream=("dot", vec)):
        s = hooks.dot(vec).double().cpu().numpy()  # (B,)
        if not np.isfinite(s).all():
            bad = int(batch.index[int(np.flatnonzero(~np.isfinite(s))[0])])
            raise NtkSelectError(f"{desc}: {_label(bad, ids)} has a non-finite gradient; check its text or use --precision float32")
        scores[batch.index.numpy()] = s
    return scores


def projected_features(
    model,
    examples: Sequence,
    projector: AbstractProjector,
    rt: Runtime,
    fused: bool = True,
    out_path: str | Path | None = None,
    chunk_bytes: int = 1 << 30,
    objective=None,
    transform=None,
    desc: str = "stage 2: projected features",
    ids: Sequence[str] | None = None,
) -> np.ndarray:
    """(n, p) float32 φ(g(x)) for every example, in input order: the explicit route, for per-pair
    kernels, max-over-D aggregation and diagnostics.

    Per-example gradients are gathered into a chunk of at most ``chunk_bytes`` (on CUDA at
    least a quarter of the free memory: :func:`~ntkselect.grads.projection.chunk_bytes_for`) and
    projected together, so each pass over the projection blocks (generating them is the
    expensive part) is shared by the whole chunk. With ``out_path`` the features go to a
    disk-backed ``.npy``, so memory does not grow with the number of examples.

    ``objective`` replaces the summed logits (see :func:`backward_batches`); ``transform``
    maps each (B, D) block of flat gradients before projection (LESS's Adam preconditioning)."""
    names = [n for n, _ in lora_parameters(model)]
    dim, n = projector.dim, len(examples)
    shape = (n, projector.proj_dim)
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=shape) if out_path else np.zeros(shape, np.float32)
    cap = max(1, min(n, projector.chunk_rows(chunk_bytes_for(rt.device, chunk_bytes))))
    buf = torch.zeros(cap, dim, dtype=torch.float32, device=rt.device)  # (C, D)
    rows: list[int] = []

    def flush():
        if rows:
            out[np.asarray(rows)] = projector.project(buf[: len(rows)]).cpu().numpy()
            rows.clear()

    for batch, hooks in backward_batches(model, examples, rt, desc, fused, ids, objective=objective, stream=_per_example(fused)):
        g = flatten_grads(hooks.per_example(), names)  # (B, D)
        if transform is not None:
            g = transform(g)
        for j, i in enumerate(batch.index.tolist()):
            if len(rows) == cap:
                flush()
            buf[len(rows)] = g[j]
            rows.append(i)
    flush()
    if isinstance(out, np.memmap):
        out.flush()
    return out


def domain_vector(
    model, domain: Sequence, rt: Runtime, proj_dim: int = 0, seed: int = 0, fused: bool = True, domain_ids: Sequence[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """v with s_j = ⟨v, g(c_j)⟩: φ*(φ(ḡ_D)), which is ḡ_D itself for the exact kernel (``proj_dim = 0``)."""
    names_shapes = [(n, p.shape) for n, p in lora_parameters(model)]
    dim = sum(math.prod(s) for _, s in names_shapes)
    times: dict[str, float] = {}
    t = time.perf_counter()
    gbar = domain_mean_gradient(model, domain, rt, fused, domain_ids)
    times["domain_gradients"] = time.perf_counter() - t
    t = time.perf_counter()
    projector = make_projector(dim, proj_dim, seed, device=rt.device)
    prog = Progress(f"stage 2: projection to p={proj_dim} (blocks)", 2 * projector.n_blocks, enabled=rt.progress and projector.n_blocks > 0)
    vec = projector.gram_params(gbar, tick=lambda: prog.update(1))  # φ*(φ(ḡ_D))
    prog.close()
    times["projection"] = time.perf_counter() - t
    return vec, {"grad_dim": dim, "proj_dim": proj_dim, "projector": projector.describe(), "seconds": times, "tokens": sum(len(e.input_ids) for e in domain)}


@dataclass
class ScorePayload:
    """The :data:`SCORE` task's input: v, per parameter (CPU tensors travel to workers)."""

    vec: dict[str, torch.Tensor]
    fused: bool = True


def _score_shard(model, examples, rt, payload: ScorePayload, ids=None, desc="stage 2: candidates") -> np.ndarray:
    return score_against(model, examples, payload.vec, rt, desc=desc, fused=payload.fused, ids=ids)  # (n,) float64


#: the shard task of the candidates' scores
SCORE = register_task(ShardTask("score", _score_shard, ScorePayload))


def _kept_domain_vector(model, domain, rt, proj_dim, seed, fused, domain_ids, sharding: Sharding) -> tuple[dict, dict, bool]:
    """:func:`domain_vector`, kept in ``sharding``'s store with a completion marker: a rerun
    under the same key reads it back instead of computing it again."""
    vdir = sharding.store.root / "stage2"
    vkey = digest(sharding.key, "vector", proj_dim)
    marker = vdir / "vector.done"
    if marker.exists() and json.loads(marker.read_text()).get("key") == vkey:
        vec = torch.load(vdir / "vector.pt", map_location="cpu", weights_only=True)
        return vec, json.loads(marker.read_text())["info"], True
    vec, info = domain_vector(model, domain, rt, proj_dim, seed, fused, domain_ids)
    vec = {k: v.detach().cpu() for k, v in vec.items()}
    with atomic_open(vdir / "vector.pt", "wb", encoding=None) as f:
        torch.save(vec, f)
    atomic_write_json(marker, {"key": vkey, "info": info})
    return vec, info, False


def run_stage2(
    model,
    domain: Sequence,
    candidates: Sequence,
    rt: Runtime,
    proj_dim: int = 8192,
    seed: int = 0,
    fused: bool = True,
    domain_ids: Sequence[str] | None = None,
    candidate_ids: Sequence[str] | None = None,
    sharding: Sharding | None = None,
) -> Stage2Result:
    """Stage 2: s_j = mean_i ⟨φ(g(x_i)), φ(g(c_j))⟩ for every candidate c_j, in the order given.

    ``proj_dim = 0`` is the exact kernel. With ``sharding`` v and every shard of scores are kept
    in its store under its key (a rerun resumes) and the candidates are scored on its executor."""
    t = time.perf_counter()
    if sharding is None:
        vec, info = domain_vector(model, domain, rt, proj_dim, seed, fused, domain_ids)
        resumed = False
    else:
        vec, info, resumed = _kept_domain_vector(model, domain, rt, proj_dim, seed, fused, domain_ids, sharding)
    t_vec = time.perf_counter() - t
    t = time.perf_counter()
    if sharding is None:
        scores = score_against(model, candidates, vec, rt, fused=fused, ids=candidate_ids)
    else:
        parts = sharding.run("stage2", SCORE, candidates, ScorePayload(vec, fused), "stage 2: candidates", candidate_ids, "score", proj_dim, candidate_ids)
        scores = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])
    return Stage2Result(
        scores=scores,
        grad_dim=info["grad_dim"],
        proj_dim=proj_dim,
        seconds={**info["seconds"], "vector_total": t_vec, "candidates": time.perf_counter() - t},
        tokens={"domain": info["tokens"], "candidates": sum(len(e.input_ids) for e in candidates)},
        projector=info["projector"],
        resumed=resumed,
    )
