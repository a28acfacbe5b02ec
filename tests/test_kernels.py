"""NTK-Selector variants (issue 11): each kernel's scores against plain autograd on the full
logits, the cheap gradient norm against the materialised gradient, the Hutchinson trace
estimate against the exact trace kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_lora_model, naive_gradients, synthetic_examples, tiny_lora_model
from ntkselect.data.batching import collate
from ntkselect.grads.fused import lora_parameters
from ntkselect.model.runtime import Runtime
from ntkselect.selection.ntk.stage2 import run_stage2
from ntkselect.selection.ntk_variants.kernels import Kernel, candidate_scores, domain_vectors, probe_signs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return make_lora_model(tiny_model_dir, seed=5)


def rt_(pad_id, **kw):
    return Runtime(pad_id=pad_id, progress=False, dtype=torch.float32, **kw)


def variant_scores(model, dom, cand, rt, kernel, proj_dim=0, seed=0):
    vecs, _ = domain_vectors(model, dom, rt, kernel, proj_dim, seed)
    return candidate_scores(model, cand, rt, kernel, vecs)  # (n, 2): score, Θ(c, c)


def naive_objective_gradients(model, examples, pad_id, objective):
    """One example at a time, plain autograd: ∇ objective(full (T, V) logits, batch) for each example."""
    params = [p for _, p in lora_parameters(model)]
    out = []
    for i, e in enumerate(examples):
        b = collate([e], [i], pad_id)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits[0]  # (T, V)
        outs = objective(logits, b)
        out.append(torch.stack([torch.cat([x.reshape(-1) for x in torch.autograd.grad(f, params, retain_graph=True)]) for f in outs]))
    return torch.stack(out).double()  # (n, G, D)


def probed(signs):
    """The trace kernel's objectives on the full logits: f_r = (1/T) Σ_t ε_r·logit_t."""

    def f(logits, b):
        m = b.target_mask[0]
        return [((logits @ eps) * m).sum() / m.sum() for eps in signs]

    return f


def mean_nll(logits, b):
    """The example's mean NLL over its trained tokens: logit t-1 predicts token t."""
    ids, m = b.input_ids[0], b.target_mask[0].bool()
    return [torch.nn.functional.cross_entropy(logits[:-1][m[:-1]], ids[1:][m[:-1]])]


def kernel_reference(gd, gc):
    """(n_c,) s_j = mean_i (1/G) Σ_g ⟨g_g(x_i), g_g(c_j)⟩ and (n_c,) Θ(c_j, c_j), from (n, G, D) gradients."""
    s = torch.einsum("igd,jgd->j", gd, gc) / (gd.shape[0] * gd.shape[1])
    diag = (gc**2).sum((1, 2)) / gc.shape[1]
    return s.numpy(), diag.numpy()


def close(a, b, rtol=1e-4):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# -- 1. normalised gradients: the cheap norm ----------------------------------------------------


def test_cheap_norm_equals_the_norm_of_the_materialised_gradient(model, examples, tokenizer):
    rt = rt_(tokenizer.pad_token_id, batch_size=3)
    got = variant_scores(model, examples[:2], examples, rt, Kernel("sum"))
    g = naive_gradients(model, examples, tokenizer.pad_token_id).double()  # (n, D) on the full logits
    close(np.sqrt(got[:, 1]), g.norm(dim=1).numpy())


@pytest.mark.parametrize("family", ["gpt2", "opt"])  # a Conv1D model, and one that flattens the batch before its linear layers
def test_cheap_norm_on_other_layer_layouts(family):
    model = tiny_lora_model(family, seed=2)
    ex = synthetic_examples(5, seed=3)
    got = variant_scores(model, ex[:2], ex, rt_(0, batch_size=4), Kernel("sum"))
    g = naive_gradients(model, ex, 0).double()
    close(np.sqrt(got[:, 1]), g.norm(dim=1).numpy())


