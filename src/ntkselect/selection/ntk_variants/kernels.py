"""The kernels of the NTK-Selector variants, all scored as a mean kernel through fixed vectors.

A kernel is a family of G per-example scalar objectives f_1 .. f_G, and

    Θ(x, x') = (1/G) Σ_g ⟨∇f_g(x), ∇f_g(x')⟩,     s_j = mean_i Θ(x_i, c_j) = (1/G) Σ_g ⟨ḡ_g, ∇f_g(c_j)⟩

with ḡ_g = mean_i ∇f_g(x_i) (the gradients are over the LoRA parameters, at the warmed-up
adapter). The mean over D is linear, so as in faithful stage 2 (:mod:`~ntkselect.selection.ntk.stage2`)
each candidate's score is G inner products with fixed vectors and no per-example gradient is
kept. The kernels (:class:`Kernel`):

* ``sum``: G = 1, f = (1/T) Σ_t Σ_k logit[t,k], the paper's Jacobian-free objective (faithful ntk);
* ``trace``: G = R Rademacher sign vectors ε_r ∈ {±1}^V over the vocabulary and
  f_r = (1/T) Σ_t ε_r·logit_t = (1/T) Σ_t h_t·(Wᵀε_r)·c + ε_r·b·c (c the head's logit scale): vocabulary-free,
  and since E[ε_r ε_rᵀ] = I, Θ is an unbiased (Hutchinson) estimate of the trace kernel
  Σ_k ⟨∇f_k(x), ∇f_k(x')⟩ of the V outputs f_k = (1/T) Σ_t logit[t,k] (a soft-capped head is not
  linear in h: there ε_r·logits runs through the real head in vocabulary chunks, as stage 2's sum does);
* ``loss``: G = 1, f = the example's mean negative log-likelihood over its trained tokens
  (:func:`~ntkselect.training.warmup.per_example_loss`: logit t-1 predicts token t); no Adam.

The diagonal Θ(c, c) = (1/G) Σ_g ‖∇f_g(c)‖² comes from the same pass: per layer the LoRA
gradient of each example is formed from the hooks' rank-r factors (dA = s·(Bᵀg)ᵀx, dB = s·g(Ax)ᵀ,
one layer at a time, as it is reduced) and only its squared norm is kept (:class:`RowHooks`).

Implementation: the G objectives of an example are G rows of the batch (row = example · G + g),
so one batched forward + backward computes all of them with the existing batching, padding
masks and out-of-memory retries (:func:`~ntkselect.selection.ntk.stage2.backward_batches`);
the cost is G forward + backward passes of each example.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ntkselect.errors import NtkSelectError
from ntkselect.grads.fused import FusedLoraGradients, lora_parameters
from ntkselect.grads.projection import AbstractProjector, make_projector
from ntkselect.model.heads import Head, lm_head
from ntkselect.model.lm import final_hidden, summed_logits
from ntkselect.model.runtime import Runtime
from ntkselect.progress import Progress
from ntkselect.runs.shards import ShardTask, register_task
from ntkselect.selection.ntk.stage2 import backward_batches, projected_features
from ntkselect.selection.ntk_variants.ensemble import swapped_adapter
from ntkselect.training.warmup import per_example_loss

__all__ = [
    "KERNELS",
    "Kernel",
    "RowHooks",
    "probe_signs",
    "probe_head",
    "kernel_pass",
    "domain_vectors",
    "candidate_scores",
    "kernel_features",
    "VARIANT_SCORE",
    "VariantPayload",
]

KERNELS = ("sum", "trace", "loss")
#: a fixed tag mixed into the probes' seed, so the sign vectors are not the projection's signs
_PROBE_TAG = 0x7072


@dataclass(frozen=True)
class Kernel:
    """Which objectives: ``kind`` of :data:`KERNELS`; ``probes`` (R, for ``trace``) and the
    ``seed`` of their sign vectors."""

    kind: str = "sum"
    probes: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KERNELS:
            raise ValueError(f"kernel {self.kind!r}: use one of {', '.join(KERNELS)}")
        if self.probes < 1:
            raise ValueError(f"probes must be positive (got {self.probes})")

    @property
    def groups(self) -> int:
        """G, the objectives per example."""
        return self.probes if self.kind == "trace" else 1

    def rows(self, examples: Sequence) -> list:
        """Each example G times in a row: row i is example i // G with objective i % G."""
        G = self.groups
        return list(examples) if G == 1 else [e for e in examples for _ in range(G)]

    def describe(self) -> dict:
        out: dict = {"kind": self.kind}
        if self.kind == "trace":
            out.update(probes=self.probes, seed=self.seed, signs=f"numpy Philox key=(seed, {_PROBE_TAG:#x}), one row of V signs per probe")
        return out

    def objective(self, model):
        """``f(model, batch, head) -> (B,)``, each row's objective (its group: ``batch.index % G``)."""
        if self.kind == "sum":
            return summed_logits
        if self.kind == "loss":
            return per_example_loss
        head = lm_head(model).frozen()
        signs = probe_signs(head.module.weight.shape[0], self.probes, self.seed)
        G = self.groups
        if not head.linear:  # soft-capped: ε·logits through the real head, in vocabulary chunks
            return _capped_objective(head, signs, G)
        W, b = probe_head(model, signs)

        def probed(m, batch, head=None):
            h = final_hidden(m, batch)  # (B, L, d)
            g = batch.index.to(h.device) % G  # (B,) the probe of each row
            s = torch.einsum("bld,bd->bl", h.float(), W.to(h.device)[g]) + b.to(h.device)[g, None]  # (B, L) ε_g·logit_t
            mask = batch.target_mask
            return (s * mask).sum(1) / mask.sum(1).clamp_min(1.0)

        return probed


