"""The pieces of a causal LM that the stages use, found in a model-agnostic way.

Stages 1 and 2 never compute the vocabulary-sized logits: stage 1 needs only the final
hidden states, and stage 2 needs Σ_k logit[t,k] = h_t · Σ_k w_k (+ Σ_k b_k), a dot product
with one d-vector.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import NtkSelectError

__all__ = ["decoder_of", "summed_head", "final_hidden", "summed_logits"]


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, blocks, final norm) without the LM head."""
    lm = _causal_lm(model)
    dec = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if dec is None or dec is lm:
        dec = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if dec is None:
        raise NtkSelectError(f"cannot find the decoder of {type(lm).__name__}: pass a Hugging Face causal LM")
    return dec


def summed_head(model: nn.Module) -> tuple[torch.Tensor, float]:
    """(w̄, b̄): Σ_k w_k (d,) float32 and Σ_k b_k, so that Σ_k logit[t,k] = h_t·w̄ + b̄."""
    lm = _causal_lm(model)
    cfg = getattr(lm, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        raise NtkSelectError(f"{type(lm).__name__} soft-caps its logits, so Σ_k logit_k is not linear in the hidden state; the Jacobian-free kernel needs a linear LM head")
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise NtkSelectError(f"the LM head of {type(lm).__name__} is {type(head).__name__}, not a linear layer; the Jacobian-free kernel needs a linear LM head")
    if head.weight.requires_grad:
        raise NtkSelectError("the LM head is trainable (adapted by LoRA?); exclude lm_head from --lora-target-modules")
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    wbar = head.weight.detach().float().sum(0) * scale  # (d,)
    bbar = float(head.bias.detach().float().sum()) * scale if head.bias is not None else 0.0
    return wbar, bbar


def final_hidden(model: nn.Module, batch) -> torch.Tensor:
    """(B, L, d) last hidden states (after the final norm)."""
    out = decoder_of(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state


def summed_logits(model: nn.Module, batch, head: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """(B,) f(x_b) = (1/T_b) Σ_t Σ_k logit[t,k] over the positions that predict trained tokens."""
    wbar, bbar = head if head is not None else summed_head(model)
    h = final_hidden(model, batch)  # (B, L, d)
    s = h.float() @ wbar.to(h.device) + bbar  # (B, L) float32
    m = batch.target_mask  # (B, L)
    return (s * m).sum(1) / m.sum(1).clamp_min(1.0)