def test_sum_kernel_and_normalised_scores_equal_the_reference(model, examples, tokenizer):
    dom, cand = examples[:3], examples[3:]
    rt = rt_(tokenizer.pad_token_id, batch_size=2)
    got = variant_scores(model, dom, cand, rt, Kernel("sum"))
    gd = naive_gradients(model, dom, tokenizer.pad_token_id).double()
    gc = naive_gradients(model, cand, tokenizer.pad_token_id).double()
    ref = (gc @ gd.T).mean(1).numpy()
    close(got[:, 0], ref)
    close(got[:, 0], run_stage2(model, dom, cand, rt, proj_dim=0).scores)  # the faithful score
    close(got[:, 0] / np.sqrt(got[:, 1]), ref / gc.norm(dim=1).numpy())  # --normalise


def test_projected_variant_scores_equal_ntk_projected(model, examples, tokenizer):
    dom, cand = examples[:4], examples[4:]
    rt = rt_(tokenizer.pad_token_id, batch_size=4)
    got = variant_scores(model, dom, cand, rt, Kernel("sum"), proj_dim=256, seed=7)
    close(got[:, 0], run_stage2(model, dom, cand, rt, proj_dim=256, seed=7).scores)


def test_scores_do_not_depend_on_batching_or_padding(model, examples, tokenizer):
    dom, cand = examples[:3], examples[3:]
    k = Kernel("trace", probes=3, seed=1)
    a = variant_scores(model, dom, cand, rt_(tokenizer.pad_token_id, batch_size=1), k)
    b = variant_scores(model, dom, cand, rt_(tokenizer.pad_token_id, batch_size=8, padding_side="left"), k)
    close(a, b, rtol=1e-5)


# -- 3. the trace kernel -----------------------------------------------------------------------


def test_trace_kernel_equals_autograd_for_the_same_probes(model, examples, tokenizer):
    dom, cand = examples[:3], examples[3:6]
    k = Kernel("trace", probes=4, seed=3)
    got = variant_scores(model, dom, cand, rt_(tokenizer.pad_token_id, batch_size=5), k)
    V = model.get_output_embeddings().weight.shape[0]
    signs = probe_signs(V, 4, 3)
    f = probed(signs)
    s, diag = kernel_reference(
        naive_objective_gradients(model, dom, tokenizer.pad_token_id, f), naive_objective_gradients(model, cand, tokenizer.pad_token_id, f)
    )
    close(got[:, 0], s)
    close(got[:, 1], diag)


def test_probes_depend_on_the_seed_only():
    a = probe_signs(96, 5, seed=4)
    assert torch.equal(a, probe_signs(96, 5, seed=4)) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(probe_signs(96, 8, seed=4)[:5], a)  # more probes extend the same ones
    assert not torch.equal(a, probe_signs(96, 5, seed=5))


def test_trace_estimate_converges_to_the_exact_trace_kernel():
    """At V = 96 the exact trace kernel Σ_k ⟨∇f_k(x), ∇f_k(c)⟩ (f_k = (1/T) Σ_t logit[t,k]) is V
    autograd passes per example; the Hutchinson estimate's error falls like 1/√R."""
    model = tiny_lora_model("llama", seed=1)
    ex = synthetic_examples(6, seed=2)
    dom, cand = ex[:3], ex[3:]
    rt = rt_(0, batch_size=64, max_batch_tokens=1 << 16)
    eye = torch.eye(model.get_output_embeddings().weight.shape[0])
    gd, gc = (naive_objective_gradients(model, x, 0, probed(eye)) for x in (dom, cand))  # (n, V, D)
    exact = torch.einsum("ikd,jkd->j", gd, gc).numpy() / len(dom)
    exact_diag = (gc**2).sum((1, 2)).numpy()
    scale = np.abs(exact).max()
    errs, diag_errs = [], []
    for R in (4, 64, 1024):
        est = [variant_scores(model, dom, cand, rt, Kernel("trace", probes=R, seed=s)) for s in range(2)]
        errs.append(np.mean([np.abs(e[:, 0] - exact).max() / scale for e in est]))  # E[ε εᵀ] = I: the estimate is of Σ_k itself
        diag_errs.append(np.mean([np.abs(e[:, 1] - exact_diag).max() / exact_diag.max() for e in est]))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.1, errs
    assert diag_errs[0] > diag_errs[2] and diag_errs[2] < 0.1, diag_errs


# -- 4. the loss-gradient kernel ---------------------------------------------------------------


