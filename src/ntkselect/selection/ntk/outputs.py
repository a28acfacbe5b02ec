"""Gradients of individual outputs: the pieces of the multi-output kernel that the Jacobian-free
kernel sums.

With F_k(x) = (1/T) Σ_t logit[t, k], the exact kernel is Θ(x, x') = J(x) J(x')ᵀ, J(x) = [∇F_k(x)]_k,
and NTK-Selector's Θ̃ is ⟨Σ_k ∇F_k(x), Σ_k ∇F_k(x')⟩. :func:`output_gradients` gives the rows
∇F_k(x) (or of any direction c in the hidden space) from one backward pass: the diagnostics
(:mod:`ntkselect.diagnostics.diagnose`) compare the two kernels with it, and the preflight
(:mod:`ntkselect.runs.preflight`) checks it on every model.
"""

from __future__ import annotations

import torch

from ntkselect.data.batching import collate
from ntkselect.data.records import TokenizedExample
from ntkselect.grads.fused import flatten_grads, gradient_hooks, lora_parameters
from ntkselect.model.lm import final_hidden
from ntkselect.model.runtime import Runtime
from ntkselect.selection.ntk.stage2 import backward_attention

__all__ = ["output_gradients"]


def output_gradients(model, example: TokenizedExample, cotangents: torch.Tensor, rt: Runtime, head=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(S, P) float32: row s is ∇_LoRA (1/T) Σ_t h_t · c_s over the example's trained positions.

    With c_s = w_k (row k of the LM head, times any logit scale) this is ∇F_k(x); with c = e_j it
    is row j of H(x). For a soft-capped head pass ``head`` (a :class:`~ntkselect.model.heads.Head`),
    the raw rows w_k and their ``bias`` b_k: row s is then ∇ (1/T) Σ_t post(h_t · w_k + b_k),
    the model's own output k. The example is repeated once per cotangent in a batch, and the
    per-example gradient factors of the LoRA hooks give every row from one backward pass."""
    names = [n for n, _ in lora_parameters(model)]
    dim = sum(p.numel() for _, p in lora_parameters(model))
    S = len(cotangents)
    out = torch.zeros(S, dim, dtype=torch.float32)
    bs = max(1, min(rt.batch_size, rt.max_batch_tokens // max(1, len(example.input_ids))))
    model.eval()
    with backward_attention(model, rt), gradient_hooks(model, fused=True) as hooks:
        for start in range(0, S, bs):
            C = cotangents[start : start + bs].to(rt.device, torch.float32)  # (B, d)
            batch = collate([example] * len(C), list(range(len(C))), rt.pad_id, rt.padding_side).to(rt.device)
            hooks.clear()
            hooks.set_mask(batch.attention_mask)
            hooks.stream("per_example")
            with rt.autocast():
                h = final_hidden(model, batch)  # (B, L, d)
            s = torch.einsum("bld,bd->bl", h.float(), C)  # (B, L)
            if head is not None:  # the model's own (soft-capped) output k
                if bias is not None:
                    s = s + bias[start : start + len(C)].to(s.device, torch.float32)[:, None]
                s = head.post(s)
            m = batch.target_mask  # (B, L)
            f = (s * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B,)
            f.sum().backward()  # copies do not interact: each copy's gradient is its own row
            out[start : start + len(C)] = flatten_grads(hooks.per_example(), names).cpu()
    for _, p in lora_parameters(model):
        p.grad = None
    return out
