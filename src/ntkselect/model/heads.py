"""The model's own logits from its final hidden states, and the summed logits stage 2 needs.

Most causal LMs compute ``logits = lm_head(h)``; some post-process them (Gemma 2/3 soft-cap
them, ``cap · tanh(z / cap)``; Cohere multiplies by ``logit_scale``; Granite divides by
``logits_scaling``). :func:`lm_head` reads which from the configuration, and
:meth:`Head.logits` applies it, so every loss is computed from the logits the model itself
would give (the preflight checks that on a tiny batch, for any model).

Stage 2 needs f = Σ_k logit_k at the trained positions. For a linear head (post-processing
that is at most a scale) this is h · Σ_k w_k, one d-vector: :meth:`Head.summed` gives it.
Soft-capping is not linear, so the sum runs through the real head in vocabulary chunks
(:func:`capped_sums`): the cost of one LM-head pass per scored position, with memory of one
chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ntkselect.errors import NtkSelectError

__all__ = ["Head", "lm_head", "capped_sums", "head_notice"]

# model types whose head output is multiplied (not divided) by ``config.logits_scaling``
_MULTIPLY_LOGITS_SCALING = ("hyperclovax",)


def _lm(model: nn.Module) -> nn.Module:
    base = getattr(model, "get_base_model", None)  # a peft model
    return base() if base is not None else model


def _text_config(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@dataclass(frozen=True)
class Head:
    """The LM head and the post-processing the model applies to its output."""

    module: nn.Linear  # the output embeddings
    model_name: str
    scale: float = 1.0  # logits = head(h) * scale ...
    divide: float | None = None  # ... or head(h) / divide (Granite's logits_scaling)
    softcap: float | None = None  # then cap * tanh(logits / cap)

    @property
    def linear(self) -> bool:
        """Σ_k logit_k is linear in h (no soft-capping)."""
        return not self.softcap

    def post(self, z: torch.Tensor) -> torch.Tensor:
        """The model's post-processing of raw head outputs z = h·w_k + b_k, in the model's order."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.divide is not None:
            z = z / self.divide
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, V) the model's logits at the (N, d) hidden states given (run it on the positions
        needed only: no (B, L, V) tensor)."""
        return self.post(self.module(h))

    def frozen(self) -> Head:
        """The head, checked to be frozen (the stages take gradients of the LoRA parameters only)."""
        if self.module.weight.requires_grad:
            raise NtkSelectError("the LM head is trainable (adapted by LoRA?); exclude lm_head from --lora-target-modules")
        return self

    def factor(self) -> float:
        """The linear factor of the post-processing (scale, or 1/divide)."""
        return self.scale / self.divide if self.divide is not None else self.scale

    def summed(self) -> tuple[torch.Tensor, float]:
        """(w̄ (d,) float32, b̄): Σ_k logit_k = h·w̄ + b̄ for a linear head."""
        if not self.linear:
            raise NtkSelectError(f"{self.model_name} soft-caps its logits, so Σ_k logit_k is not linear in the hidden state")
        w = self.module.weight.detach().float()
        if self.divide is not None:
            wbar = w.sum(0) / self.divide
            bbar = float(self.module.bias.detach().float().sum()) / self.divide if self.module.bias is not None else 0.0
            return wbar * self.scale, bbar * self.scale
        wbar = w.sum(0) * self.scale  # (d,)
        bbar = float(self.module.bias.detach().float().sum()) * self.scale if self.module.bias is not None else 0.0
        return wbar, bbar


def lm_head(model: nn.Module) -> Head:
    """The model's LM head and its logit post-processing (checked to be a linear layer)."""
    lm = _lm(model)
    name = type(lm).__name__
    get = getattr(lm, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        raise NtkSelectError(f"{name} has no LM head (get_output_embeddings() is None); pass a Hugging Face causal LM (…ForCausalLM)")
    if not isinstance(head, nn.Linear):
        raise NtkSelectError(f"the LM head of {name} is {type(head).__name__}, not a linear layer; ntkselect needs a causal LM whose head is a linear map")
    cfg = _text_config(getattr(lm, "config", None))
    model_type = str(getattr(getattr(lm, "config", None), "model_type", "") or getattr(cfg, "model_type", ""))
    scale, divide = float(getattr(cfg, "logit_scale", None) or 1.0), None
    ls = getattr(cfg, "logits_scaling", None)
    if ls not in (None, 1, 1.0):
        if model_type.startswith(_MULTIPLY_LOGITS_SCALING):
            scale *= float(ls)
        else:
            divide = float(ls)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return Head(head, name, scale=scale, divide=divide, softcap=float(cap) if cap else None)


def head_notice(head: Head) -> str | None:
    """One line on the extra cost of a soft-capped head in stage 2, or None."""
    if head.linear:
        return None
    V, d = head.module.weight.shape
    return (
        f"ntkselect: note: {head.model_name} soft-caps its logits (final_logit_softcapping {head.softcap:g}), so stage 2 sums them "
        f"exactly through the LM head in vocabulary chunks: one extra {V} x {d} LM-head pass per scored token"
    )


class _CappedSums(torch.autograd.Function):
    """s_n = Σ_k post(h_n·w_k + b_k) for (N, d) h, in vocabulary chunks.

    The forward pass also accumulates ds_n/dh_n = Σ_k post'(z_nk) w_k, (N, d), so the backward
    pass is a product with it; neither pass holds more than one (N, chunk) block."""

    @staticmethod
    def forward(ctx, h, head: Head, chunk: int):
        W = head.module.weight.detach()
        b = head.module.bias.detach() if head.module.bias is not None else None
        hf = h.detach().float()
        total = torch.zeros(hf.shape[0], dtype=torch.float32, device=h.device)
        dh = torch.zeros_like(hf)
        with torch.autocast(h.device.type, enabled=False), torch.enable_grad():
            for k0 in range(0, W.shape[0], chunk):
                Wc = W[k0 : k0 + chunk].float()  # (c, d)
                z = (hf @ Wc.T).requires_grad_(True)  # (N, c) raw head outputs
                zb = z + b[k0 : k0 + chunk].float() if b is not None else z
                s = head.post(zb).sum(-1)  # (N,)
                (dz,) = torch.autograd.grad(s.sum(), z)  # post'(z), (N, c): exact, any post-processing
                total += s.detach()
                dh += dz @ Wc
        ctx.save_for_backward(dh)
        return total

    @staticmethod
    def backward(ctx, g):
        (dh,) = ctx.saved_tensors
        return g.unsqueeze(-1) * dh, None, None


def capped_sums(h: torch.Tensor, head: Head, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """(N,) float32 Σ_k logit_k at (N, d) hidden states, through the real head (any post-processing)."""
    n = max(1, h.shape[0])
    chunk = max(256, chunk_bytes // (4 * n * 3))
    return _CappedSums.apply(h, head, chunk)
