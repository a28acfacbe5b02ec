"""Stage 2 scores: exact definition, projection, and invariance to batching and padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import make_lora_model, naive_gradients
from ntkselect.grads.projection import BLOCK_ROWS, PAPER_PROJ_DIM, RademacherProjector
from ntkselect.model.runtime import Runtime
from ntkselect.selection.ntk.stage2 import domain_mean_gradient, per_example_gradients, projected_features, run_stage2


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
    ref = (fc.astype(np.float64) @ fd.astype(np.float64).T).mean(1)
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
    D, p = 3 * BLOCK_ROWS + 100, PAPER_PROJ_DIM
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(12, D, generator=gen, dtype=torch.float64)
    X[1] = X[0] + 0.3 * X[1]  # a strongly correlated pair as well as near-orthogonal ones
    F = RademacherProjector(D, seed=3).project(X.float()).double()  # the default size
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


def test_out_of_memory_halves_the_batch_and_keeps_scores(model, examples, tokenizer, monkeypatch):
    import ntkselect.selection.ntk.stage2 as s2

    dom, cand = examples[:3], examples[3:]
    ref = run_stage2(model, dom, cand, rt_(tokenizer, batch_size=8), proj_dim=0).scores
    real = s2.summed_logits

    def tight_memory(m, batch, head=None):
        if batch.input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(m, batch, head)

    monkeypatch.setattr(s2, "summed_logits", tight_memory)
    rt = rt_(tokenizer, batch_size=8)
    got = run_stage2(model, dom, cand, rt, proj_dim=0).scores
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert rt.last_batch_cap == 2


def test_non_finite_gradient_names_the_example(model, examples, tokenizer, monkeypatch):
    import ntkselect.selection.ntk.stage2 as s2
    from ntkselect.errors import NtkSelectError

    real = s2.summed_logits

    def poisoned(m, batch, head=None):
        f = real(m, batch, head)
        return torch.where(batch.index == 2, torch.full_like(f, float("nan")), f)

    monkeypatch.setattr(s2, "summed_logits", poisoned)
    with pytest.raises(NtkSelectError, match="'cand-2'"):
        run_stage2(model, examples[:2], examples[2:6], rt_(tokenizer, batch_size=4), proj_dim=0, candidate_ids=[f"cand-{i}" for i in range(4)])


def test_features_streamed_to_disk_equal_in_memory(model, examples, tokenizer, tmp_path):
    rt = rt_(tokenizer, batch_size=3)
    proj = RademacherProjector(sum(p.numel() for n, p in model.named_parameters() if p.requires_grad), 64, seed=4)
    mem = projected_features(model, examples, proj, rt)
    disk = projected_features(model, examples, proj, rt, out_path=tmp_path / "f.npy", chunk_bytes=1)  # one example per chunk
    tol = 1e-5 * np.abs(mem).max()  # chunking changes only the float rounding of the matmul
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), mem, rtol=1e-4, atol=tol)
    np.testing.assert_array_equal(disk, np.load(tmp_path / "f.npy"))


def test_projected_scores_approach_exact_as_p_grows(model, examples, tokenizer):
    dom, cand = examples[:3], examples[3:]
    rt = rt_(tokenizer, batch_size=8)
    exact = run_stage2(model, dom, cand, rt, proj_dim=0).scores
    scale = np.abs(exact).max()
    errs = []
    for p in (64, 1024, 16384):
        errs.append(np.mean([np.abs(run_stage2(model, dom, cand, rt, proj_dim=p, seed=s).scores - exact).max() / scale for s in range(3)]))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.05


def test_bfloat16_scores_rank_like_float32(tiny_model_dir, tokenizer):
    from helpers import make_lora_model as mk
    from ntkselect.data.records import Record, tokenize_records

    model = mk(tiny_model_dir, seed=9)
    words = ["heart", "kidney", "liver", "bone", "blood", "lung", "skin", "brain", "nerve", "muscle"]
    recs = [
        Record(str(i), {"prompt": f"Tell me about the {w} number {i}.", "response": f"The {w} is an organ, fact {i * 7 % 13}."}, "m", i + 1)
        for i, w in enumerate(words * 4)
    ]
    ex, _ = tokenize_records(recs, tokenizer, 64)
    f32 = run_stage2(model, ex[:8], ex[8:], rt_(tokenizer, batch_size=8, dtype=torch.float32), proj_dim=0).scores
    bf16 = run_stage2(model, ex[:8], ex[8:], rt_(tokenizer, batch_size=8, dtype=torch.bfloat16), proj_dim=0).scores
    rank = lambda x: np.argsort(np.argsort(x))
    assert np.corrcoef(rank(f32), rank(bf16))[0, 1] >= 0.99  # Spearman (no ties here)
    assert not np.array_equal(f32, bf16)  # bfloat16 really was used