def _capped_objective(head: Head, signs: torch.Tensor, G: int):
    def probed(m, batch, _head=None):
        h = final_hidden(m, batch)  # (B, L, d)
        pos = batch.target_mask.bool()
        rows = pos.nonzero()[:, 0]  # (N,) the row of each trained position
        groups = (batch.index.to(h.device) % G)[rows]  # (N,) its probe
        s = _SignedCappedSums.apply(h[pos], head, signs.to(h.device), groups, _chunk(int(rows.numel())))  # (N,)
        total = torch.zeros(pos.shape[0], dtype=torch.float32, device=h.device).index_add(0, rows, s)
        return total / batch.target_mask.sum(1).clamp_min(1.0)

    return probed


def _chunk(n: int, chunk_bytes: int = 64 << 20) -> int:
    return max(256, chunk_bytes // (4 * max(1, n) * 4))


class _SignedCappedSums(torch.autograd.Function):
    """s_n = Σ_k ε_{g(n),k} post(h_n·w_k + b_k) for (N, d) h, in vocabulary chunks (as
    :func:`~ntkselect.model.heads.capped_sums`, with the probe's signs as weights); the forward
    pass also accumulates ds_n/dh_n = Σ_k ε_k post'(z_nk) w_k, so the backward pass is a product."""

    @staticmethod
    def forward(ctx, h, head: Head, signs, groups, chunk: int):
        W = head.module.weight.detach()
        b = head.module.bias.detach() if head.module.bias is not None else None
        hf = h.detach().float()
        total = torch.zeros(hf.shape[0], dtype=torch.float32, device=h.device)
        dh = torch.zeros_like(hf)
        with torch.autocast(h.device.type, enabled=False), torch.enable_grad():
            for k0 in range(0, W.shape[0], chunk):
                Wc = W[k0 : k0 + chunk].float()  # (c, d)
                z = (hf @ Wc.T).requires_grad_(True)  # (N, c)
                zb = z + b[k0 : k0 + chunk].float() if b is not None else z
                s = (head.post(zb) * signs[groups, k0 : k0 + chunk]).sum(-1)  # (N,)
                (dz,) = torch.autograd.grad(s.sum(), z)
                total += s.detach()
                dh += dz @ Wc
        ctx.save_for_backward(dh)
        return total

    @staticmethod
    def backward(ctx, g):
        (dh,) = ctx.saved_tensors
        return g.unsqueeze(-1) * dh, None, None, None, None


def probe_signs(vocab: int, probes: int, seed: int) -> torch.Tensor:
    """(R, V) float32 Rademacher signs, from the seed alone (any device, any batch size)."""
    rng = np.random.Generator(np.random.Philox(key=np.array([seed, _PROBE_TAG], dtype=np.uint64)))
    bits = rng.integers(0, 2, size=(probes, vocab), dtype=np.int8)
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float32))


