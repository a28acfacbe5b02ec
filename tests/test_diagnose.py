"""Diagnostics: the numerical pieces against hand-computed cases, the per-output gradients and the
exact multi-output kernel against plain autograd on a small-vocabulary model, and the command
end to end on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ntkselect.cli.main import main
from ntkselect.data.batching import collate
from ntkselect.data.records import Record, TokenizedExample
from ntkselect.diagnostics.diagnose import (
    DiagnoseOptions,
    cos_f,
    kernel_ridge,
    kernel_ridge_loo,
    letter_accuracy,
    multiple_choice_examples,
    output_gradients,
    output_kernel_check,
    spearman,
)
from ntkselect.errors import NtkSelectError
from ntkselect.grads.fused import lora_parameters
from ntkselect.model.runtime import Runtime

V_SMALL = 48


# -- numerical pieces -------------------------------------------------------------------------


def test_cos_f_is_one_for_a_kernel_with_itself_and_ignores_scale():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 10))
    K = X @ X.T
    assert cos_f(K, K) == pytest.approx(1.0)
    assert cos_f(3.5 * K, K) == pytest.approx(1.0)
    assert cos_f(-K, K) == pytest.approx(-1.0)
    assert cos_f(np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]])) == 0.0
    assert math.isnan(cos_f(np.zeros((2, 2)), K[:2, :2]))
    A, B = np.array([[1.0, 2.0], [2.0, 4.0]]), np.array([[2.0, 0.0], [0.0, 1.0]])
    assert cos_f(A, B) == pytest.approx((2 + 4) / (5 * math.sqrt(5)))  # <A,B> = 6, |A| = 5, |B| = sqrt 5


def test_spearman_matches_a_hand_computed_case_with_ties():
    # ranks of b: 1, 2, 3.5, 5, 3.5; centred: (-2,-1,.5,2,.5) against (-2,-1,0,1,2): 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_kernel_ridge_solves_a_hand_checkable_problem():
    K = np.array([[2.0, 1.0], [1.0, 2.0]])
    y = np.array([[1.0], [-1.0]])
    # (K + I)^-1 = [[3, -1], [-1, 3]] / 8, alpha = (0.5, -0.5)
    assert kernel_ridge(K, y, np.array([[1.0, 0.0], [1.0, 1.0]]), ridge=1.0)[:, 0] == pytest.approx([0.5, 0.0])
    assert kernel_ridge(K, y, K, ridge=1e-12) == pytest.approx(y, abs=1e-9)  # interpolates without a ridge


def test_leave_one_out_closed_form_equals_refitting():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(9, 4))
    K = X @ X.T + 0.1
    y = rng.normal(size=(9, 3))
    loo = kernel_ridge_loo(K, y, ridge=0.3)
    for i in range(9):
        keep = [j for j in range(9) if j != i]
        refit = kernel_ridge(K[np.ix_(keep, keep)], y[keep], K[np.ix_([i], keep)], ridge=0.3)
        assert loo[i] == pytest.approx(refit[0], rel=1e-8, abs=1e-10)


def test_options_name_the_bad_field():
    with pytest.raises(NtkSelectError, match="--jf-outputs"):
        DiagnoseOptions(out="x", domain="d", pool="p", jf_outputs=1).validate()
    with pytest.raises(NtkSelectError, match="--proj-dim"):
        DiagnoseOptions(out="x", domain="d", pool="p", proj_dim=12).validate()
    with pytest.raises(NtkSelectError, match="--ridges"):
        DiagnoseOptions(out="x", domain="d", pool="p", ridges="0.1,-1").validate()
    with pytest.raises(NtkSelectError, match="--domain and --pool"):
        DiagnoseOptions(out="x").validate()


# -- per-output gradients against autograd ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab_model():
    """A 2-layer random Llama with a 48-token vocabulary (so all outputs can be differentiated one
    by one) and LoRA adapters with random B, as after a warm-up."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ntkselect.training.warmup import WarmupOptions, add_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V_SMALL,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    base = LlamaForCausalLM(cfg)
    base.requires_grad_(False)
    with torch.no_grad():  # a shared component in the head rows, as trained LM heads have
        base.lm_head.weight.add_(0.05 * torch.randn(1, cfg.hidden_size))
    model = add_lora(base, WarmupOptions(r=2, alpha=4, target_modules="all-linear", seed=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    return model


@pytest.fixture(scope="module")
def small_examples():
    rng = np.random.default_rng(3)
    out = []
    for n in (7, 11, 5):
        ids = rng.integers(1, V_SMALL, size=n).tolist()
        mask = [False, False] + [True] * (n - 2)
        out.append(TokenizedExample(input_ids=ids, train_mask=mask, truncated=False))
    return out


def _rt(batch_size=4):
    return Runtime(device=torch.device("cpu"), dtype=torch.float32, batch_size=batch_size, pad_id=0, progress=False)


def _autograd_jacobian(model, ex) -> torch.Tensor:
    """(V, P): ∇F_k for every output k from the full logits, F_k = mean over trained positions."""
    params = [p for _, p in lora_parameters(model)]
    batch = collate([ex], [0], 0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0]  # (L, V)
    m = batch.target_mask[0].bool()
    F = logits[m].mean(0)  # (V,)
    rows = []
    for k in range(F.shape[0]):
        gs = torch.autograd.grad(F[k], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows).double()


def test_output_gradients_equal_autograd_on_the_full_logits(small_vocab_model, small_examples):
    model, ex = small_vocab_model, small_examples[0]
    J = _autograd_jacobian(model, ex)
    W = model.get_base_model().lm_head.weight.detach()
    ks = [0, 5, 17, 47]
    rows = output_gradients(model, ex, W[ks], _rt(batch_size=3)).double()  # two batches of copies
    assert torch.allclose(rows, J[ks], rtol=1e-4, atol=1e-6)


def test_exact_trace_and_theta_tilde_equal_autograd_sums(small_vocab_model, small_examples):
    model, exs = small_vocab_model, small_examples
    Js = [_autograd_jacobian(model, e) for e in exs]
    info = output_kernel_check(model, exs, _rt(), method="exact", outputs=8, progress=False)
    assert info["method"] == "exact" and info["V"] == V_SMALL and info["d"] == 16
    for p in info["pairs"]:
        Ji, Jj = Js[p["i"]], Js[p["j"]]
        trace = float((Ji * Jj).sum())  # Σ_k <∇F_k(x), ∇F_k(x')>
        full = float(Ji.sum(0) @ Jj.sum(0))  # Σ_k Σ_k' <∇F_k(x), ∇F_k'(x')>
        offdiag = float((Ji @ Jj.T).sum() - (Ji * Jj).sum())
        assert p["trace"] == pytest.approx(trace, rel=1e-4)
        assert p["theta_tilde"] == pytest.approx(full, rel=1e-4)  # Θ̃ from the Jacobian-free gradient
        assert p["theta_tilde"] == pytest.approx(p["trace"] + offdiag, rel=1e-4)  # Θ̃ = trace + off-diagonal sum
        assert p["offdiag"] == pytest.approx(offdiag, rel=1e-3, abs=1e-6 * abs(full))
    assert info["theta_tilde_via_jacobian_rel_err"] < 1e-4
    # the cross-output cosines for the outputs it sampled, recomputed from autograd
    c = info["cross_output_cosine"]
    assert c["d_inv_sqrt"] == pytest.approx(0.25) and c["pairs"] == len(exs) * V_SMALL * (V_SMALL - 1) // 2  # all 48 outputs (< 256)
    cos = []
    for J in Js:
        Jn = J / J.norm(dim=1, keepdim=True)
        C = (Jn @ Jn.T).numpy()
        cos.append(C[np.triu_indices(V_SMALL, 1)])
    cos = np.concatenate(cos)
    assert c["mean"] == pytest.approx(cos.mean(), abs=1e-5) and c["mean_abs"] == pytest.approx(np.abs(cos).mean(), abs=1e-5)


def test_sampled_route_with_every_output_is_exact(small_vocab_model, small_examples):
    exact = output_kernel_check(small_vocab_model, small_examples, _rt(), method="exact", outputs=8, progress=False)
    every = output_kernel_check(small_vocab_model, small_examples, _rt(), method="sampled", outputs=V_SMALL, progress=False)
    assert every["outputs_sampled"] == V_SMALL
    for a, b in zip(exact["pairs"], every["pairs"]):
        assert b["trace"] == pytest.approx(a["trace"], rel=1e-4)
        assert b["trace_se"] == pytest.approx(0.0, abs=1e-9)  # the whole population: no sampling error
    assert every["cross_output_cosine"]["mean"] == pytest.approx(exact["cross_output_cosine"]["mean"], abs=1e-5)
    few = output_kernel_check(small_vocab_model, small_examples, _rt(), method="sampled", outputs=12, seed=5, progress=False)
    assert few["outputs_sampled"] == 12 and len(few["outputs"]) == 12 and all(p["trace_se"] > 0 for p in few["pairs"])


# -- multiple-choice questions on the real tokenizer ---------------------------------------------------


def _mc_records():
    from ntkselect.data.demo import mmlu_prompt

    qs = [
        ("Which organ pumps blood?", ["Liver", "Heart", "Lung", "Skin"], "B"),
        ("What is 2 + 2?", ["4", "5", "3", "22"], "A"),
        ("Which bone is in the thigh?", ["Radius", "Ulna", "Tibia", "Femur"], "D"),
    ]
    return [
        Record(str(i), {"prompt": mmlu_prompt(q, o), "response": f"{a}. {o['ABCD'.index(a)]}", "answer": a}, "mem.jsonl", i + 1)
        for i, (q, o, a) in enumerate(qs)
    ]


def test_letter_accuracy_reads_the_letter_logits_after_the_prompt(tiny_model_dir, tokenizer):
    from ntkselect.model.loading import load_model

    mc = multiple_choice_examples(_mc_records(), tokenizer, 256, "auto")
    assert len(set(mc.letter_ids)) == 4 and mc.labels.tolist() == [1, 0, 3]
    assert [tokenizer.decode([i]).strip() for i in mc.letter_ids] == ["A", "B", "C", "D"]
    for e in mc.examples:
        assert sum(e.train_mask) == 1 and e.train_mask[-1] and e.input_ids[-1] == mc.letter_ids[0]
    model = load_model(tiny_model_dir)
    acc, pred = letter_accuracy(model, mc, _rt())
    for e, p in zip(mc.examples, pred):
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, -2]  # the position that predicts the letter
        assert p == int(logits[mc.letter_ids].argmax())
    assert acc == pytest.approx(float((pred == mc.labels).mean()))


# -- end to end on the tiny model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    from ntkselect.data.demo import build_demo_data

    d = tmp_path_factory.mktemp("diag-data")
    build_demo_data(d, n_domain=26, n_pool_mmlu=16, n_pool_reasoning=0, seed=0)
    return d / "domain.jsonl", d / "pool.jsonl"


def _args(demo_files, model, out, *extra):
    dom, pool = demo_files
    return [
        "diagnose",
        "--domain",
        str(dom),
        "--pool",
        str(pool),
        "--model",
        model,
        "--out",
        str(out),
        "--n-domain",
        "6",
        "--n-candidates",
        "8",
        "--epochs",
        "2",
        "--proj-dim",
        "256",
        "--jf-examples",
        "4",
        "--jf-outputs",
        "8",
        "--n-test",
        "8",
        "--krr-train",
        "12",
        "--precision",
        "float32",
        "--batch-size",
        "8",
        *map(str, extra),
    ]


def test_diagnose_writes_every_number_and_plot(demo_files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(_args(demo_files, tiny_model_dir, out)) == 0
    assert "cos_F vs first" in capsys.readouterr().out
    d = json.loads((out / "diagnostics.json").read_text())
    ks = d["kernel_stability"]
    steps = [r["step"] for r in ks["checkpoints"]]
    assert steps == d["fine_tune"]["checkpoint_steps"] and steps[0] == 0 and len(steps) == 3  # before training, after each epoch
    first = ks["checkpoints"][0]
    assert first["cos_f"] == pytest.approx(1.0) and first["rank_spearman"] == pytest.approx(1.0)
    assert all(-1 <= r["cos_f"] <= 1 + 1e-9 and -1 <= r["rank_spearman"] <= 1 + 1e-9 for r in ks["checkpoints"])
    npz = np.load(out / "kernels.npz")
    assert npz["kernels"].shape == (3, 14, 14) and npz["scores"].shape == (3, 8)
    for r, K, s in zip(ks["checkpoints"], npz["kernels"], npz["scores"]):  # the JSON numbers come from the saved kernels
        assert r["cos_f"] == pytest.approx(cos_f(K, npz["kernels"][0]))
        assert s == pytest.approx(K[:6, 6:].mean(0))
        assert r["rank_spearman"] == pytest.approx(spearman(s, npz["scores"][0]))
    assert np.allclose(np.diag(np.asarray(ks["cos_f_matrix"])), 1.0)

    jf = d["jacobian_free"]
    assert jf["method"] == "sampled" and jf["outputs_sampled"] == 8 and jf["d"] == 32 and jf["examples"] == 4
    assert len(jf["pairs"]) == 10  # i <= j over 4 examples
    c = jf["cross_output_cosine"]
    assert c["pairs"] == 4 * 28 and c["d_inv_sqrt"] == pytest.approx(32**-0.5) and c["mean_abs"] >= abs(c["mean"])
    for p in jf["pairs"]:
        assert p["offdiag"] == pytest.approx(p["theta_tilde"] - p["trace"])

    kr = d["kernel_regression"]
    assert kr["n_test"] == 8 and kr["n_train"] == 12 and d["data"]["domain_train"] == 18
    assert len(kr["per_checkpoint"]) == 3 and all(0 <= r["krr_accuracy"] <= 1 and 0 <= r["model_accuracy"] <= 1 for r in kr["per_checkpoint"])
    for name in ("kernel_stability.png", "jacobian_free.png", "kernel_regression.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and name in d["plots"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s:05d}" for s in steps]
    assert (out / "checkpoints" / "step-00000" / "adapter_config.json").exists()

    # a rerun refuses without --overwrite
    assert main(_args(demo_files, tiny_model_dir, out)) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_diagnose_without_labels_skips_the_kernel_regression(tiny_model_dir, tmp_path):
    from ntkselect.diagnostics.diagnose import DiagnoseOptions, diagnose

    dom = tmp_path / "d.jsonl"
    dom.write_text("".join(json.dumps({"text": f"The patient number {i} has a fever and a cough."}) + "\n" for i in range(6)))
    pool = tmp_path / "p.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "response": str(2 * i)}) + "\n" for i in range(6)))
    d = diagnose(
        DiagnoseOptions(
            out=str(tmp_path / "o"),
            domain=str(dom),
            pool=str(pool),
            model=tiny_model_dir,
            n_domain=3,
            n_candidates=4,
            epochs=1,
            proj_dim=0,
            jf_examples=2,
            jf_outputs=64,
            precision="float32",
        ),
        log=lambda *a: None,
    )
    assert "labelled" in d["kernel_regression"]["skipped"]
    assert d["jacobian_free"]["method"] == "exact"  # d = 32 <= 64 outputs: all V outputs through the hidden-state Jacobian
    assert d["jacobian_free"]["cross_output_cosine"]["pairs"] == 2 * 256 * 255 // 2
    assert d["kernel_stability"]["checkpoints"][-1]["epoch"] == pytest.approx(1.0)


def test_diagnose_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ntkselect", "diagnose", "--run", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("ntkselect: error:")]
    assert len(err) == 1 and "manifest.json" in err[0]
    assert main(["diagnose", "--out", str(tmp_path / "o")]) == 2


def test_options_from_a_run_take_its_data_and_model(tmp_path):
    from ntkselect.files import sha256_path

    d, p = tmp_path / "d.jsonl", tmp_path / "p.jsonl"
    d.write_text('{"text": "domain"}\n')
    p.write_text('{"text": "pool"}\n')
    inputs = {"domain": {"path": str(d), "sha256": sha256_path(d)}, "pool": {"path": str(p), "sha256": sha256_path(p)}}
    cfg = {"domain": str(d), "pool": str(p), "model": "m", "lora_r": 4, "max_length": 128}
    manifest = {"tool": "ntkselect", "complete": True, "method": "ntk", "summary": {}, "config": cfg, "inputs": inputs}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    opts = DiagnoseOptions.from_run(str(tmp_path), out="o", lora_r=8, max_length=64)
    assert (opts.domain, opts.pool, opts.model, opts.lora_r, opts.max_length) == (str(d), str(p), "m", 4, 64)  # a default does not override; a flag does


@pytest.mark.slow
def test_real_model_summed_head_cotangent_gives_the_jacobian_free_gradient(tokenizer):
    """On SmolLM2 (V = 49152, d = 576): the per-output route with the cotangent Σ_k w_k is the
    stage-2 gradient g(x), and a small sampled check gives finite, sane statistics."""
    from ntkselect.data.records import tokenize_records
    from ntkselect.diagnostics.diagnose import _head_matrix
    from ntkselect.model.loading import load_model
    from ntkselect.selection.ntk.stage2 import per_example_gradients
    from ntkselect.training.warmup import WarmupOptions, add_lora

    model = add_lora(load_model(None), WarmupOptions(r=2, alpha=4, seed=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ex, _ = tokenize_records(
        [
            Record("0", {"prompt": "Which organ pumps blood?", "response": "The heart."}, "mem.jsonl", 1),
            Record("1", {"text": "Insulin lowers blood sugar."}, "mem.jsonl", 2),
        ],
        tokenizer,
        64,
        "auto",
    )
    W, wbar = _head_matrix(model)
    assert W.shape == (49152, 576)
    rt = _rt()
    g = per_example_gradients(model, ex[:1], rt)[0].double()
    row = output_gradients(model, ex[0], wbar[None], rt)[0].double()
    assert float((row - g).norm() / g.norm()) < 1e-3
    info = output_kernel_check(model, ex, rt, method="sampled", outputs=4, progress=False)
    c = info["cross_output_cosine"]
    assert info["d"] == 576 and c["pairs"] == 2 * 6 and -1 <= c["mean"] <= 1 and c["d_inv_sqrt"] == pytest.approx(576**-0.5)
    assert all(math.isfinite(p["trace"]) and p["trace_se"] >= 0 for p in info["pairs"])