def test_loss_kernel_equals_autograd_of_the_mean_nll(model, examples, tokenizer):
    dom, cand = examples[:3], examples[3:]
    got = variant_scores(model, dom, cand, rt_(tokenizer.pad_token_id, batch_size=3), Kernel("loss"))
    gd, gc = (naive_objective_gradients(model, x, tokenizer.pad_token_id, mean_nll) for x in (dom, cand))
    s, diag = kernel_reference(gd, gc)
    close(got[:, 0], s)
    close(got[:, 1], diag)
    assert not np.allclose(got[:, 0], run_stage2(model, dom, cand, rt_(tokenizer.pad_token_id), proj_dim=0).scores, rtol=0.1)  # not the summed logits


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "gpt2"])  # soft-capped, logit_scale, logits_scaling, Conv1D
@pytest.mark.parametrize("kind", ["sum", "trace", "loss"])
def test_every_kernel_equals_autograd_across_heads(family, kind):
    model = tiny_lora_model(family, seed=4)
    ex = synthetic_examples(6, seed=5)
    dom, cand = ex[:3], ex[3:]
    k = Kernel(kind, probes=3 if kind == "trace" else 1, seed=2)
    got = variant_scores(model, dom, cand, rt_(0, batch_size=4), k)
    V = model.get_output_embeddings().weight.shape[0]
    f = {"sum": probed(torch.ones(1, V)), "trace": probed(probe_signs(V, 3, 2)), "loss": mean_nll}[kind]
    gd, gc = (naive_objective_gradients(model, x, 0, f) for x in (dom, cand))
    s, diag = kernel_reference(gd, gc)
    close(got[:, 0], s)
    close(got[:, 1], diag)


# -- 5. the cosine kernel (ntk-cos, ntk-plus --cosine) -----------------------------------------


def cosine_reference(gd, gc):
    """(n_c,) mean_i Θ(x_i, c_j) / √(Θ(x_i, x_i) Θ(c_j, c_j)) from (n, G, D) gradients, Θ = (1/G) Σ_g ⟨·, ·⟩."""
    G = gd.shape[1]
    theta = torch.einsum("igd,jgd->ij", gd, gc) / G  # (n_d, n_c)
    nd, nc = ((g**2).sum((1, 2)) / G for g in (gd, gc))
    return (theta / torch.sqrt(nd[:, None] * nc[None, :])).mean(0).numpy()


@pytest.mark.parametrize("kind", ["sum", "trace", "loss"])
def test_cosine_kernel_equals_the_mean_cosine_of_autograd_gradients(kind, model, examples, tokenizer):
    dom, cand = examples[:4], examples[4:]
    k = Kernel(kind, probes=3 if kind == "trace" else 1, seed=2)
    rt = rt_(tokenizer.pad_token_id, batch_size=3)
    vecs, info = domain_vectors(model, dom, rt, k, cosine=True)
    got = candidate_scores(model, cand, rt, k, vecs)  # (n, 2): mean_i Θ(x_i, c) / √Θ(x_i, x_i), Θ(c, c)
    V = model.get_output_embeddings().weight.shape[0]
    f = {"sum": probed(torch.ones(1, V)), "trace": probed(probe_signs(V, 3, 2)), "loss": mean_nll}[kind]
    gd, gc = (naive_objective_gradients(model, x, tokenizer.pad_token_id, f) for x in (dom, cand))
    close(got[:, 0] / np.sqrt(got[:, 1]), cosine_reference(gd, gc))
    assert info["tokens"] == 2 * k.groups * sum(len(e.input_ids) for e in dom)  # the norms' pass and the weighted sum
    plain = candidate_scores(model, cand, rt, k, domain_vectors(model, dom, rt, k)[0])
    assert not np.allclose(got[:, 0], plain[:, 0], rtol=1e-2)  # the domain side is normalised too


def test_a_domain_example_with_a_zero_gradient_has_no_cosine(model, examples, tokenizer):
    import dataclasses

    from ntkselect.errors import NtkSelectError

    dead = dataclasses.replace(examples[0], train_mask=[False] * len(examples[0].input_ids))  # no trained token: f = 0
    with pytest.raises(NtkSelectError, match="zero gradient, so its cosine is undefined"):
        domain_vectors(model, [dead, *examples[1:3]], rt_(tokenizer.pad_token_id), Kernel("sum"), cosine=True, ids=["a", "b", "c"])