def probe_head(model, signs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Wᵀε_r · c (R, d), ε_r·b · c (R,)) float32: ε_r·logit = h·(Wᵀε_r)c + ε_r·b c for a linear head
    (c the logit scale, :meth:`~ntkselect.model.heads.Head.factor`)."""
    head = lm_head(model).frozen()
    if not head.linear:
        raise NtkSelectError(f"{head.model_name} soft-caps its logits, so ε·logits is not linear in h (Kernel.objective sums it through the head)")
    c = head.factor()
    W = head.module.weight.detach().float().cpu()  # (V, d)
    Wp = (signs @ W) * c  # (R, d)
    bias = head.module.bias
    bp = (signs @ bias.detach().float().cpu()) * c if bias is not None else torch.zeros(signs.shape[0])
    return Wp, bp


class RowHooks(FusedLoraGradients):
    """The fused LoRA hooks (:class:`~ntkselect.grads.fused.FusedLoraGradients`), reducing each
    layer's per-example gradient as soon as it is complete, to what a variant needs:

    * ``sums``: {name: (G, numel)} Σ over the batch rows of each group (the domain's ḡ_g);
    * ``dots``: (B,) ⟨V_{group(b)}, g_b⟩ with one vector per group (the candidates' scores);
    * ``sqnorms``: (B,) ‖g_b‖² (the diagonal Θ(c, c)).

    A layer's per-example gradient is formed from its rank-r factors (B × its own size, one layer
    at a time, never the whole g) and summed over the layer's calls before it is reduced, so the
    norms are exact also for a layer called more than once. Call :meth:`set_rows` with each
    row's group before the forward pass and :meth:`results` after the backward pass."""

    def __init__(self, model, n_groups: int = 1, vecs: dict[str, torch.Tensor] | None = None, sums: bool = False, norms: bool = False):
        super().__init__(model)
        self.n_groups = n_groups
        self.vecs = {n: v.reshape(n_groups, -1).float() for n, v in vecs.items()} if vecs is not None else None  # {name: (G, numel)}
        self.want_sums, self.want_norms = sums, norms
        self._rows: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self._calls: dict[int, int] = {}
        self._seen: dict[int, int] = {}
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.dots: torch.Tensor | None = None
        self.sqnorms: torch.Tensor | None = None

    def clear(self) -> None:
        super().clear()
        if hasattr(self, "_calls"):
            self._reset()

    def stream(self, mode: str | None, vec=None) -> None:
        """The loop's stream mode only names the pass's memory cost: these hooks always reduce as above."""

    def set_rows(self, groups: torch.Tensor) -> None:
        self._rows = groups

    def _fused_hook(self, k: int):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = args[0].detach()
            self._calls[k] = self._calls.get(k, 0) + 1
            output.register_hook(lambda g: self._collect(k, x, g.detach()))

        return hook

    def _collect(self, k: int, x: torch.Tensor, g: torch.Tensor) -> None:
        per = self._reduce(k, x, g, "per_example")  # {A: (B, r, d_in), B: (B, d_out, r)}
        assert isinstance(per, dict)
        pend = self._pending.setdefault(k, {})
        for n, t in per.items():
            pend[n] = pend[n] + t if n in pend else t
        self._seen[k] = self._seen.get(k, 0) + 1
        if self._seen[k] == self._calls.get(k, 0):
            self._finish(k)

    def _finish(self, k: int) -> None:
        pend = self._pending.pop(k, None)
        if not pend:
            return
        rows = self._rows
        for n, t in pend.items():
            flat = t.reshape(t.shape[0], -1)  # (B, numel)
            if self.want_sums:
                if rows is None:
                    raise NtkSelectError("RowHooks: call set_rows() before the forward pass")
                acc = torch.zeros(self.n_groups, flat.shape[1], dtype=torch.float32, device=flat.device).index_add_(0, rows, flat)
                self.sums[n] = self.sums[n] + acc if n in self.sums else acc
            if self.vecs is not None:
                if rows is None:
                    raise NtkSelectError("RowHooks: call set_rows() before the forward pass")
                v = self.vecs[n].to(flat.device)
                d = (flat * v[rows]).sum(1) if self.n_groups > 1 else flat @ v[0]
                self.dots = d if self.dots is None else self.dots + d
            if self.want_norms:
                q = flat.pow(2).sum(1)
                self.sqnorms = q if self.sqnorms is None else self.sqnorms + q

    def results(self) -> RowHooks:
        """After the backward pass: reduce the layers whose gradients are complete (and any whose
        other calls never reached the objective)."""
        for k in list(self._pending):
            self._finish(k)
        if self.want_sums:
            missing = [n for n, _ in self.params if n not in self.sums]
            if missing:
                raise NtkSelectError(f"no gradient reached {missing[0]}: the objective does not depend on it")
        return self


@dataclass
class KernelPass:
    sums: dict[str, torch.Tensor]  # {name: (G, *shape)} Σ_i ∇f_g(x_i)
    dots: np.ndarray | None  # (n, G) ⟨V_g, ∇f_g(x_i)⟩
    sqnorms: np.ndarray | None  # (n, G) ‖∇f_g(x_i)‖²
    tokens: int


def kernel_pass(
    model,
    examples: Sequence,
    rt: Runtime,
    kernel: Kernel,
    vecs: dict[str, torch.Tensor] | None = None,
    sums: bool = False,
    norms: bool = False,
    desc: str = "kernel",
    ids: Sequence[str] | None = None,
    weights: np.ndarray | None = None,
) -> KernelPass:
    """One batched forward + backward of every (example, objective) row, reduced in the hooks.

    ``weights`` (n,): example i's objectives are multiplied by weights[i], so its gradients (the
    sums, dots and norms) are w_i ∇f_g(x_i)."""
    G = kernel.groups
    rows = kernel.rows(examples)
    row_ids = [i for i in ids for _ in range(G)] if ids is not None else None
    dev_vecs = {n: v.to(rt.device) for n, v in vecs.items()} if vecs is not None else None
    hooks = RowHooks(model, G, dev_vecs, sums=sums, norms=norms)
    base = kernel.objective(model)

    w_rows = torch.as_tensor(np.repeat(np.asarray(weights, dtype=np.float32), G)) if weights is not None else None  # (n G,) each row's weight

    def objective(m, batch, head):
        hooks.set_rows((batch.index % G).to(rt.device))
        f = base(m, batch, head)  # (B,)
        return f if w_rows is None else f * w_rows[batch.index].to(f.device)

    kind = "less" if kernel.kind == "loss" else "sum"  # the measured cost closest to it (ntkselect.model.memory): x is kept per layer, as in "sum"
    shapes = {n: p.shape for n, p in lora_parameters(model)}
    total: dict[str, torch.Tensor] = {}
    dots = np.full(len(rows), np.nan) if vecs is not None else None
    sq = np.full(len(rows), np.nan) if norms else None
    for batch, h in backward_batches(model, rows, rt, desc, True, row_ids, stream=(kind,), objective=objective, hooks=lambda m, f: hooks, kind=kind):
        h.results()
        idx = batch.index.numpy()
        if sums:
            for n, t in h.sums.items():
                total[n] = total[n] + t if n in total else t
        if dots is not None:
            assert h.dots is not None
            dots[idx] = h.dots.double().cpu().numpy()
        if sq is not None:
            assert h.sqnorms is not None
            sq[idx] = h.sqnorms.double().cpu().numpy()
    for arr in (dots, sq):
        if arr is not None and not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr))[0]) // G
            name = f"example id {ids[bad]!r}" if ids is not None else f"example #{bad}"
            raise NtkSelectError(f"{desc}: {name} has a non-finite gradient; check its text or use --precision float32")
    out_sums = {n: total[n].reshape(G, *shapes[n]) for n in shapes} if sums else {}
    n = len(examples)
    return KernelPass(
        out_sums,
        dots.reshape(n, G) if dots is not None else None,
        sq.reshape(n, G) if sq is not None else None,
        G * sum(len(e.input_ids) for e in examples),
    )


