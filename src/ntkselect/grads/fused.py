"""Per-example gradients over the LoRA parameters, in one batched backward pass.

For a LoRA linear map y = W x + s·B(A x), the per-example gradient of any objective that is
a sum of per-example terms factorises over the tokens of that example:

    dL/dA_b = Σ_t (∂L/∂(A x_t))ᵀ x_t      # (r, d_in)
    dL/dB_b = Σ_t (∂L/∂(B a_t))ᵀ a_t      # (d_out, r), a_t = A x_t

so forward hooks that keep each LoRA sub-layer's input, and tensor hooks that keep the
gradient of its output, give every example's gradient from one backward pass of the summed
objective (examples do not interact in a causal LM with padding masked). The factors are
either materialised per example (:meth:`LoraGradientHooks.per_example`) or contracted
against a fixed vector without ever forming the gradient (:meth:`LoraGradientHooks.dot`),
which is what mean-kernel scoring needs.

Reductions are done in float32 even when the forward pass runs under bfloat16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ntkselect.errors import NtkSelectError

__all__ = ["LoraGradientHooks", "FusedLoraGradients", "gradient_hooks", "lora_parameters", "flatten_grads", "unflatten_grads", "merged_weight"]


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters, in registration order: this order defines the layout of
    the flattened gradient vector (and so of the projection)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _as_btd(t: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """A layer's input or output gradient as (B, T, d): some models (OPT, Qwen2-MoE's shared
    expert) flatten the batch to (B·T, d) before a linear layer. A layer that sees another
    number of rows (an MoE expert sees only the tokens routed to it) cannot give per-example
    gradients from its factors."""
    if mask is None:
        if t.dim() == 3:
            return t
        raise NtkSelectError(f"{name}: a 2-D layer input needs the batch's mask: call set_mask() before the forward pass")
    B, T = mask.shape[0], mask.shape[1]
    if t.dim() == 3 and t.shape[0] == B and t.shape[1] == T:
        return t
    if t.dim() == 2 and t.shape[0] == B * T:
        return t.reshape(B, T, t.shape[1])
    raise NtkSelectError(
        f"{name}: the layer sees inputs of shape {tuple(t.shape)} for a batch of {B} x {T} tokens (an MoE expert sees only "
        "the tokens routed to it); per-example gradients need layers that see every token: leave it out of --lora-target-modules"
    )


@dataclass
class _Site:
    module: nn.Linear
    name: str = ""
    params: list[tuple[str, str]] = field(default_factory=list)  # (param name, "weight"|"bias")
    inputs: list[torch.Tensor] = field(default_factory=list)  # each (B, T, d_in)
    grads: list[torch.Tensor | None] = field(default_factory=list)  # each (B, T, d_out)


class LoraGradientHooks:
    """Context manager capturing per-example gradient factors of every trainable linear layer.

    Usage::

        with LoraGradientHooks(model) as hooks:
            hooks.set_mask(batch.attention_mask)
            objective(model, batch).sum().backward()
            g = hooks.per_example()          # {name: (B, *param.shape)}
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = lora_parameters(model)
        if not self.params:
            raise NtkSelectError("the model has no trainable (LoRA) parameters: add a LoRA adapter before computing gradients")
        self.sites: dict[str, _Site] = {}
        for name, _p in self.params:
            mod_name, _, attr = name.rpartition(".")
            module = model.get_submodule(mod_name)
            if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
                raise NtkSelectError(
                    f"trainable parameter {name} is not a weight or bias of a linear LoRA layer; "
                    "only plain LoRA on linear layers is supported (no DoRA, embedding or conv adapters)"
                )
            self.sites.setdefault(mod_name, _Site(module, mod_name)).params.append((name, attr))
        self._handles: list = []
        self._mask: torch.Tensor | None = None

    # -- capture -------------------------------------------------------------------------
    def __enter__(self) -> LoraGradientHooks:
        for site in self.sites.values():
            self._handles.append(site.module.register_forward_hook(self._make_hook(site)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def _make_hook(self, site: _Site):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            site.inputs.append(args[0].detach())
            site.grads.append(None)
            k = len(site.grads) - 1

            def keep_grad(g, site=site, k=k):
                site.grads[k] = g.detach()

            output.register_hook(keep_grad)

        return hook

    def stream(self, mode: str | None, vec: dict[str, torch.Tensor] | None = None) -> None:
        """Accepted for interface parity with :class:`FusedLoraGradients`; this reference path
        always keeps the factors until the results are asked for."""

    def set_mask(self, attention_mask: torch.Tensor) -> None:
        """Zero the factors at padding positions: pad rows may hold junk activations."""
        self._mask = attention_mask.bool().unsqueeze(-1)  # (B, T, 1)

    def clear(self) -> None:
        for site in self.sites.values():
            site.inputs.clear()
            site.grads.clear()

    def _factors(self, site: _Site):
        # (B, T, d_in), (B, T, d_out) pairs in float32, one per call of the layer
        for x, g in zip(site.inputs, site.grads):
            if g is None:  # the output did not reach the objective
                continue
            x, g = _as_btd(x, self._mask, site.name).float(), _as_btd(g, self._mask, site.name).float()
            if self._mask is not None:
                x = x.masked_fill(~self._mask, 0.0)
                g = g.masked_fill(~self._mask, 0.0)
            yield x, g

    # -- results -------------------------------------------------------------------------
    def per_example(self) -> dict[str, torch.Tensor]:
        """{param name: (B, *param.shape)} float32 per-example gradients."""
        return self._ordered(self._grads(per_example=True))

    def batch_sum(self) -> dict[str, torch.Tensor]:
        """{name: param-shaped} Σ_b g_b, without forming the per-example gradients."""
        return self._ordered(self._grads(per_example=False))

    def _grads(self, per_example: bool) -> dict[str, torch.Tensor]:
        w_eq, b_dims = ("bto,bti->boi", 1) if per_example else ("bto,bti->oi", (0, 1))
        out: dict[str, torch.Tensor] = {}
        for site in self.sites.values():
            for x, g in self._factors(site):
                for name, attr in site.params:
                    val = torch.einsum(w_eq, g, x) if attr == "weight" else g.sum(b_dims)
                    out[name] = out[name] + val if name in out else val
        return out

    def _ordered(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n, _ in self.params if n not in out]
        if missing:
            raise NtkSelectError(f"no gradient reached {missing[0]}: the objective does not depend on it")
        return {n: out[n] for n, _ in self.params}

    def dot(self, vec: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) float32: ⟨vec, g_b⟩ for every example b, without forming g_b.

        ⟨V, Σ_t g_t x_tᵀ⟩ = Σ_t g_tᵀ V x_t. Each site is reduced to its rank-r side first
        (x V̄ᵀ for lora_A, g V for lora_B), so the cost is one (B·T, d) × (d, r) product per
        site, and only (B, T) per-token terms are masked."""
        total = None
        for site in self.sites.values():
            for x, g in zip(site.inputs, site.grads):
                if g is None:
                    continue
                x, g = _as_btd(x, self._mask, site.name), _as_btd(g, self._mask, site.name)
                for name, attr in site.params:
                    v = vec[name].float()
                    if attr == "bias":
                        tok = g.float() @ v  # (B, T)
                    elif v.shape[0] <= v.shape[1]:  # out <= in: reduce x to the out side
                        tok = ((x.float() @ v.T) * g.float()).sum(-1)  # (B, T)
                    else:
                        tok = ((g.float() @ v) * x.float()).sum(-1)  # (B, T)
                    if self._mask is not None:  # where(), not a product: junk at pads may be inf
                        tok = tok.masked_fill(~self._mask[..., 0], 0.0)
                    s = tok.sum(1)
                    total = s if total is None else total + s
        if total is None:
            raise NtkSelectError("no gradient was captured: run the backward pass inside the hooks' context")
        return total


def flatten_grads(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """{name: (B, *shape)} -> (B, D) in the given parameter order (row-major per parameter)."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)


def unflatten_grads(flat: torch.Tensor, shapes: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """(D,) -> {name: shape} in the given order (inverse of :func:`flatten_grads` for one vector)."""
    out, off = {}, 0
    for name, shape in shapes:
        n = int(torch.Size(shape).numel())
        out[name] = flat[off : off + n].reshape(shape)
        off += n
    if off != flat.numel():
        raise ValueError(f"vector has {flat.numel()} entries, parameters need {off}")
    return out


class _FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W = W₀ + s·B A merged once (:meth:`FusedLoraGradients.__enter__`) and
    treated as a constant.

    One matmul per layer instead of peft's three plus the elementwise scale and add, and the
    backward computes only the input gradient (the LoRA parameters' own gradients come from
    the hooks' factors). W is held once per stage in the frozen weights' dtype; nothing of x is
    saved, so activation memory stays that of the frozen model."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor):
        # ``anchor`` (the layer's LoRA A) is not used: as an input that requires grad it makes the
        # output part of the graph even where x does not require grad (the first layer's input)
        ctx.save_for_backward(weight)
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):  # runs outside autocast: match g's dtype explicitly
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return g @ weight.to(g.dtype), None, None, None


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, transposed: bool = False) -> torch.Tensor:
    """(d_out, d_in) W₀ + s·B A, summed in float32 and rounded once to W₀'s dtype. ``transposed``:
    W₀ is stored (in, out), as in GPT-2's ``Conv1D``."""
    with torch.no_grad():
        w = weight.T if transposed else weight
        return (w.float() + scale * (B.float() @ A.float())).to(weight.dtype)


def _base_kind(base: nn.Module) -> str | None:
    """ "linear" (nn.Linear and subclasses such as Falcon's), "conv1d" (GPT-2's transposed
    linear layer), or None for a layer the fused path cannot run."""
    if isinstance(base, nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return "conv1d" if isinstance(base, Conv1D) else None


def _unsupported_layer(mod_name: str, module: Any, adapter: str) -> str | None:  # a peft LoraLayer
    """Why the fused path cannot run this LoRA layer, or None."""
    kind = type(module).__name__
    if kind == "ParamWrapper" or not hasattr(module, "get_base_layer"):
        return (
            f"{mod_name}: LoRA on a parameter tensor (peft target_parameters: MoE experts or routers) is not supported; "
            "per-example gradients need LoRA on linear layers that see every token: leave the experts and routers out of --lora-target-modules"
        )
    if getattr(module, "lora_variant", {}).get(adapter) is not None or getattr(module, "use_dora", {}).get(adapter):
        return f"{mod_name}: only plain LoRA is supported (no DoRA or other variants)"
    base = module.get_base_layer()
    if _base_kind(base) is None:
        return f"{mod_name}: LoRA on {type(base).__name__} layers is not supported (only on linear and Conv1D layers); leave it out of --lora-target-modules"
    if module.lora_B[adapter].bias is not None:
        return f"{mod_name}: LoRA with a bias on B is not supported by the fused path"
    return None


class FusedLoraGradients(LoraGradientHooks):
    """The same per-example gradients as :class:`LoraGradientHooks`, at close to the frozen
    model's cost.

    Inside the context every LoRA linear layer runs as one fused matmul with W + sBA, and a hook
    on the layer keeps its input x (B, T, d_in) and output gradient g (B, T, d_out). For
    y = Wx + sB(Ax):

        dA_b = s Σ_t (Bᵀ g_t) x_tᵀ,    dB_b = s Σ_t g_t (A x_t)ᵀ,

    so both per-example gradients and their inner products with a fixed vector need only
    rank-r products of x and g. Dropout is not applied (g is the deterministic network's
    gradient), and only plain LoRA (no DoRA or other variants) on linear or Conv1D layers is
    supported. A layer that flattens the batch to (B·T, d) is handled (x and g are viewed
    as (B, T, d) with the mask's shape)."""

    def __init__(self, model: nn.Module):
        from peft.tuners.lora import LoraLayer

        self.model = model
        self.params = lora_parameters(model)
        if not self.params:
            raise NtkSelectError("the model has no trainable (LoRA) parameters: add a LoRA adapter before computing gradients")
        wanted = {n for n, _ in self.params}
        self.layers: list[tuple[Any, str, str, str]] = []  # (peft LoraLayer, adapter, name of A, name of B)
        covered: set[str] = set()
        for mod_name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in module.active_adapters:
                if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                    continue
                why = _unsupported_layer(mod_name, module, adapter)
                if why:
                    raise NtkSelectError(why)
                a, b = f"{mod_name}.lora_A.{adapter}.weight", f"{mod_name}.lora_B.{adapter}.weight"
                self.layers.append((module, adapter, a, b))
                covered |= {a, b}
        if covered != wanted:
            extra = sorted(wanted - covered)[:1] or sorted(covered - wanted)[:1]
            raise NtkSelectError(
                f"trainable parameter {extra[0]} is not a plain LoRA A/B matrix of a linear layer; only plain LoRA on linear "
                "(or Conv1D) layers is supported: leave other modules out of --lora-target-modules and keep the rest frozen"
            )
        self._handles = []
        self._saved: dict[int, Callable] = {}  # each layer's own forward, while the fused one is in place
        self._mask = None
        self._factors_store: dict[int, list] = {}
        self._stream: tuple | None = None
        self._acc = None

    def __enter__(self) -> FusedLoraGradients:
        # A and B are constants while the context is open (stages 1 and 2; one warm-up step), so
        # each layer's W + sBA is merged here, once, not in every forward and backward pass
        for k, (module, adapter, _, _) in enumerate(self.layers):
            self._saved[k] = module.forward
            module.forward = self._fused_forward(module, adapter)
            self._factors_store[k] = []
            self._handles.append(module.register_forward_hook(self._fused_hook(k)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for k, (module, *_rest) in enumerate(self.layers):
            module.forward = self._saved[k]
        self._saved.clear()
        self.clear()

    @staticmethod
    def _fused_forward(module, adapter):
        base = module.get_base_layer()
        A, B, s = module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])
        W = merged_weight(base.weight, A, B, s, _base_kind(base) == "conv1d")  # (d_out, d_in), freed on exit
        bias = base.bias

        def forward(x, *args, **kwargs):
            return _FrozenLinear.apply(x, W, bias, A)

        return forward

    def _fused_hook(self, k: int):
        store = self._factors_store

        def hook(module, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = args[0].detach()
            if self._stream is not None:
                mode, vec = self._stream
                if mode == "dot":
                    # keep only x's rank-2r image (B, T, 2r), not x (B, T, d_in): the fused
                    # layer itself saves no activation, so this is all it adds to the graph
                    right = self._right(k, x, vec)
                    output.register_hook(lambda g: self._accumulate(self._reduce(k, None, g.detach(), mode, vec, right)))
                else:
                    # reduce as soon as this layer's output gradient exists
                    output.register_hook(lambda g: self._accumulate(self._reduce(k, x, g.detach(), mode, vec)))
                return
            entry = [x, None]
            store[k].append(entry)

            def keep_grad(g):
                entry[1] = g.detach()

            output.register_hook(keep_grad)

        return hook

    def stream(self, mode: str | None, vec: dict[str, torch.Tensor] | None = None) -> None:
        """Before a backward pass: reduce each layer's factors during the pass ("dot" against
        ``vec``, or "sum" over the batch) instead of keeping them; None keeps them (for
        :meth:`per_example`). Memory is then that of a plain backward pass."""
        self._stream = None if mode is None else (mode, vec)
        self._acc = None

    def _accumulate(self, val) -> None:
        if self._acc is None:
            self._acc = val
        elif isinstance(val, dict):
            for n, t in val.items():
                self._acc[n] = self._acc[n] + t if n in self._acc else t
        else:
            self._acc = self._acc + val

    def clear(self) -> None:
        for v in self._factors_store.values():
            v.clear()
        self._acc = None

    @staticmethod
    def _mm(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # (B, T, d) x (d, k) -> (B, T, k) float32. A bfloat16 activation stays bfloat16 in the
        # product (the forward pass already rounded it; a float32 copy of every activation would
        # cost more than the backward pass), the small k-wide result is float32 from here on.
        return (t @ m.to(t.dtype)).float()

    def _right(self, k: int, x: torch.Tensor, vec) -> torch.Tensor:
        """(B, T, 2r) [V_A x_t, A x_t]: the x side of the dot product of layer k."""
        module, adapter, na, _ = self.layers[k]
        A = module.lora_A[adapter].weight.detach().float()  # (r, d_in)
        return self._mm(x, torch.cat([vec[na].float(), A], dim=0).T)

    def _reduce(self, k: int, x: torch.Tensor | None, g: torch.Tensor, mode: str, vec=None, right: torch.Tensor | None = None):
        """One call of layer k: its (B,) dot with ``vec``, or {name: Σ_b g_b} / {name: g_b}."""
        module, adapter, na, nb = self.layers[k]
        A = module.lora_A[adapter].weight.detach().float()  # (r, d_in)
        B = module.lora_B[adapter].weight.detach().float()  # (d_out, r)
        s = float(module.scaling[adapter])
        mask = self._mask  # (B, T, 1) bool
        name = na.rsplit(".lora_A.", 1)[0]
        g = _as_btd(g, mask, name)  # (B, T, d_out), also where the model flattened the batch
        x = _as_btd(x, mask, name) if x is not None else None
        right = _as_btd(right, mask, name) if right is not None else None
        if mode == "dot":
            # ⟨V, g_b⟩ = s Σ_t [(Bᵀ g_t)·(V_A x_t) + (V_Bᵀ g_t)·(A x_t)]
            left = self._mm(g, torch.cat([B, vec[nb].float()], dim=1))  # (B, T, 2r)
            if right is None:
                assert x is not None, "the dot product needs x or its image"
                right = self._right(k, x, vec)  # (B, T, 2r)
            tok = (left * right).sum(-1)  # (B, T)
            if mask is not None:  # where(), not a product: junk at pads may be inf
                tok = tok.masked_fill(~mask[..., 0], 0.0)
            return s * tok.sum(1)
        # dA = s Σ_t (Bᵀ g_t) x_tᵀ, dB = s Σ_t g_t (A x_t)ᵀ, per example or summed over the batch
        a_eq, b_eq = ("btr,bti->bri", "bto,btr->bor") if mode == "per_example" else ("btr,bti->ri", "bto,btr->or")
        assert x is not None, "the gradient modes reduce x"
        x, g = x.float(), g.float()
        if mask is not None:
            x, g = x.masked_fill(~mask, 0.0), g.masked_fill(~mask, 0.0)
        return {na: s * torch.einsum(a_eq, g @ B, x), nb: s * torch.einsum(b_eq, g, x @ A.T)}

    def _stored(self, mode: str, vec=None):
        acc = None
        for k, calls in self._factors_store.items():
            for x, g in calls:
                if g is None:  # the output did not reach the objective
                    continue
                val = self._reduce(k, x, g, mode, vec)
                if acc is None:
                    acc = dict(val) if isinstance(val, dict) else val
                elif isinstance(val, dict):
                    for n, t in val.items():
                        acc[n] = acc[n] + t if n in acc else t
                else:
                    acc = acc + val
        return acc

    def _grads(self, per_example: bool) -> dict[str, torch.Tensor]:
        mode = "per_example" if per_example else "sum"
        if self._stream is not None and self._stream[0] == mode:
            return self._acc or {}
        return self._stored(mode) or {}

    def dot(self, vec: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) ⟨vec, g_b⟩, from the reduction done during the backward pass when
        ``stream("dot", vec)`` was set, else from the stored factors."""
        total = self._acc if self._stream is not None and self._stream[0] == "dot" else self._stored("dot", vec)
        if total is None:
            raise NtkSelectError("no gradient was captured: run the backward pass inside the hooks' context")
        return total


def gradient_hooks(model: nn.Module, fused: bool = True) -> LoraGradientHooks:
    """The fused path (default) or hooks on peft's own LoRA sub-layers (the reference)."""
    return FusedLoraGradients(model) if fused else LoraGradientHooks(model)
