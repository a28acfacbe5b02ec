"""Checks that need CUDA (``-m gpu``; skipped without a GPU, see conftest.py). They build tiny
random models from configs and synthetic token ids only, so they run on a GPU machine that has
torch, transformers, peft and pytest but neither the default model nor the test data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import FAMILIES, naive_gradients, synthetic_examples, tiny_lora_model

pytestmark = pytest.mark.gpu


def _rt(dtype=torch.float32, model_dtype=torch.float32, batch_size=4):
    from ntkselect.model.runtime import Runtime

    return Runtime(device=torch.device("cuda"), dtype=dtype, model_dtype=model_dtype, batch_size=batch_size, max_batch_tokens=4096, progress=False, pad_id=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_cuda_scores_equal_naive_autograd_on_full_logits(family):
    """Stage 2's exact scores on CUDA in float32 equal ⟨mean_i g(x_i), g(c_j)⟩ from one-example
    autograd on the full logits (computed on the CPU, float64 accumulation)."""
    from ntkselect.selection.ntk.stage2 import domain_mean_gradient, score_against

    model = tiny_lora_model(family)
    dom, cand = synthetic_examples(4, seed=0), synthetic_examples(8, seed=1)
    g_dom, g_cand = naive_gradients(model, dom, 0).double(), naive_gradients(model, cand, 0).double()
    ref = (g_cand @ g_dom.mean(0)).numpy()
    model.to("cuda")
    rt = _rt()
    got = score_against(model, cand, domain_mean_gradient(model, dom, rt), rt)
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max()), (got, ref)


def test_cuda_scores_do_not_depend_on_batch_size():
    from ntkselect.selection.ntk.stage2 import domain_mean_gradient, score_against

    model = tiny_lora_model("llama").to("cuda")
    dom, cand = synthetic_examples(4, seed=0), synthetic_examples(8, seed=1)
    a = score_against(model, cand, domain_mean_gradient(model, dom, _rt(batch_size=1)), _rt(batch_size=1))
    b = score_against(model, cand, domain_mean_gradient(model, dom, _rt(batch_size=8)), _rt(batch_size=8))
    assert np.allclose(a, b, rtol=1e-5, atol=1e-7 * np.abs(a).max())


def test_bfloat16_weights_on_cuda_rank_like_float32():
    """bfloat16 weights (straight onto the GPU) against float32: scores within a few percent and
    the same order of the clearly separated candidates."""
    from ntkselect.runs.preflight import check_model
    from ntkselect.selection.ntk.stage2 import domain_mean_gradient, score_against

    model = tiny_lora_model("llama").to("cuda")
    dom, cand = synthetic_examples(4, seed=0), synthetic_examples(8, seed=1)
    rt = _rt()
    ref = score_against(model, cand, domain_mean_gradient(model, dom, rt), rt)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    rth = _rt(torch.bfloat16, torch.bfloat16)
    check_model(model, rth, dom, ("embed", "ntk"))  # the preflight accepts bfloat16 weights
    got = score_against(model, cand, domain_mean_gradient(model, dom, rth), rth)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05
    assert np.corrcoef(got, ref)[0, 1] > 0.99


def test_random_model_loads_on_the_device_in_its_dtype(tmp_path):
    """``random:<config>`` builds the weights on the GPU in the requested dtype: none on the host."""
    import json

    from ntkselect.model.loading import load_model

    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(f"random:{tmp_path}", torch.bfloat16, "cuda")
    assert {p.device.type for p in m.parameters()} == {"cuda"}
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    again = load_model(f"random:{tmp_path}", torch.bfloat16, "cuda")
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))  # seeded


@pytest.mark.parametrize("family", FAMILIES[:4])
def test_stage1_embeddings_on_cuda_equal_cpu(family):
    from ntkselect.model.runtime import Runtime
    from ntkselect.selection.ntk.stage1 import embed

    model = tiny_lora_model(family)
    ex = synthetic_examples(6)
    cpu = embed(model, ex, Runtime(progress=False, batch_size=3, max_batch_tokens=4096))
    gpu = embed(model.to("cuda"), ex, _rt(batch_size=3))
    assert np.allclose(cpu, gpu, rtol=1e-4, atol=1e-5)
