"""Equivalence tests: batched hook gradients and the Jacobian-free kernel against plain autograd."""

from __future__ import annotations

import pytest
import torch

from helpers import make_lora_model, naive_gradients
from ntkselect.data.batching import collate
from ntkselect.grads.fused import flatten_grads, gradient_hooks, lora_parameters
from ntkselect.model.lm import summed_logits
from ntkselect.model.runtime import Runtime
from ntkselect.selection.ntk.stage2 import per_example_gradients


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return make_lora_model(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(model, examples, tokenizer):
    return naive_gradients(model, examples, tokenizer.pad_token_id)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "peft-hooks"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_hook_gradients_equal_naive_loop(model, examples, reference, tokenizer, batch_size, padding_side, fused):
    rt = Runtime(batch_size=batch_size, padding_side=padding_side, pad_id=tokenizer.pad_token_id, progress=False)
    g = per_example_gradients(model, examples, rt, fused=fused)
    assert g.shape == reference.shape
    assert reference.norm(dim=1).min() > 0
    for i in range(len(examples)):  # per example, so one bad row cannot hide behind the others
        assert rel_err(g[i], reference[i]) < 1e-4, i


def test_jacobian_free_kernel_equals_autograd_kernel(model, examples, reference, tokenizer):
    rt = Runtime(batch_size=4, pad_id=tokenizer.pad_token_id, progress=False)
    g = per_example_gradients(model, examples, rt)
    K = g @ g.T  # Θ̃ from hooks and Σ_k w_k
    K_ref = reference @ reference.T  # ⟨∇Σ_k f_k(x), ∇Σ_k f_k(x')⟩ by autograd on full logits
    assert rel_err(K, K_ref) < 1e-4
    assert torch.allclose(K, K_ref, rtol=1e-4, atol=1e-4 * float(K_ref.abs().max()))


def test_summed_logits_never_builds_vocabulary_tensor(model, examples, tokenizer):
    """f computed through h·Σw equals the full-logit sum, and no (·, V) tensor is created."""
    b = collate(examples[:4], range(4), tokenizer.pad_token_id)
    V = model.get_base_model().config.vocab_size
    big = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: big.append(type(m).__name__) if isinstance(o, torch.Tensor) and o.shape[-1] == V else None
    )
    try:
        with torch.no_grad():
            f = summed_logits(model, b)
    finally:
        hook.remove()
    assert big == []
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    f_ref = (logits.sum(-1) * b.target_mask).sum(1) / b.target_mask.sum(1)
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "peft-hooks"])
def test_hook_dot_and_sum_equal_materialised_gradients(model, examples, reference, tokenizer, fused):
    names = [n for n, _ in lora_parameters(model)]
    gen = torch.Generator().manual_seed(3)
    vec = {n: torch.randn(p.shape, generator=gen) for n, p in lora_parameters(model)}
    b = collate(examples, range(len(examples)), tokenizer.pad_token_id, "left")
    with gradient_hooks(model, fused) as hooks:
        hooks.set_mask(b.attention_mask)
        summed_logits(model, b).sum().backward()
        dots = hooks.dot(vec)
        total = flatten_grads({n: t.unsqueeze(0) for n, t in hooks.batch_sum().items()}, names)[0]
    for _, p in lora_parameters(model):
        p.grad = None
    ref = reference @ flatten_grads({n: v.unsqueeze(0) for n, v in vec.items()}, names)[0]
    torch.testing.assert_close(dots, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert rel_err(total, reference.sum(0)) < 1e-4


def test_fused_context_restores_the_model(model, examples, tokenizer):
    b = collate(examples, range(len(examples)), tokenizer.pad_token_id)
    with torch.no_grad():
        before = summed_logits(model, b)
    with gradient_hooks(model, fused=True):
        with torch.no_grad():
            inside = summed_logits(model, b)
    with torch.no_grad():
        after = summed_logits(model, b)
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-4)  # W + sBA is the adapted layer
    assert torch.equal(after, before)


def test_gradients_cover_every_lora_parameter(model, examples, reference):
    dims = sum(p.numel() for _, p in lora_parameters(model))
    assert reference.shape[1] == dims
    names = [n for n, _ in lora_parameters(model)]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("mlp" in n for n in names) and any("self_attn" in n for n in names)  # all-linear


@pytest.mark.parametrize("mode", ["dot", "sum"])
def test_reducing_during_backward_equals_reducing_after(model, examples, tokenizer, mode):
    """The fused path's streamed reduction (no factor kept) gives what the stored factors give."""
    gen = torch.Generator().manual_seed(4)
    vec = {n: torch.randn(p.shape, generator=gen) for n, p in lora_parameters(model)}
    b = collate(examples, range(len(examples)), tokenizer.pad_token_id, "left")
    out = {}
    for streamed in (False, True):
        with gradient_hooks(model, fused=True) as hooks:
            hooks.set_mask(b.attention_mask)
            hooks.stream(mode, vec if mode == "dot" else None) if streamed else None
            summed_logits(model, b).sum().backward()
            out[streamed] = hooks.dot(vec) if mode == "dot" else torch.cat([t.reshape(-1) for t in hooks.batch_sum().values()])
            if streamed:
                assert all(not calls for calls in hooks._factors_store.values())  # nothing was kept
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5 * float(out[False].abs().max()))
