"""Stage 2 scores: exact definition, projection, and invariance to batching and padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_lora_model
from ntkselect.projection import BLOCK_ROWS, RademacherProjector
from ntkselect.runtime import Runtime
from ntkselect.stage2 import domain_mean_gradient, per_example_gradients, projected_features, run_stage2
from test_grads import naive_gradients


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return make_lora_model(tiny_model_dir, seed=5)


def rt_(tok, **kw):
    return Runtime(pad_id=tok.pad_token_id, progress=False, **kw)


def test_exact_scores_equal_mean_autograd_kernel(model, examples, tokenizer):
    dom, cand = examples[:3], examples[3:]
    res = run_stage2(model, dom, cand, rt_(tokenizer, batch_size=2), proj_dim=0)
    gd = naive_gradients(model, dom, tokenizer.pad_token_id).double()
    gc = naive_gradients(model, cand, tokenizer.pad_token_id).double()
    ref = (gc @ gd.T).mean(1).numpy()  # s_j = mean_i Θ̃(x_i, c_j), kernel formed explicitly
    np.testing.assert_allclose(res.scores, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_domain_mean_gradient_is_mean_of_per_example(model, examples, tokenizer):
    rt = rt_(tokenizer, batch_size=3)
    gbar = domain_mean_gradient(model, examples, rt)
    flat = torch.cat([g.reshape(-1) for g in gbar.values()])
    ref = per_example_gradients(model, examples, rt).mean(0)
    torch.testing.assert_close(flat, ref, rtol=1e-4, atol=1e-6)


def test_projected_scores_equal_explicit_projected_kernel(model, examples, tokenizer):
    """The fast route ⟨φ*(φ(ḡ_D)), g(c)⟩ equals mean_i ⟨φ(g(x_i)), φ(g(c))⟩ with features formed."""
    dom, cand = examples[:4], examples[4:]
    rt = rt_(tokenizer, batch_size=4)
    res = run_stage2(model, dom, cand, rt, proj_dim=512, seed=7)
    proj = RademacherProjector(res.grad_dim, 512, seed=7)
    fd, fc = projected_features(model, dom, proj, rt), projected_features(model, cand, proj, rt)
    ref = (fc.double() @ fd.double().T).mean(1).numpy()
    np.testing.assert_allclose(res.scores, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    exact = run_stage2(model, dom, cand, rt, proj_dim=0).scores
    assert not np.allclose(res.scores, exact, rtol=1e-6)  # the projection really was applied


@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (3, "left"), (8, "right"), (8, "left")])
def test_scores_do_not_depend_on_batching_or_padding(model, examples, tokenizer, batch_size, padding_side):
    dom, cand = examples[:3], examples[3:]
    base = run_stage2(model, dom, cand, rt_(tokenizer, batch_size=2), proj_dim=256, seed=1).scores
    other = run_stage2(model, dom, cand, rt_(tokenizer, batch_size=batch_size, padding_side=padding_side), proj_dim=256, seed=1).scores
    np.testing.assert_allclose(other, base, rtol=1e-5, atol=1e-5 * np.abs(base).max())
    assert list(np.argsort(-other)) == list(np.argsort(-base))


def test_max_batch_tokens_does_not_change_scores(model, examples, tokenizer):
    dom, cand = examples[:3], examples[3:]
    a = run_stage2(model, dom, cand, rt_(tokenizer, batch_size=8, max_batch_tokens=10_000), proj_dim=0).scores
    b = run_stage2(model, dom, cand, rt_(tokenizer, batch_size=8, max_batch_tokens=40), proj_dim=0).scores
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


# -- the projector ------------------------------------------------------------------------

def test_projection_preserves_inner_products_at_default_size():
    """Johnson–Lindenstrauss at p = 8192: the error of ⟨φa, φb⟩ has standard deviation
    sqrt((|a|²|b|² + ⟨a,b⟩²)/p); every pair must be within 5 of them."""
    D, p = 3 * BLOCK_ROWS + 100, 8192
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(12, D, generator=gen, dtype=torch.float64)
    X[1] = X[0] + 0.3 * X[1]  # a strongly correlated pair as well as near-orthogonal ones
    F = RademacherProjector(D, p, seed=3).project(X.float()).double()
    G, Gp = X @ X.T, F @ F.T
    n = X.norm(dim=1)
    sd = torch.sqrt((n[:, None] ** 2 * n[None, :] ** 2 + G**2) / p)
    z = ((Gp - G) / sd).abs()
    assert float(z.max()) < 5.0
    assert float(((Gp - G) / sd).mean()) == pytest.approx(0.0, abs=1.0)  # unbiased
    off = ~torch.eye(12, dtype=torch.bool)
    assert float(((Gp - G).abs() / (n[:, None] * n[None, :]))[off].max()) < 5 / math.sqrt(p)


def test_projection_depends_only_on_seed():
    a = RademacherProjector(5000, 64, seed=11)
    b = RademacherProjector(2 * BLOCK_ROWS + 7, 64, seed=11)
    assert torch.equal(a.block(1), b.block(1))  # same rows whatever the gradient size
    assert torch.equal(a.block(2)[:7], b.block(2))
    assert not torch.equal(a.block(1), RademacherProjector(5000, 64, seed=12).block(1))
    assert torch.equal(a.block(0, torch.float32), a.block(0).float())
    assert set(a.block(0).float().unique().tolist()) == {-1.0, 1.0}
    X = torch.randn(5, 5000)
    whole = a.project(X)
    rows = torch.cat([a.project(X[i : i + 1]) for i in range(5)])  # batch size does not matter
    torch.testing.assert_close(whole, rows, rtol=1e-5, atol=1e-4)


def test_gram_equals_projected_inner_products():
    P = RademacherProjector(3000, 256, seed=2)
    a, b = torch.randn(2, 3000, dtype=torch.float64).float()
    fa, fb = P.project(torch.stack([a, b]))
    assert float(P.gram(a) @ b) == pytest.approx(float(fa @ fb), rel=1e-4)
