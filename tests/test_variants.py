"""The NTK-Selector variants behind `select`, `--dry-run` and `evaluate`: `ntk-plus` at its
defaults is ntk, each preset runs end to end, bad option values are one-line errors naming
the flag, and `evaluate` takes them (its fingerprint unchanged at the defaults)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ntkselect.cli.main import main

PRESETS = ("ntk-plus", "ntk-norm", "ntk-trace", "ntk-loss", "ntk-diverse", "ntk-ensemble", "ntk-cos", "ntk-vote")


def _args(data, model, out, method, *extra):
    dom, pool, _ = data
    args = ["select", "--domain", dom, "--pool", pool, "--n", 4, "--out", out, "--model", model, "--method", method]
    args += ["--warmup-epochs", 1, "--knn-k", 2, "--precision", "float32", "--batch-size", 4, "--probes", 3, *extra]
    return [str(a) for a in args]


def _rows(out):
    sel = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return sel, scores, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def ntk_run(data, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ntk") / "run"
    assert main(_args(data, tiny_model_dir, out, "ntk")) == 0
    return _rows(out)


@pytest.mark.parametrize("method", PRESETS)
def test_each_variant_selects_n_distinct_candidates_of_stage_1(method, data, tiny_model_dir, tmp_path, ntk_run):
    out = tmp_path / "run"
    assert main(_args(data, tiny_model_dir, out, method)) == 0
    sel, scores, man = _rows(out)
    assert len(sel) == 4 and all(r["selection_method"] == method for r in sel)
    assert [r["selection_score"] for r in sel] == sorted((r["selection_score"] for r in sel), reverse=True)
    if method != "ntk-vote":
        assert {r["id"] for r in scores} == {r["id"] for r in ntk_run[1]}  # the same stage-1 candidates as ntk
    assert (out / "adapter").exists() and man["method"] == method and man["cost"]["tokens"] > 0
    assert {"kernel_score", "grad_norm", "votes"} <= set(scores[0])
    var = man["selector"]["variant"]
    assert (
        var
        == {
            "ntk-plus": {"kernel": "sum", "probes": 1, "normalise": False, "diversity_lambda": 0.0, "checkpoints": 1, "cosine": False, "vote": "count"},
            "ntk-norm": {"kernel": "sum", "probes": 1, "normalise": True, "diversity_lambda": 0.0, "checkpoints": 1, "cosine": False, "vote": "count"},
            "ntk-trace": {"kernel": "trace", "probes": 3, "normalise": False, "diversity_lambda": 0.0, "checkpoints": 1, "cosine": False, "vote": "count"},
            "ntk-loss": {"kernel": "loss", "probes": 1, "normalise": False, "diversity_lambda": 0.0, "checkpoints": 1, "cosine": False, "vote": "count"},
            "ntk-diverse": {"kernel": "sum", "probes": 1, "normalise": False, "diversity_lambda": 0.5, "checkpoints": 1, "cosine": False, "vote": "count"},
            "ntk-ensemble": {"kernel": "sum", "probes": 1, "normalise": False, "diversity_lambda": 0.0, "checkpoints": 3, "cosine": False, "vote": "count"},
            "ntk-cos": {"kernel": "sum", "probes": 1, "normalise": False, "diversity_lambda": 0.0, "checkpoints": 1, "cosine": True, "vote": "count"},
            "ntk-vote": {"kernel": "sum", "probes": 1, "normalise": False, "diversity_lambda": 0.0, "checkpoints": 1, "cosine": False, "vote": "rank"},
        }[method]
    )
    if method == "ntk-norm":
        for r in scores:
            assert r["score"] == pytest.approx(r["kernel_score"] / r["grad_norm"], rel=1e-12)
    if method == "ntk-diverse":
        assert "max_similarity" in scores[0] and scores[0]["max_similarity"] == 0.0
    if method == "ntk-cos":
        for r in scores:
            assert r["score"] == pytest.approx(r["kernel_score"] / r["grad_norm"], rel=1e-12) and -1 - 1e-9 <= r["score"] <= 1 + 1e-9  # a mean of cosines
    deg = man["selector"]["stage1"]["vote_degeneracy"]
    assert deg["vote"] == var["vote"] and 0 < deg["kept_at_max_votes"] <= 1 and deg["distinct_vote_counts_kept"] >= 1
    if method == "ntk-vote":  # stage 2 is ntk's: the candidates both keep score the same
        assert "vote_weight" in scores[0] and deg["distinct_vote_weights_kept"] >= 1
        ref = {r["id"]: r["score"] for r in ntk_run[1]}
        shared = [r for r in scores if r["id"] in ref]
        assert shared and all(r["score"] == pytest.approx(ref[r["id"]], rel=1e-4) for r in shared)


def test_ntk_plus_at_its_defaults_scores_like_ntk(data, tiny_model_dir, tmp_path, ntk_run):
    out = tmp_path / "run"
    assert main(_args(data, tiny_model_dir, out, "ntk-plus")) == 0
    _, scores, _ = _rows(out)
    _, ref, _ = ntk_run
    assert [r["id"] for r in scores] == [r["id"] for r in ref]
    np.testing.assert_allclose([r["score"] for r in scores], [r["score"] for r in ref], rtol=1e-4)


def test_diversity_lambda_0_selects_ntks_top_n(data, tiny_model_dir, tmp_path, ntk_run):
    out = tmp_path / "run"
    assert main(_args(data, tiny_model_dir, out, "ntk-diverse", "--diversity-lambda", 0)) == 0
    sel, _, _ = _rows(out)
    assert [r.get("id") for r in sel] == [r.get("id") for r in ntk_run[0]]


def test_combinations_through_ntk_plus(data, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(data, tiny_model_dir, out, "ntk-plus", "--kernel", "trace", "--normalise", "--diverse", "--diversity-lambda", 1)) == 0
    sel, scores, man = _rows(out)
    assert man["selector"]["variant"] == {
        "kernel": "trace",
        "probes": 3,
        "normalise": True,
        "diversity_lambda": 1.0,
        "checkpoints": 1,
        "cosine": False,
        "vote": "count",
    }
    assert {"normalised_score", "max_similarity"} <= set(scores[0]) and len({r.get("id") for r in sel}) == 4


@pytest.mark.parametrize("method", PRESETS)
def test_the_dry_run_prices_each_variant(method, data, tiny_model_dir, tmp_path):
    from ntkselect.cli.main import build_parser, config_from_args
    from ntkselect.runs.plan import estimate

    plan = estimate(config_from_args(build_parser().parse_args(_args(data, tiny_model_dir, tmp_path / "run", method, "--dry-run"))))
    stages = {s["stage"]: s for s in plan["stages"]}
    assert {"warm-up", "stage 2"} <= set(stages) and stages["stage 2"]["seconds"] > 0
    assert ("diversity" in stages) == (method == "ntk-diverse")
    if method == "ntk-cos":  # the domain twice (its norms, then the weighted sum)
        ntk = estimate(config_from_args(build_parser().parse_args(_args(data, tiny_model_dir, tmp_path / "run", "ntk", "--dry-run"))))
        base = next(s for s in ntk["stages"] if s["stage"] == "stage 2")
        assert stages["stage 2"]["tokens"] > base["tokens"]
    if method == "ntk-trace":  # three objectives per example
        ntk = estimate(config_from_args(build_parser().parse_args(_args(data, tiny_model_dir, tmp_path / "run", "ntk", "--dry-run"))))
        base = next(s for s in ntk["stages"] if s["stage"] == "stage 2")
        assert stages["stage 2"]["tokens"] == pytest.approx(3 * base["tokens"], rel=1e-6, abs=3)


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--probes", "0"), "ntkselect: error: --probes: must be an integer from 1 to 1024 (got 0)\n"),
        (("--diversity-lambda", "-1"), "ntkselect: error: --diversity-lambda: must be a number >= 0 (0 is top N) (got -1.0)\n"),
        (("--diversity-lambda", "inf"), "ntkselect: error: --diversity-lambda: must be a finite number (got inf)\n"),
    ],
)
def test_bad_option_values_are_refused_naming_the_flag(extra, message, data, tiny_model_dir, tmp_path, capsys):
    assert main(_args(data, tiny_model_dir, tmp_path / "run", "ntk-plus", *extra)) != 0
    assert capsys.readouterr().err == message
    assert not (tmp_path / "run").exists()


def test_an_unknown_kernel_is_an_argparse_choice_error(data, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_args(data, tiny_model_dir, tmp_path / "run", "ntk-plus", "--kernel", "magic"))
    assert exit_.value.code == 2 and "argument --kernel: invalid choice: 'magic'" in capsys.readouterr().err


def test_evaluate_takes_the_variants_and_their_options(tmp_path):
    from ntkselect.evaluation.harness import EvalConfig, _fingerprint

    for name in "dtp":
        (tmp_path / name).write_text("")
    kw = dict(domain_train=str(tmp_path / "d"), domain_test=str(tmp_path / "t"), pool=str(tmp_path / "p"), n=3, out="o")
    cfg = EvalConfig(**kw, methods="random,ntk," + ",".join(PRESETS), probes=8, diversity_lambda=0.25, kernel="loss", normalise=True)
    assert cfg.method_list() == ["random", "ntk", *PRESETS]
    sc = cfg.select_config("ntk-trace", 1, "o")
    assert (sc.method, sc.probes, sc.diversity_lambda, sc.kernel, sc.normalise, sc.diverse) == ("ntk-trace", 8, 0.25, "loss", True, False)
    plain = _fingerprint(EvalConfig(**kw))["config"]
    later = {"kernel", "probes", "normalise", "diverse", "diversity_lambda", "ensemble", "checkpoints"}
    later |= {"cosine", "weighted_vote", "vote_weight", "features", "aggregate", "feature_dim", "whiten_shrinkage"}
    assert not later & set(plain)  # evaluations run before still resume
    assert _fingerprint(cfg)["config"]["probes"] == 8


@pytest.mark.parametrize(
    "method,extra,note",
    [
        ("ntk", ("--kernel", "trace"), "--kernel is not read by --method ntk, so it has no effect"),
        ("ntk-norm", ("--probes", "8"), "--probes is not read by --method ntk-norm, so it has no effect"),
        ("ntk-plus", ("--diversity-lambda", "2"), "--diversity-lambda has no effect without --diverse"),
        ("ntk-plus", ("--probes", "8"), "--probes has no effect without --kernel trace"),
        ("ntk-trace", ("--probes", "8"), None),
    ],
)
def test_a_variant_option_the_method_does_not_read_is_noted(method, extra, note, data, tiny_model_dir, tmp_path, capsys):
    args = _args(data, tiny_model_dir, tmp_path / "run", method, "--dry-run")
    i = args.index("--probes")
    del args[i : i + 2]  # the shared arguments' --probes 3
    assert main([*args, *extra]) == 0
    err = capsys.readouterr().err
    assert (f"ntkselect: note: {note}\n" in err) if note else "ntkselect: note:" not in err
