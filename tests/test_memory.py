"""Predictable memory: the live-bytes tracker, the measured per-pass costs, and batches sized to a
budget that give the same results as unbounded ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_lora_model
from ntkselect.data.batching import collate, make_batches
from ntkselect.grads.fused import FusedLoraGradients, lora_parameters
from ntkselect.model.lm import summed_head, summed_logits
from ntkselect.model.memory import LiveBytes, MemoryCosts, PassCost, measure_costs
from ntkselect.model.runtime import Runtime
from ntkselect.runs.preflight import MEASURED_PASSES
from ntkselect.selection.ntk.stage2 import run_stage2
from ntkselect.training.warmup import batch_loss_and_grads, micro_batches


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return make_lora_model(tiny_model_dir, seed=4)


def rt_(tok, **kw):
    return Runtime(pad_id=tok.pad_token_id, progress=False, **kw)


def test_live_bytes_counts_new_tensors_only():
    w = torch.zeros(1000)
    with LiveBytes() as t:
        a = torch.ones(250)  # 1000 bytes
        v = w.view(10, 100)  # a view of an old tensor: no new memory
        b = a * 2  # another 1000
        del a
        c = torch.ones(100)  # 400, after a was freed
    assert t.peak == 2000 and v.shape == (10, 100) and b.numel() + c.numel() == 350


def test_measured_costs_predict_a_larger_batch(model, examples, tokenizer):
    """Fitted on two-example probes of at most 64 tokens, the cost predicts the live peak of the
    real 8-example batch (padding, trained masks) within 25%."""
    rt = rt_(tokenizer)
    costs = measure_costs(model, rt, ("sum", "dot", "warmup"), vocab=len(tokenizer), passes=MEASURED_PASSES)
    b = collate(examples, range(len(examples)), tokenizer.pad_token_id)
    B, L, N = len(examples), b.input_ids.shape[1], int(b.target_mask.sum())
    head = summed_head(model)
    vec = {n: torch.zeros_like(p) for n, p in lora_parameters(model)}
    for kind in ("sum", "dot"):
        with FusedLoraGradients(model) as hooks, LiveBytes() as t:
            hooks.set_mask(b.attention_mask)
            hooks.stream(kind, vec if kind == "dot" else None)
            summed_logits(model, b, head).sum().backward()
            hooks.dot(vec) if kind == "dot" else hooks.batch_sum()
        assert costs[kind].bytes(B, L, N) == pytest.approx(t.peak, rel=0.25), kind
    assert costs["warmup"].c > 4 * len(tokenizer)  # the loss's vocabulary-sized logits, per trained token


def test_make_batches_keeps_to_the_budget():
    lengths, trained = [50, 40, 30, 20, 10, 10], [5, 4, 3, 2, 1, 1]
    cost = PassCost(a=1.0, c=10.0)
    fits = lambda B, L, N: cost.bytes(B, L, N) <= 120  # noqa: E731
    batches = make_batches(lengths, 16, None, fits=fits, trained=trained)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or fits(len(b), max(lengths[i] for i in b), sum(trained[i] for i in b))
    assert make_batches(lengths, 16, None) == [[0, 1, 2, 3, 4, 5]]  # no budget: as before


def test_scores_do_not_depend_on_the_memory_budget(model, examples, tokenizer):
    dom, cand = examples[:4], examples[4:]
    free = run_stage2(model, dom, cand, rt_(tokenizer, batch_size=8), proj_dim=0).scores
    costs = MemoryCosts({"sum": PassCost(a=1.0), "dot": PassCost(a=1.0)}, budget=40.0)  # about one example per batch
    tight = rt_(tokenizer, batch_size=8, memory=costs)
    np.testing.assert_allclose(run_stage2(model, dom, cand, tight, proj_dim=0).scores, free, rtol=1e-5, atol=1e-5 * np.abs(free).max())


@pytest.mark.parametrize("fused", [True, False])
def test_warmup_micro_batches_give_the_batch_gradient(model, examples, tokenizer, fused):
    idx = list(range(len(examples)))
    params = [p for _, p in lora_parameters(model)]
    out = {}
    for name, memory in (("whole", None), ("split", MemoryCosts({"warmup": PassCost(a=1.0)}, budget=40.0))):
        rt = rt_(tokenizer, memory=memory)
        if memory is not None:
            assert len(micro_batches(examples, idx, rt)) > 2
        loss, n_tokens = batch_loss_and_grads(model, examples, idx, rt, fused)
        out[name] = (float(loss), torch.cat([p.grad.reshape(-1) for p in params]), n_tokens)
        for p in params:
            p.grad = None
    assert out["split"][0] == pytest.approx(out["whole"][0], rel=1e-5)
    torch.testing.assert_close(out["split"][1], out["whole"][1], rtol=1e-4, atol=1e-6 * float(out["whole"][1].abs().max()))
    assert out["split"][2] == out["whole"][2] == sum(len(e.input_ids) for e in examples)


def test_dry_run_reports_memory_by_stage_within_the_budget(tiny_model_dir, tmp_path):
    import json

    from ntkselect.config import SelectConfig
    from ntkselect.runs.plan import estimate

    dom, pool = tmp_path / "d.jsonl", tmp_path / "p.jsonl"
    dom.write_text("".join(json.dumps({"prompt": f"question {i} " * (1 + i), "response": f"answer {i}"}) + "\n" for i in range(6)))
    pool.write_text("".join(json.dumps({"text": f"pool text {i} " * (1 + i % 7)}) + "\n" for i in range(20)))
    plan = estimate(SelectConfig(domain=str(dom), pool=str(pool), n=3, out=str(tmp_path / "run"), model=tiny_model_dir, threads=1))
    mem = plan["memory"]
    assert set(mem["by_stage"]) == {"warm-up", "stage 1", "stage 2"}
    assert mem["peak"] == max(mem["by_stage"].values())
    assert 0 < mem["activations"] <= mem["budget"] and mem["process"] > 0


def test_evaluate_budgets_for_its_second_model_on_a_gpu_only(monkeypatch):
    # evaluate holds the selection's warmed-up model and the fine-tune's fresh one at once (issue 21)
    from ntkselect.model.memory import GPU_FRACTION, MemoryCosts, with_second_model

    monkeypatch.delenv("NTKSELECT_MEMORY_BUDGET", raising=False)
    costs = MemoryCosts({}, budget=10e9)
    gpu = with_second_model(costs, torch.device("cuda"), 16e9)  # an 8B model in bfloat16
    assert gpu.budget == pytest.approx(10e9 - GPU_FRACTION * 16e9)
    assert with_second_model(costs, torch.device("cuda"), 40e9).budget == 0.0  # never below zero
    assert with_second_model(costs, torch.device("cpu"), 16e9) is costs  # the CPU cap stays
    monkeypatch.setenv("NTKSELECT_MEMORY_BUDGET", "4G")
    assert with_second_model(costs, torch.device("cuda"), 16e9) is costs  # the user's budget stays