def domain_vectors(
    model,
    domain: Sequence,
    rt: Runtime,
    kernel: Kernel,
    proj_dim: int = 0,
    seed: int = 0,
    ids: Sequence[str] | None = None,
    cosine: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """{name: (G, *shape)} v_g = φ*(φ(ḡ_g)), ḡ_g = mean_i ∇f_g(x_i) (ḡ_g itself for ``proj_dim = 0``),
    so that s_j = (1/G) Σ_g ⟨v_g, ∇f_g(c_j)⟩ = mean_i (1/G) Σ_g ⟨φ(∇f_g(x_i)), φ(∇f_g(c_j))⟩.

    ``cosine``: ḡ_g = mean_i ∇f_g(x_i) / √Θ(x_i, x_i) (Θ(x, x) = (1/G) Σ_g ‖∇f_g(x)‖², unprojected),
    so s_j = mean_i Θ(x_i, c_j) / √Θ(x_i, x_i): the domain side of the cosine kernel. Its norms
    take one more pass over D (the weights must be known before the weighted sum)."""
    t = time.perf_counter()
    weights, norms = None, None
    if cosine:
        sq = kernel_pass(model, domain, rt, kernel, norms=True, desc=f"{kernel.kind} kernel: domain gradient norms", ids=ids).sqnorms
        assert sq is not None
        norms = np.sqrt(sq.mean(1))  # (n,) √Θ(x_i, x_i)
        if not (norms > 0).all():
            bad = int(np.flatnonzero(~(norms > 0))[0])
            name = f"example id {ids[bad]!r}" if ids is not None else f"example #{bad}"
            raise NtkSelectError(f"{kernel.kind} kernel: domain {name} has a zero gradient, so its cosine is undefined; check its text or leave it out")
        weights = 1.0 / norms
    res = kernel_pass(model, domain, rt, kernel, sums=True, desc=f"{kernel.kind} kernel: domain gradients", ids=ids, weights=weights)
    gbar = {n: s / len(domain) for n, s in res.sums.items()}
    for n, g in gbar.items():
        if not torch.isfinite(g).all():
            raise NtkSelectError(f"{kernel.kind} kernel: the mean domain gradient is not finite in {n}; use --precision float32 or check the domain data")
    t_grad = time.perf_counter() - t
    t = time.perf_counter()
    dim = sum(math.prod(p.shape) for _, p in lora_parameters(model))
    projector = make_projector(dim, proj_dim, seed, device=rt.device)
    G = kernel.groups
    if projector.n_blocks:
        prog = Progress(f"{kernel.kind} kernel: projection to p={proj_dim} (blocks)", 2 * projector.n_blocks * G, enabled=rt.progress)
        per = [projector.gram_params({n: g[r] for n, g in gbar.items()}, tick=lambda: prog.update(1)) for r in range(G)]
        prog.close()
        vec = {n: torch.stack([p[n] for p in per]) for n in gbar}
    else:
        vec = gbar
    info = {
        "grad_dim": dim,
        "proj_dim": proj_dim,
        "projector": projector.describe(),
        "seconds": {"domain_gradients": t_grad, "projection": time.perf_counter() - t},
        "tokens": res.tokens * (2 if cosine else 1),
    }
    return vec, info


def candidate_scores(
    model, examples: Sequence, rt: Runtime, kernel: Kernel, vecs: dict[str, torch.Tensor], desc: str = "candidates", ids: Sequence[str] | None = None
) -> np.ndarray:
    """(n, 2) float64: [s_j, Θ(c_j, c_j)] = [(1/G) Σ_g ⟨v_g, ∇f_g(c_j)⟩, (1/G) Σ_g ‖∇f_g(c_j)‖²] (unprojected norms)."""
    res = kernel_pass(model, examples, rt, kernel, vecs=vecs, norms=True, desc=desc, ids=ids)
    assert res.dots is not None and res.sqnorms is not None
    return np.stack([res.dots.mean(1), res.sqnorms.mean(1)], axis=1)


def kernel_features(
    model, examples: Sequence, rt: Runtime, kernel: Kernel, projector: AbstractProjector, desc: str = "features", ids: Sequence[str] | None = None
) -> np.ndarray:
    """(n, G·p) float32: [φ(∇f_1(c)), ..., φ(∇f_G(c))] / √G, so that ⟨F(c), F(c')⟩ = (1/G) Σ_g ⟨φ∇f_g(c), φ∇f_g(c')⟩,
    the (projected) kernel itself; explicit features for the diversity rule."""
    G = kernel.groups
    rows = kernel.rows(examples)
    row_ids = [i for i in ids for _ in range(G)] if ids is not None else None
    f = projected_features(model, rows, projector, rt, objective=kernel.objective(model), desc=desc, ids=row_ids)  # (n G, p)
    return f.reshape(len(examples), G * projector.proj_dim) / np.float32(math.sqrt(G))


@dataclass
class VariantPayload:
    """The :data:`VARIANT_SCORE` task's input: the domain vectors (CPU), the kernel and, for a
    checkpoint ensemble, the checkpoint's adapter (swapped in for the shard, then restored)."""

    vecs: dict[str, torch.Tensor]  # {name: (G, *shape)}
    kernel: Kernel
    adapter: dict[str, torch.Tensor] | None = None  # a warm-up checkpoint's adapter to score at (None: the model's own)


def _variant_shard(model, examples, rt, payload: VariantPayload, ids=None, desc="ntk variant: candidates") -> np.ndarray:
    with swapped_adapter(model, payload.adapter):
        return candidate_scores(model, examples, rt, payload.kernel, payload.vecs, desc=desc, ids=ids)  # (n, 2) float64


#: the shard task of the variants' candidate scores and kernel diagonals
VARIANT_SCORE = register_task(ShardTask("ntk-variant-score", _variant_shard, VariantPayload))
