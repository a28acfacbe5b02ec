"""Out-of-memory back-off in the forward passes (issue 21): stage 1's embeddings and evaluate's
held-out loss split a batch that runs out of device memory and retry it, with the results of a
run that never did; one example that still does not fit is one line naming it. Stage 2's backward
loop has its own test (tests/test_stage2.py::test_out_of_memory_halves_the_batch_and_keeps_scores).
Simulated on the CPU: the model's input embedding raises torch.OutOfMemoryError for batches of more
than ``k`` examples."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from helpers import make_lora_model
from ntkselect.errors import NtkSelectError
from ntkselect.model.runtime import Runtime, run_batches


def _tight(model, k: int):
    """A hook that fails every forward of more than k examples, as a device would; returns its handle."""
    calls = {"oom": 0}

    def hook(_mod, args):
        if args[0].shape[0] > k:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = model.get_input_embeddings().register_forward_pre_hook(hook)
    return handle, calls


def _rt(tokenizer, batch_size=8):
    return Runtime(batch_size=batch_size, max_batch_tokens=4096, pad_id=tokenizer.pad_token_id, progress=False)


def test_stage1_embeddings_survive_out_of_memory_unchanged(tiny_model_dir, examples, tokenizer, caplog):
    from ntkselect.selection.ntk.stage1 import embed

    model = make_lora_model(tiny_model_dir)
    ref = embed(model, examples, _rt(tokenizer))
    handle, calls = _tight(model, 2)
    with caplog.at_level(logging.WARNING):
        got = embed(model, examples, _rt(tokenizer))
    handle.remove()
    assert calls["oom"] >= 1 and "out of memory with" in caplog.text
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)  # batch composition only: float rounding


def test_heldout_loss_survives_out_of_memory_unchanged(tiny_model_dir, examples, tokenizer):
    from ntkselect.evaluation.metrics import heldout_loss
    from ntkselect.model.loading import load_model

    model = load_model(tiny_model_dir).eval()
    ref = heldout_loss(model, examples, _rt(tokenizer))
    handle, calls = _tight(model, 1)
    got = heldout_loss(model, examples, _rt(tokenizer))
    handle.remove()
    assert calls["oom"] >= 1
    np.testing.assert_allclose(got.loss, ref.loss, rtol=2e-5, atol=2e-5)
    assert got.tokens.tolist() == ref.tokens.tolist()


def test_one_example_that_does_not_fit_is_one_line_naming_it(tiny_model_dir, examples, tokenizer):
    from ntkselect.selection.ntk.stage1 import embed

    model = make_lora_model(tiny_model_dir)
    handle, _ = _tight(model, 0)
    with pytest.raises(NtkSelectError, match=r"stage 1: embeddings: out of memory on a single example \(example id 'x-"):
        embed(model, examples, _rt(tokenizer), ids=[f"x-{i}" for i in range(len(examples))])
    handle.remove()


def test_run_batches_splits_in_order_caps_later_batches_and_lets_other_errors_through():
    ran: list[list[int]] = []

    def run(idx):
        if len(idx) > 3:
            raise RuntimeError("CUDA error: out of memory")
        ran.append(idx)

    cap = run_batches([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]], run, torch.device("cpu"), "test")
    assert cap == 2 and ran == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]  # every index once, in order

    def broken(idx):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batches([[0, 1]], broken, torch.device("cpu"), "test")


def test_the_warm_up_survives_out_of_memory_with_the_same_adapter(tiny_model_dir, examples, tokenizer, caplog):
    # the step is redone with passes of half the size, accumulated with the token weights: the same
    # gradient up to float rounding, so the same adapter after several Adam steps up to rounding
    from ntkselect.model.loading import load_model
    from ntkselect.training.warmup import WarmupOptions, add_lora, warmup

    opts = WarmupOptions(seed=3, epochs=3, lr=5e-3, batch_size=4)
    ref = add_lora(load_model(tiny_model_dir), WarmupOptions(seed=3))
    warmup(ref, examples, opts, _rt(tokenizer))
    model = add_lora(load_model(tiny_model_dir), WarmupOptions(seed=3))
    handle, calls = _tight(model, 1)
    with caplog.at_level(logging.WARNING):
        warmup(model, examples, opts, _rt(tokenizer))
    handle.remove()
    assert calls["oom"] == 2 and caplog.text.count("out of memory with") == 2  # 4 -> 2 -> 1, then every later step passes at once
    want = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, want[n], rtol=1e-3, atol=2e-5)  # Adam divides by sqrt(v): rounding of tiny gradients shows
    handle, _ = _tight(model, 0)
    with pytest.raises(NtkSelectError, match="warm-up: out of memory on a single training example"):
        warmup(model, examples, opts, _rt(tokenizer))
    handle.remove()
