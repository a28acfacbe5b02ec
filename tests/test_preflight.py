"""The preflight: an unsupported model stops ``select``, ``--dry-run``, ``evaluate`` and ``diagnose``
in seconds, with one ``ntkselect: error:`` line, exit status 2 and nothing written; a supported one
comes back from it exactly as it went in."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from ntkselect.cli.main import main

TOPICS = ["blood pressure", "the kidney", "a fracture", "insulin", "fever", "the liver"]


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pf-data")
    dom = [{"question": f"What about {t}?", "answer": "B", "options": ["w", "x", "y", "z"]} for t in TOPICS]
    pool = [{"id": f"p{i}", "prompt": f"Question {i} on {t}.", "response": f"{t} is topic {i}."} for i, t in enumerate(TOPICS * 3)]
    test = [{"question": f"And {t}?", "answer": "A", "options": ["w", "x", "y", "z"]} for t in ("a bone", "a cell", "a gene")]
    return _jsonl(d / "domain.jsonl", dom), _jsonl(d / "pool.jsonl", pool), _jsonl(d / "test.jsonl", test)


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def unknown_head_dir(tmp_path_factory, tokenizer):
    """A Llama whose configuration claims soft-capping its code does not do: ntkselect would compute
    other logits than the model's, which only the preflight's comparison can tell."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.final_logit_softcapping = 0.5
    return _save(LlamaForCausalLM(cfg), tokenizer, tmp_path_factory.mktemp("unknown-head"))


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tokenizer):
    """Tiny models of other families with the test tokenizer's vocabulary, saved as HF folders."""
    from helpers import tiny_model

    made = {}

    def get(name):
        if name not in made:
            model = tiny_model(name, vocab=len(tokenizer))
            made[name] = _save(model, tokenizer, tmp_path_factory.mktemp(name))
        return made[name]

    return get


def _error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "%|" not in ln and ln.strip()]  # not the HF progress bars
    assert len(err) == 1 and err[0].startswith("ntkselect: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


def _select(files, model, out, *extra):
    dom, pool, _ = files
    return ["select", "--domain", dom, "--pool", pool, "--n", 3, "--out", str(out), "--model", model, "--threads", 1, "--knn-k", 2, *extra]


@pytest.mark.parametrize(
    "case,expect",
    [
        ("unknown-head", "post-processing ntkselect knows"),
        # caught by the option check (model.check_model_options) before select's preflight, by the preflight in the dry run
        ("embedding-lora", "'embed_tokens' is not a linear layer|LoRA on Embedding layers is not supported"),
        ("no-such-module", "--lora-target-modules"),
        ("moe-router", "peft target_parameters|'gate' is not a linear layer"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["select", "dry-run"])
def test_unsupported_model_stops_select_at_once(files, tiny_model_dir, unknown_head_dir, family_dir, tmp_path, capsys, case, expect, dry_run):
    model, extra = tiny_model_dir, []
    if case == "unknown-head":
        model = unknown_head_dir
    elif case == "embedding-lora":
        extra = ["--lora-target-modules", "embed_tokens"]
    elif case == "no-such-module":
        extra = ["--lora-target-modules", "no_such_proj"]
    else:
        model, extra = family_dir("mixtral"), ["--lora-target-modules", "q_proj,gate"]
    out = tmp_path / "run"
    t = time.perf_counter()
    assert main([str(a) for a in _select(files, model, out, *extra, *(["--dry-run"] if dry_run else []))]) == 2
    assert time.perf_counter() - t < 60
    err = _error(capsys)
    assert any(e in err for e in expect.split("|")), err
    assert not out.exists()


def test_unsupported_model_stops_evaluate_and_diagnose(files, unknown_head_dir, tmp_path, capsys):
    dom, pool, test = files
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--domain-train",
                dom,
                "--domain-test",
                test,
                "--pool",
                pool,
                "--n",
                "2",
                "--out",
                str(out),
                "--model",
                unknown_head_dir,
                "--methods",
                "random",
                "--seeds",
                "1",
                "--threads",
                "1",
            ]
        )
        == 2
    )
    assert "post-processing ntkselect knows" in _error(capsys) and not out.exists()
    out = tmp_path / "diag"
    assert main(["diagnose", "--domain", dom, "--pool", pool, "--out", str(out), "--model", unknown_head_dir, "--n-test", "0", "--threads", "1"]) == 2
    assert "post-processing ntkselect knows" in _error(capsys) and not out.exists()


def test_diagnose_exact_route_needs_a_linear_head(files, family_dir, tmp_path, capsys):
    dom, pool, _ = files
    out = tmp_path / "diag"
    assert (
        main(
            [
                "diagnose",
                "--domain",
                dom,
                "--pool",
                pool,
                "--out",
                str(out),
                "--model",
                family_dir("gemma2"),
                "--n-test",
                "0",
                "--jf-method",
                "exact",
                "--threads",
                "1",
            ]
        )
        == 2
    )
    assert "--jf-method sampled" in _error(capsys) and not out.exists()


@pytest.mark.parametrize("method", ["ntk", "less"])
def test_soft_capped_model_selects_with_a_one_line_notice(files, family_dir, tmp_path, capsys, method):
    out = tmp_path / "run"
    assert main([str(a) for a in _select(files, family_dir("gemma2"), out, "--method", method, "--less-proj-dim", 64)]) == 0
    printed = capsys.readouterr().out
    notes = [ln for ln in printed.splitlines() if "soft-caps its logits" in ln]
    assert len(notes) == (1 if method == "ntk" else 0), printed
    assert (out / "manifest.json").exists()


def test_the_checked_model_comes_back_unchanged(tiny_model_dir, examples, tokenizer):
    from helpers import make_lora_model
    from ntkselect.grads.fused import lora_parameters
    from ntkselect.model.runtime import Runtime
    from ntkselect.runs.preflight import check_model

    model = make_lora_model(tiny_model_dir, seed=3)
    model.train()
    before = {n: p.detach().clone() for n, p in lora_parameters(model)}
    flags = [m.training for m in model.modules()]
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    res = check_model(
        model,
        Runtime(pad_id=tokenizer.pad_token_id, progress=False),
        examples,
        ("warmup", "embed", "ntk", "less", "loss", "diagnose"),
        proj_dim=8,
        log=lambda m: None,
    )
    assert set(res.paths) == {"warmup", "embed", "ntk", "less", "loss", "diagnose"} and res.notice is None
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    for n, p in lora_parameters(model):
        assert torch.equal(p.detach(), before[n]) and p.grad is None, n
