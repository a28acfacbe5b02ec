"""The pieces of a causal LM that the stages use, found in a model-agnostic way.

Stages 1 and 2 never compute the vocabulary-sized logits: stage 1 needs only the final
hidden states, and stage 2 needs Σ_k logit[t,k] = h_t · Σ_k w_k (+ Σ_k b_k), a dot product
with one d-vector (for a soft-capped head, the sum runs through the head in vocabulary
chunks: :mod:`ntkselect.model.heads`).
"""

from __future__ import annotations

import torch
from torch import nn

from ntkselect.errors import NtkSelectError
from ntkselect.model.heads import Head, capped_sums, lm_head

__all__ = ["decoder_of", "summed_head", "final_hidden", "summed_logits", "trained_logits"]


def causal_lm(model: nn.Module) -> nn.Module:
    base = getattr(model, "get_base_model", None)  # a peft model
    return base() if base is not None else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, blocks, final norm) without the LM head."""
    lm = causal_lm(model)
    get = getattr(lm, "get_decoder", None)
    dec = get() if get is not None else None
    if dec is None or dec is lm:
        dec = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if dec is None:
        raise NtkSelectError(f"cannot find the decoder of {type(lm).__name__}: pass a Hugging Face causal LM")
    return dec


def summed_head(model: nn.Module):
    """What :func:`summed_logits` needs of the LM head: (w̄, b̄) with Σ_k logit[t,k] = h_t·w̄ + b̄
    (w̄ = Σ_k w_k (d,) float32, times any logit scale) for a linear head, or the
    :class:`~ntkselect.model.heads.Head` itself when the model soft-caps its logits (the sum then
    runs through the head in vocabulary chunks)."""
    head = lm_head(model).frozen()
    return head.summed() if head.linear else head


def final_hidden(model: nn.Module, batch) -> torch.Tensor:
    """(B, L, d) last hidden states (after the final norm)."""
    out = decoder_of(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state


def summed_logits(model: nn.Module, batch, head: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """(B,) f(x_b) = (1/T_b) Σ_t Σ_k logit[t,k] over the positions that predict trained tokens."""
    head = head if head is not None else summed_head(model)
    h = final_hidden(model, batch)  # (B, L, d)
    m = batch.target_mask  # (B, L)
    if isinstance(head, Head):  # soft-capped: exactly, through the head, at the trained positions only
        pos = m.bool()
        rows = pos.nonzero()[:, 0]  # (N,) the example of each trained position
        s = capped_sums(h[pos], head)  # (N,)
        total = torch.zeros(pos.shape[0], dtype=torch.float32, device=h.device).index_add(0, rows, s)
        return total / m.sum(1).clamp_min(1.0)
    wbar, bbar = head
    s = h.float() @ wbar.to(h.device) + bbar  # (B, L) float32
    return (s * m).sum(1) / m.sum(1).clamp_min(1.0)


def trained_logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(N, V) the model's own logits (soft-capping, logit scaling included) at (N, d) hidden states."""
    return lm_head(model).logits(h)
