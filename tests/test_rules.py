"""The selection rules on gradient features (issue 25: ntk-max, ntk-rr, ntk-whiten, ntk-tsds,
ntk-rules): the features against plain autograd on the full logits, the transforms and round
robin against naive numpy, each method's ranking against the rule computed naively from
autograd gradients, and the methods through `select`, `--dry-run` and `evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import make_lora_model, naive_gradients
from ntkselect.cli.main import main
from ntkselect.grads.fused import lora_parameters
from ntkselect.grads.projection import make_projector
from ntkselect.model.runtime import Runtime
from ntkselect.selection.ntk_rules.features import FeaturePayload, features_of
from ntkselect.selection.ntk_rules.rules import round_robin, transform
from ntkselect.selection.ntk_variants.kernels import Kernel
from ntkselect.selection.tsds import draw_order, tsds

torch.set_num_threads(1)

METHODS = ("ntk-max", "ntk-rr", "ntk-whiten", "ntk-tsds", "ntk-rules")


def rt_(pad_id, **kw):
    return Runtime(pad_id=pad_id, progress=False, dtype=torch.float32, **kw)


def dim_of(model) -> int:
    return sum(p.numel() for _, p in lora_parameters(model))


# -- the features ------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 64])
def test_features_are_the_projected_autograd_gradients(p, tiny_model_dir, examples, tokenizer):
    model = make_lora_model(tiny_model_dir, seed=3)
    dim = dim_of(model)
    got = features_of(model, examples, rt_(tokenizer.pad_token_id, batch_size=3), FeaturePayload(Kernel("sum"), dim, p, 5))
    g = naive_gradients(model, examples, tokenizer.pad_token_id)  # (n, D) on the full logits
    ref = make_projector(dim, p, 5).project(g).numpy()
    assert got.shape == (len(examples), p or dim)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# -- the transforms and round robin, against naive numpy --------------------------------------


def naive_transform(dom, cand, kind, rho):
    x = np.concatenate([dom, cand]).astype(np.float64)
    if kind != "unit":
        x = x - x.mean(0)
    if kind == "whiten":
        n, q = x.shape
        cov = x.T @ x / n  # (q, q)
        shrunk = (1 - rho) * cov + rho * np.trace(cov) / q * np.eye(q)
        e, v = np.linalg.eigh(shrunk)
        x = x @ (v / np.sqrt(e)) @ v.T  # Σ_ρ^{-1/2}, symmetric
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x[: len(dom)], x[len(dom) :]


@pytest.mark.parametrize("rows", [12, 40])  # fewer rows than dimensions (the Gram route), more (the covariance route)
@pytest.mark.parametrize("kind,rho", [("unit", 0.5), ("centre", 0.5), ("whiten", 0.5), ("whiten", 0.05), ("whiten", 1.0)])
def test_transforms_give_the_cosines_of_a_naive_whitening(rows, kind, rho):
    rng = np.random.default_rng(rows)
    scales = np.geomspace(10, 0.1, 24)  # a few dominant directions
    f = rng.normal(size=(rows, 24)) * scales + 3.0  # and a common one
    dom, cand = f[:4], f[4:]
    du, cu, info = transform(dom, cand, kind, rho)
    rd, rc = naive_transform(dom, cand, kind, rho)
    np.testing.assert_allclose(du @ cu.T, rd @ rc.T, atol=1e-9)
    np.testing.assert_allclose(cu @ cu.T, rc @ rc.T, atol=1e-9)
    assert info["transform"] == kind
    if kind == "whiten" and rho == 1.0:  # shrunk all the way: centring only
        cd, cc, _ = transform(dom, cand, "centre")
        np.testing.assert_allclose(du @ cu.T, cd @ cc.T, atol=1e-9)


def naive_round_robin(sims):
    n_d, m = sims.shape
    taken, out = set(), []
    while len(out) < m:
        for i in range(n_d):
            if len(out) == m:
                break
            j = max((j for j in range(m) if j not in taken), key=lambda j: (sims[i, j], -j))
            taken.add(j)
            out.append((j, i))
    return out


def test_round_robin_equals_a_naive_loop():
    rng = np.random.default_rng(0)
    sims = np.round(rng.normal(size=(5, 23)), 1)  # rounded: ties, broken by position
    sims[1] = sims[0]  # two domain examples that want the same candidates
    order, picker, rounds = round_robin(sims)
    ref = naive_round_robin(sims)
    assert order.tolist() == [j for j, _ in ref] and picker.tolist() == [i for _, i in ref]
    assert rounds.tolist() == [k // 5 for k in range(23)] and sorted(order.tolist()) == list(range(23))


# -- each method's ranking, against the rule computed naively from autograd gradients ----------


POOL = [
    {"prompt": "What is 3 + 4?", "response": "7"},
    {"prompt": "Add 12 and 30.", "response": "The sum is 42."},
    {"text": "The kidneys filter blood."},
    {"prompt": "Compute 9 times 8.", "response": "72"},
    {"text": "A contract needs an offer and an acceptance, and consideration."},
    {"prompt": "What is 100 - 1?", "response": "99"},
    {"text": "Short."},
]
DOMAIN = [{"prompt": "What is 2 + 2?", "response": "4"}, {"prompt": "What is 5 + 6?", "response": "11"}, {"prompt": "Subtract 3 from 10.", "response": "7"}]


@pytest.mark.parametrize("method", METHODS)
def test_each_rule_ranks_like_the_naive_rule_on_autograd_gradients(method, tiny_model_dir, tokenizer, monkeypatch):
    from ntkselect.config import SelectConfig
    from ntkselect.data.records import Record, tokenize_records
    from ntkselect.selection import SelectionContext, get_selector

    recs = [Record(id=f"r{i}", raw=t, path="m.jsonl", line=i + 1) for i, t in enumerate(DOMAIN + POOL)]
    ex, _ = tokenize_records(recs, tokenizer, 64)
    nd = len(DOMAIN)
    extra = {"features": "centre", "aggregate": "rr"} if method == "ntk-rules" else {}
    shrink = 0.3
    seen: list = []  # TSDS's inputs, as the selector hands them over
    import ntkselect.selection.ntk_rules.selector as rules_selector

    real_tsds = rules_selector.tsds
    monkeypatch.setattr(rules_selector, "tsds", lambda dom, cand, **kw: seen.append((dom, cand, kw)) or real_tsds(dom, cand, **kw))
    cfg = SelectConfig(
        domain="-", pool="-", n=2, out="-", method=method, model=tiny_model_dir, warmup_epochs=1, warmup_lr=5e-3, knn_k=2,
        preselect_factor=4.0, feature_dim=64, whiten_shrinkage=shrink, tsds_max_k=3, tsds_kde_k=3, precision="float32", **extra,
    )  # fmt: skip
    rt = rt_(tokenizer.pad_token_id, batch_size=3)
    ctx = SelectionContext(cfg.validate(), recs[:nd], recs[nd:], ex[:nd], ex[nd:], rt, log=lambda *_: None)
    r = get_selector(method).rank(ctx, 2)
    assert sorted(r.order.tolist()) == list(range(len(POOL)))  # M = 8 >= the pool: stage 1 keeps it all

    model = ctx.model()
    g = naive_gradients(model, ex, tokenizer.pad_token_id)  # (|D| + |C|, D) plain autograd, full logits
    f = make_projector(g.shape[1], 64, cfg.seed).project(g).double().numpy()
    kind = {"ntk-max": "unit", "ntk-rr": "unit", "ntk-whiten": "whiten", "ntk-tsds": "whiten", "ntk-rules": "centre"}[method]
    du, cu = naive_transform(f[:nd], f[nd:], kind, shrink)
    sims = du @ cu.T  # (|D|, |C|)
    pos = np.arange(len(POOL))
    if method in ("ntk-max", "ntk-whiten"):
        ref = sims.max(0) if method == "ntk-max" else sims.mean(0)
        assert r.order.tolist() == np.lexsort((pos, -ref)).tolist()
        np.testing.assert_allclose(r.scores, ref[r.order], rtol=1e-4, atol=1e-4)
    elif method in ("ntk-rr", "ntk-rules"):
        naive = naive_round_robin(sims)
        assert r.order.tolist() == [j for j, _ in naive]
        np.testing.assert_allclose(r.scores, [sims[i, j] for j, i in naive], rtol=1e-4, atol=1e-4)
        assert r.columns["taken_by"].tolist() == [f"r{i}" for _, i in naive]
    else:
        # whitening 10 rows in their span leaves them nearly equidistant, and TSDS's neighbour search runs in
        # float32: the features it was given equal the naive ones (up to a rotation), and its draw is TSDS on exactly those
        ((d_in, c_in, kw),) = seen
        # in the rows' span and in stage 1's candidate order: match each candidate to its pool row by its inner products
        cross_in, cross = d_in @ c_in.T, du @ cu.T  # (|D|, |C|)
        perm = np.array([int(np.argmin(np.abs(cross - cross_in[:, [j]]).sum(0))) for j in range(cross_in.shape[1])])
        assert sorted(perm.tolist()) == list(range(len(POOL)))
        x_in, x = np.concatenate([d_in, c_in]), np.concatenate([du, cu[perm]])
        np.testing.assert_allclose(x_in @ x_in.T, x @ x.T, rtol=1e-4, atol=1e-5)
        t = tsds(d_in, c_in, **kw)
        probs = np.where(t.probs > 1e-12, t.probs, 0.0)  # the transport's clip leaves rounding-sized mass at its boundary
        assert r.order.tolist() == perm[draw_order(probs, t.nearest, cfg.seed)].tolist()
        np.testing.assert_allclose(r.scores, t.probs[draw_order(probs, t.nearest, cfg.seed)], rtol=1e-4, atol=1e-6)
    assert r.info["rule"]["features"] == kind and r.info["stage1"]["vote_degeneracy"]["vote"] == "count"


# -- through the CLI -----------------------------------------------------------------------------


def _args(data, model, out, method, *extra):
    dom, pool, _ = data
    args = ["select", "--domain", dom, "--pool", pool, "--n", 4, "--out", out, "--model", model, "--method", method]
    args += ["--warmup-epochs", 1, "--knn-k", 2, "--precision", "float32", "--batch-size", 4, "--feature-dim", 64, *extra]
    return [str(a) for a in args]


@pytest.mark.parametrize("method", METHODS)
def test_each_rule_selects_n_distinct_candidates_and_says_how(method, data, tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(_args(data, tiny_model_dir, out, method, "--batch-size", 4 if name == "a" else 3)) == 0
        runs.append(out)
    sel = [json.loads(line) for line in (runs[0] / "selected.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (runs[0] / "scores.jsonl").read_text().splitlines()]
    man = json.loads((runs[0] / "manifest.json").read_text())
    assert len({r.get("id") for r in sel}) == 4 and all(r["selection_method"] == method for r in sel)
    assert len(scores) == 16 and {"mean_cosine", "max_cosine", "votes"} <= set(scores[0])
    assert man["method"] == method and man["cost"]["tokens"] > 0 and (runs[0] / "adapter").exists()
    assert man["selector"]["features"]["width"] == 64 and man["selector"]["stage1"]["vote_degeneracy"]["max_votes"] >= 1
    other = [json.loads(line) for line in (runs[1] / "selected.jsonl").read_text().splitlines()]
    assert [r.get("id") for r in other] == [r.get("id") for r in sel]  # batching changes nothing


def test_ntk_rules_takes_every_option(data, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    extra = ("--features", "whiten", "--aggregate", "max", "--kernel", "trace", "--probes", 2, "--weighted-vote", "--vote-weight", "similarity")
    assert main(_args(data, tiny_model_dir, out, "ntk-rules", *extra)) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["selector"]["rule"] == {"features": "whiten", "aggregate": "max", "kernel": "trace", "probes": 2, "vote": "similarity"}
    assert man["selector"]["features"]["width"] == 128  # two objectives x p
    assert "vote_weight" in json.loads((out / "scores.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("method", METHODS)
def test_the_dry_run_prices_each_rule(method, data, tiny_model_dir, tmp_path):
    from ntkselect.cli.main import build_parser, config_from_args
    from ntkselect.runs.plan import estimate

    plan = estimate(config_from_args(build_parser().parse_args(_args(data, tiny_model_dir, tmp_path / "run", method, "--dry-run"))))
    stages = {s["stage"]: s for s in plan["stages"]}
    assert {"warm-up", "features"} <= set(stages) and stages["features"]["seconds"] > 0 and stages["features"]["tokens"] > 0
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--feature-dim", "12"), "ntkselect: error: --feature-dim: must be 0 (unprojected) or a positive multiple of 8 (got 12)\n"),
        (("--whiten-shrinkage", "0"), "ntkselect: error: --whiten-shrinkage: must be in (0, 1] (1: centre only, no whitening) (got 0.0)\n"),
        (("--whiten-shrinkage", "1.5"), "ntkselect: error: --whiten-shrinkage: must be in (0, 1] (1: centre only, no whitening) (got 1.5)\n"),
    ],
)
def test_bad_rule_options_are_refused_naming_the_flag(extra, message, data, tiny_model_dir, tmp_path, capsys):
    assert main(_args(data, tiny_model_dir, tmp_path / "run", "ntk-whiten", *extra)) != 0
    assert capsys.readouterr().err == message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "method,extra,note",
    [
        ("ntk", ("--features", "whiten"), "--features is not read by --method ntk, so it has no effect"),
        ("ntk-max", ("--aggregate", "rr"), "--aggregate is not read by --method ntk-max, so it has no effect"),
        ("ntk-rules", ("--whiten-shrinkage", "0.2"), "--whiten-shrinkage has no effect without --features whiten"),
        ("ntk-rules", ("--vote-weight", "similarity"), "--vote-weight has no effect without --weighted-vote"),
        ("ntk-whiten", ("--whiten-shrinkage", "0.2"), None),
    ],
)
def test_a_rule_option_the_method_does_not_read_is_noted(method, extra, note, data, tiny_model_dir, tmp_path, capsys):
    assert main([*_args(data, tiny_model_dir, tmp_path / "run", method, "--dry-run"), *extra]) == 0
    err = capsys.readouterr().err
    assert (f"ntkselect: note: {note}\n" in err) if note else "ntkselect: note:" not in err


def test_evaluate_takes_the_rules_and_their_options(tmp_path):
    from ntkselect.evaluation.harness import EvalConfig

    for name in "dtp":
        (tmp_path / name).write_text("")
    kw = dict(domain_train=str(tmp_path / "d"), domain_test=str(tmp_path / "t"), pool=str(tmp_path / "p"), n=3, out="o")
    cfg = EvalConfig(**kw, methods="ntk,ntk-cos,ntk-vote," + ",".join(METHODS), features="whiten", aggregate="tsds", feature_dim=256, whiten_shrinkage=0.2)
    assert cfg.method_list() == ["ntk", "ntk-cos", "ntk-vote", *METHODS]
    sc = cfg.select_config("ntk-rules", 1, "o")
    assert (sc.method, sc.features, sc.aggregate, sc.feature_dim, sc.whiten_shrinkage) == ("ntk-rules", "whiten", "tsds", 256, 0.2)
    cfg.validate()


def test_evaluate_runs_the_new_methods_next_to_ntk(tiny_model_dir, tmp_path):
    from helpers import write_eval_data

    p = write_eval_data(tmp_path)
    methods = "ntk,ntk-cos,ntk-vote,ntk-rr,ntk-tsds"
    args = ["evaluate", "--domain-train", p["train"], "--domain-test", p["test"], "--pool", p["pool"], "--n", 3, "--out", tmp_path / "ev"]
    args += ["--model", tiny_model_dir, "--seeds", 1, "--methods", methods, "--knn-k", 2, "--feature-dim", 64, "--ft-epochs", 1]
    args += ["--ft-batch-size", 4, "--batch-size", 4, "--max-batch-tokens", 512, "--precision", "float32"]
    assert main([str(a) for a in args]) == 0
    table = (tmp_path / "ev" / "results.md").read_text()
    for m in methods.split(","):
        assert f"| {m} |" in table
        assert len((tmp_path / "ev" / "selections" / f"{m}-seed0" / "selected.jsonl").read_text().splitlines()) == 3
