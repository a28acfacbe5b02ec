"""``ntkselect select --dry-run`` (ntkselect.runs.plan) on the tiny model: it writes nothing, and its
counts are the real ones (tokens, LoRA gradient dimension, embedding array size)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import PLAN_POOL, plan_config
from ntkselect.cli.main import main
from ntkselect.config import SelectConfig
from ntkselect.runs.plan import estimate, format_plan


def test_dry_run_prints_the_plan_and_writes_nothing(plan_files, tiny_model_dir, tmp_path, capsys):
    dom, pool = plan_files
    out = tmp_path / "never" / "run"
    argv = ["select", "--domain", dom, "--pool", pool, "--n", 3, "--out", out, "--model", tiny_model_dir, "--threads", 1, "--dry-run"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    for s in ("dry run", "warm-up", "stage 1", "stage 2", "memory", "disk", "gradient dimension", "will be created"):
        assert s in printed, s
    assert not (tmp_path / "never").exists()
    # an existing, empty --out stays empty
    out.mkdir(parents=True)
    assert main([str(a) for a in argv]) == 0
    assert list(out.iterdir()) == []


def test_token_counts_equal_a_direct_tokenization(plan_files, tiny_model_dir, tmp_path):
    from ntkselect.data.records import load_records, record_text, tokenize_records
    from ntkselect.model.loading import load_tokenizer

    cfg = plan_config(plan_files, tiny_model_dir, tmp_path / "run", warmup_epochs=2.0)
    plan = estimate(cfg)
    tok = load_tokenizer(tiny_model_dir)
    domain = load_records(plan_files[0])
    dom_texts = {record_text(r.raw) for r in domain}
    pool = [r for r in load_records(plan_files[1]) if record_text(r.raw) not in dom_texts]
    _, ds = tokenize_records(domain, tok, cfg.max_length, cfg.template)
    pex, ps = tokenize_records(pool, tok, cfg.max_length, cfg.template)
    d, p = plan["data"]["domain"], plan["data"]["pool"]
    assert (d["tokens"], d["trained_tokens"], d["truncated"]) == (ds.tokens, ds.trained_tokens, ds.truncated)
    assert (p["tokens"], p["trained_tokens"], p["truncated"]) == (ps.tokens, ps.trained_tokens, ps.truncated)
    assert ps.truncated > 0  # --max-length 24 cuts the long pool records: counted, not fatal
    assert p["records"] == len(PLAN_POOL) - 1 and p["excluded_duplicates_of_domain"] == 1
    stages = {s["stage"]: s for s in plan["stages"]}
    assert stages["warm-up"]["tokens"] == 2 * ds.tokens
    assert stages["stage 1"]["tokens"] == ds.tokens + ps.tokens
    m = plan["data"]["m"]
    assert m == min(4 * 3, len(pool))
    assert stages["stage 2"]["tokens"] == round(ds.tokens + m * ps.tokens / len(pool))
    assert stages["stage 1"]["padded_tokens"] >= stages["stage 1"]["tokens"]
    # FLOPs: 2 x params x padded tokens forward, x 3 with the backward pass
    P = plan["model"]["params"]
    assert stages["stage 1"]["flops"] == 2 * P * stages["stage 1"]["padded_tokens"]
    assert stages["warm-up"]["flops"] == pytest.approx(6 * P * stages["warm-up"]["padded_tokens"], rel=1e-9)
    assert plan["total_seconds"] > 0 and plan["memory"]["peak"] > plan["memory"]["weights"] > 0
    assert "stage 2" in format_plan(plan)


@pytest.mark.parametrize("r,target", [(8, "all-linear"), (4, "q_proj,v_proj")])
def test_grad_dim_equals_the_real_lora_parameter_count(plan_files, tiny_model_dir, tmp_path, r, target):
    from ntkselect.grads.fused import lora_parameters
    from ntkselect.model.loading import load_model
    from ntkselect.training.warmup import WarmupOptions, add_lora

    plan = estimate(plan_config(plan_files, tiny_model_dir, tmp_path / "run", lora_r=r, lora_target_modules=target))
    base = load_model(tiny_model_dir)
    assert plan["model"]["params"] == sum(p.numel() for p in base.parameters())
    model = add_lora(base, WarmupOptions(r=r, alpha=2.0 * r, target_modules=SelectConfig(lora_target_modules=target).target_modules()))
    assert plan["lora"]["grad_dim"] == plan["model"]["grad_dim"] == sum(p.numel() for _, p in lora_parameters(model))
    assert plan["disk"]["adapter"] == 4 * plan["lora"]["grad_dim"]


def test_embedding_disk_is_pool_times_hidden_times_4(plan_files, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    plan = estimate(plan_config(plan_files, tiny_model_dir, tmp_path / "run"))
    hidden = AutoConfig.from_pretrained(tiny_model_dir).hidden_size
    n_pool = len(PLAN_POOL) - 1  # the domain duplicate is not embedded
    assert plan["model"]["hidden_size"] == hidden
    assert plan["disk"]["embeddings"] == n_pool * hidden * 4
    assert plan["disk"]["tokenised_pool"] > 0  # the token store (priced against a real store in test_pool.py)
    assert plan["disk"]["temporary"] == n_pool * hidden * 4 + plan["disk"]["tokenised_pool"]


def test_methods_without_a_model_and_less(plan_files, tiny_model_dir, tmp_path):
    rnd = estimate(plan_config(plan_files, tiny_model_dir, tmp_path / "run", method="random"))
    assert [s["stage"] for s in rnd["stages"]] == ["load"] and rnd["model"] is None and rnd["disk"]["adapter"] == 0
    less = estimate(plan_config(plan_files, tiny_model_dir, tmp_path / "run", method="less", less_proj_dim=64))
    assert [s["stage"] for s in less["stages"]] == ["load", "warm-up", "less"]
    assert less["disk"]["less_features"] == (len(PLAN_POOL) - 1) * 64 * 4 and less["disk"]["embeddings"] == 0


@pytest.mark.parametrize(
    "problem,expect",
    [
        ("n-too-large", "larger than the pool"),
        ("finished-run", "--overwrite"),
        ("out-under-a-file", "cannot write to --out"),
        ("less-without-warmup", "--warmup-epochs"),
    ],
)
def test_dry_run_stops_where_the_real_run_would(plan_files, tiny_model_dir, tmp_path, capsys, problem, expect):
    dom, pool = plan_files
    out = tmp_path / "run"
    extra: list = []
    n = 3
    if problem == "n-too-large":
        n = 100
    elif problem == "finished-run":
        out.mkdir()
        (out / "manifest.json").write_text("{}")
    elif problem == "out-under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        extra = ["--method", "less", "--warmup-epochs", 0]
    argv = ["select", "--domain", dom, "--pool", pool, "--n", n, "--out", out, "--model", tiny_model_dir, "--threads", 1, "--dry-run", *extra]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ntkselect: error:") and expect in err[0], err
    if problem == "finished-run":
        assert [p.name for p in out.iterdir()] == ["manifest.json"]
    else:
        assert not Path(out).exists()
