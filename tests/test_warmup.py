"""Warm-up: the loss on trained positions equals the model's own loss, and training lowers it."""

from __future__ import annotations

import torch

from ntkselect.data.batching import collate
from ntkselect.model.loading import load_model
from ntkselect.model.runtime import Runtime
from ntkselect.training.warmup import WarmupOptions, add_lora, trained_token_loss, warmup


def test_trained_token_loss_equals_hf_loss(tiny_model_dir, examples, tokenizer):
    model = add_lora(load_model(tiny_model_dir), WarmupOptions(seed=0))
    for side in ("right", "left"):
        b = collate(examples, range(len(examples)), tokenizer.pad_token_id, side)
        ref = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, labels=b.labels).loss
        torch.testing.assert_close(trained_token_loss(model, b), ref, rtol=1e-5, atol=1e-5)


def test_warmup_lowers_the_loss_and_is_seeded(tiny_model_dir, examples, tokenizer):
    rt = Runtime(pad_id=tokenizer.pad_token_id, progress=False)
    b = collate(examples, range(len(examples)), tokenizer.pad_token_id)
    runs = []
    for _ in range(2):
        model = add_lora(load_model(tiny_model_dir), WarmupOptions(seed=3))
        before = float(trained_token_loss(model, b))
        summary = warmup(model, examples, WarmupOptions(seed=3, epochs=8, lr=5e-3, batch_size=4), rt)
        after = float(trained_token_loss(model, b))
        runs.append(torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad]))
        assert summary["steps"] == 16
        assert after < before - 0.1
    assert torch.equal(runs[0], runs[1])


def test_zero_epochs_leaves_the_fresh_adapter(tiny_model_dir, examples, tokenizer):
    model = add_lora(load_model(tiny_model_dir), WarmupOptions(seed=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    summary = warmup(model, examples, WarmupOptions(seed=1, epochs=0), Runtime(pad_id=tokenizer.pad_token_id, progress=False))
    assert summary["steps"] == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_fused_training_gradients_equal_autograd_through_peft(tiny_model_dir, examples, tokenizer):
    from helpers import make_lora_model
    from ntkselect.grads.fused import lora_parameters
    from ntkselect.training.warmup import loss_and_grads

    model = make_lora_model(tiny_model_dir, seed=2)
    rt = Runtime(pad_id=tokenizer.pad_token_id, progress=False)
    b = collate(examples, range(len(examples)), tokenizer.pad_token_id, "left")
    grads = {}
    for fused in (False, True):
        loss_and_grads(model, b, rt, fused)
        grads[fused] = torch.cat([p.grad.reshape(-1) for _, p in lora_parameters(model)])
        for _, p in lora_parameters(model):
            p.grad = None
    assert float(grads[False].norm()) > 0
    assert float((grads[True] - grads[False]).norm() / grads[False].norm()) < 1e-4
