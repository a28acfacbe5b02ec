"""Every supported model family, against plain autograd on the model's real, full logits.

For a tiny random model of each family (LoRA r = 4 on all linear layers, random B as after a
warm-up), and synthetic examples of varied lengths with both padding sides:

* the LoRA gradients of the stage-2 objective f = (1/T) Σ_t Σ_k logit[t, k] and of each
  example's loss, from the fused batched path, equal a naive one-example autograd loop through
  peft's own layers on ``model(input_ids).logits`` (which includes soft-capping and logit
  scaling) and on the model's own ``loss``;
* so do the stage-2 scores (exact and projected), LESS's features, the warm-up gradient of a
  batch, and stage 1's embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import FAMILIES, synthetic_examples, tiny_lora_model
from ntkselect.data.batching import collate
from ntkselect.grads.fused import lora_parameters
from ntkselect.grads.projection import RademacherProjector
from ntkselect.model.heads import lm_head
from ntkselect.model.lm import decoder_of, summed_logits
from ntkselect.model.runtime import Runtime
from ntkselect.selection.ntk.stage1 import embed
from ntkselect.selection.ntk.stage2 import per_example_gradients, projected_features, run_stage2
from ntkselect.training.warmup import loss_and_grads, per_example_loss, trained_token_loss

TOL = 3e-5  # relative; the float32 naive loop itself is off by up to ~1e-5 from a float64 one (Gemma 3)


def _rt(**kw):
    return Runtime(pad_id=0, progress=False, **kw)


def _forward(model, b, labels=False):
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, labels=b.labels if labels else None)


def naive(model, examples, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """((n, D) gradients, (n,) values) one example at a time, autograd through peft's layers on
    the model's own outputs: f = mean over trained positions of Σ_k logits, or the model's loss."""
    params = [p for _, p in lora_parameters(model)]
    grads, vals = [], []
    for i, e in enumerate(examples):
        b = collate([e], [i], 0)
        out = _forward(model, b, labels=objective == "loss")
        f = out.loss if objective == "loss" else (out.logits.sum(-1) * b.target_mask).sum() / b.target_mask.sum()
        g = torch.autograd.grad(f, params)
        grads.append(torch.cat([x.reshape(-1) for x in g]))
        vals.append(f.detach())
    return torch.stack(grads), torch.stack(vals)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    name = request.param
    model = tiny_lora_model(name)
    ex = synthetic_examples()
    ref = {obj: naive(model, ex, obj) for obj in ("ntk", "loss")}
    return name, model, ex, ref


def test_head_gives_the_models_own_logits_and_loss(case):
    name, model, ex, _ = case
    for side in ("right", "left"):
        b = collate(ex, range(len(ex)), 0, side)
        with torch.no_grad():
            out = _forward(model, b, labels=True)
            h = decoder_of(model)(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False).last_hidden_state
            m = b.attention_mask.bool()
            torch.testing.assert_close(lm_head(model).logits(h[m]), out.logits[m], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(trained_token_loss(model, b), out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["ntk", "loss"])
def test_gradients_equal_naive_autograd(case, objective):
    name, model, ex, ref = case
    g_ref, f_ref = ref[objective]
    assert g_ref.norm(dim=1).min() > 0
    fn = None if objective == "ntk" else per_example_loss
    for side in ("right", "left"):
        rt = _rt(batch_size=3, padding_side=side)
        g = per_example_gradients(model, ex, rt, objective=fn)
        for i in range(len(ex)):
            assert rel(g[i], g_ref[i]) < TOL, (name, side, i, rel(g[i], g_ref[i]))
        b = collate(ex, range(len(ex)), 0, side)
        with torch.no_grad():
            f = summed_logits(model, b) if objective == "ntk" else per_example_loss(model, b)
        torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-6)


def test_stage2_scores_equal_naive_kernel(case):
    name, model, ex, ref = case
    g = ref["ntk"][0].double()
    dom, cand = slice(0, 3), slice(3, None)
    want = (g[cand] @ g[dom].T).mean(1).numpy()
    got = run_stage2(model, ex[dom], ex[cand], _rt(batch_size=2, padding_side="left"), proj_dim=0).scores
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())
    res = run_stage2(model, ex[dom], ex[cand], _rt(batch_size=4), proj_dim=64, seed=3)
    P = RademacherProjector(g.shape[1], 64, seed=3)
    phi = P.project(g.float()).double()
    want_p = (phi[cand] @ phi[dom].T).mean(1).numpy()
    np.testing.assert_allclose(res.scores, want_p, rtol=1e-4, atol=1e-4 * np.abs(want_p).max())


def test_less_features_equal_projected_naive_loss_gradients(case):
    name, model, ex, ref = case
    g = ref["loss"][0]
    P = RademacherProjector(g.shape[1], 64, seed=1)
    got = projected_features(model, ex, P, _rt(batch_size=4, padding_side="left"), objective=per_example_loss)
    want = P.project(g).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_warmup_gradient_equals_autograd_of_the_models_loss(case):
    name, model, ex, _ = case
    params = [p for _, p in lora_parameters(model)]
    for side in ("right", "left"):
        b = collate(ex, range(len(ex)), 0, side)
        want = torch.cat([x.reshape(-1) for x in torch.autograd.grad(_forward(model, b, labels=True).loss, params)])
        loss_and_grads(model, b, _rt(), fused=True)
        got = torch.cat([p.grad.reshape(-1) for p in params])
        for p in params:
            p.grad = None
        assert rel(got, want) < TOL, (name, side, rel(got, want))


def test_stage1_embeddings_equal_the_adapted_models_hidden_states(case):
    name, model, ex, _ = case
    got = embed(model, ex, _rt(batch_size=4, padding_side="left"))
    want = []
    with torch.no_grad():
        for i, e in enumerate(ex):
            b = collate([e], [i], 0)
            h = decoder_of(model)(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False).last_hidden_state
            want.append(h[0].mean(0).numpy())
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-5)


def test_moe_routers_and_experts_are_not_adapted():
    for name in ("mixtral", "qwen2_moe"):
        model = tiny_lora_model(name)
        names = [n for n, _ in lora_parameters(model)]
        assert names and not any(".experts" in n or ".gate." in n or "shared_expert_gate" in n for n in names), name
        assert any("self_attn" in n for n in names)
    assert any("shared_expert." in n for n, _ in lora_parameters(tiny_lora_model("qwen2_moe")))


def test_soft_capping_is_not_the_linear_shortcut():
    """The tiny Gemma 2's cap bends its logits: the linear shortcut would give other scores."""
    model = tiny_lora_model("gemma2")
    head = lm_head(model)
    assert not head.linear
    b = collate(synthetic_examples(), range(6), 0)
    with torch.no_grad():
        exact = summed_logits(model, b)
        wbar = head.module.weight.float().sum(0)
        h = decoder_of(model)(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False).last_hidden_state
        linear = ((h @ wbar) * b.target_mask).sum(1) / b.target_mask.sum(1)
    assert rel(linear, exact) > 0.05


@pytest.mark.parametrize("name", ["gemma2", "cohere"])
def test_diagnose_output_gradients_are_the_models_own_outputs(name):
    """diagnose's ∇F_k(x), F_k = (1/T) Σ_t logit[t, k], for sampled outputs k: through the soft cap
    (or the logit scale) exactly as the model computes its logits."""
    from ntkselect.diagnostics.diagnose import _head_matrix, output_gradients

    model = tiny_lora_model(name)
    e = synthetic_examples()[1]
    head = lm_head(model)
    ks = torch.tensor([3, 17, 40])
    W = _head_matrix(model)[0][ks]
    got = output_gradients(model, e, W, _rt(batch_size=2), head=None if head.linear else head)
    params = [p for _, p in lora_parameters(model)]
    b = collate([e], [0], 0)
    logits = _forward(model, b).logits[0]  # (T, V)
    for s, k in enumerate(ks.tolist()):
        f = (logits[:, k] * b.target_mask[0]).sum() / b.target_mask.sum()
        want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params, retain_graph=True)])
        assert rel(got[s], want) < TOL, (name, k)
