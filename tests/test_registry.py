"""The selector registry: a selector added as one module and one registration (tests/toy_selector.py)
runs end to end through `select` and `--dry-run`, is a `--method` choice and an `evaluate` method;
unknown methods are refused as before; the projector factory; and the CLI's stage 2 is `run_stage2`."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch

from ntkselect.cli.main import build_parser, main
from ntkselect.selection import registry

#: the built-in selectors, in --method's order
BUILTINS = ["ntk", "random", "embedding", "bm25", "less", "tsds", "ntk-plus", "ntk-norm", "ntk-trace", "ntk-loss", "ntk-diverse", "ntk-ensemble"]
BUILTINS += ["ntk-cos", "ntk-vote", "ntk-max", "ntk-rr", "ntk-whiten", "ntk-tsds", "ntk-rules"]


@pytest.fixture(scope="module")
def toy():
    """Import the toy selector's module (registering it), and forget it afterwards so that other
    test modules see only the built-in selectors."""
    module = importlib.import_module("toy_selector")
    yield module
    registry.unregister_selector("longest")
    sys.modules.pop("toy_selector", None)


def _select(data, model, out, *extra):
    dom, pool, _ = data
    return ["select", "--domain", str(dom), "--pool", str(pool), "--n", "5", "--out", str(out), "--model", model, *map(str, extra)]


def test_a_registered_selector_runs_end_to_end_through_the_cli(toy, data, tiny_model_dir, tmp_path):
    _, _, pool = data
    out = tmp_path / "run"
    assert main(_select(data, tiny_model_dir, out, "--method", "longest")) == 0
    sel = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["selection_method"] for r in sel] == ["longest"] * 5
    scores = [r["selection_score"] for r in sel]
    assert scores == sorted(scores, reverse=True)
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == len(pool) and sum(r["selected"] for r in rows) == 5
    assert max(r["score"] for r in rows if not r["selected"]) <= min(scores)  # the longest, by the run's own tokenization
    assert not (out / "adapter").exists()  # uses_model=False: no warm-up, no adapter
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "longest" and m["selector"]["rule"] == "tokens per example, most first"


def test_a_registered_selector_is_a_method_choice_with_its_help(toy, capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["select"]
    method = next(a for a in sub._actions if a.dest == "method")
    assert list(method.choices) == [*BUILTINS, "longest"]
    with pytest.raises(SystemExit):
        main(["select", "--help"])
    assert "longest (the longest pool examples first)" in " ".join(capsys.readouterr().out.split())


def test_the_dry_run_prices_a_registered_selector_with_its_cost_model(toy, data, tiny_model_dir, tmp_path, capsys):
    from ntkselect.cli.main import config_from_args
    from ntkselect.runs.plan import estimate

    args = _select(data, tiny_model_dir, tmp_path / "run", "--method", "longest", "--dry-run")
    plan = estimate(config_from_args(build_parser().parse_args(args)))
    assert [s["stage"] for s in plan["stages"]] == ["load", "longest"]
    own = plan["stages"][1]
    assert own["pass"] == "count tokens" and own["tokens"] == plan["data"]["pool"]["tokens"] and own["seconds"] > 0
    assert plan["model"] is None and plan["disk"]["adapter"] == 0  # no model: no preflight, no warm-up
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "dry run of --method longest" in printed and "count tokens" in printed
    assert not (tmp_path / "run").exists()


def test_an_unknown_method_is_refused_in_one_line_as_before(toy, data, tiny_model_dir, tmp_path, capsys):
    from ntkselect.config import SelectConfig
    from ntkselect.errors import NtkSelectError

    with pytest.raises(SystemExit) as exit_:  # argparse's own errors exit from parse_args
        main(_select(data, tiny_model_dir, tmp_path / "run", "--method", "magic"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "ntkselect: error: argument --method: invalid choice: 'magic' (choose from 'ntk', 'random', 'embedding', 'bm25', 'less', "
        "'tsds', 'ntk-plus', 'ntk-norm', 'ntk-trace', 'ntk-loss', 'ntk-diverse', 'ntk-ensemble', 'ntk-cos', 'ntk-vote', "
        "'ntk-max', 'ntk-rr', 'ntk-whiten', 'ntk-tsds', 'ntk-rules', 'longest') (see `ntkselect select --help`)\n"
    )
    assert not (tmp_path / "run").exists()
    listed = ", ".join([*BUILTINS, "longest"])
    with pytest.raises(NtkSelectError, match=rf"^--method: must be one of {listed} \(got 'magic'\)$"):
        SelectConfig(domain="d", pool="p", n=1, out="o", method="magic").validate()
    with pytest.raises(NtkSelectError, match=rf"^--method 'magic' is not a selector; use one of {listed}$"):
        registry.get_selector("magic")


def test_evaluate_accepts_a_registered_selector(toy):
    from ntkselect.evaluation.harness import EvalConfig

    cfg = EvalConfig(domain_train="d", domain_test="t", pool="p", n=3, out="o", methods="domain-only,random,longest")
    assert cfg.method_list() == ["domain-only", "random", "longest"]
    assert cfg.select_config("longest", 2, "o").method == "longest"
    assert cfg.select_config("domain-only", 2, "o").method == "random"
    with pytest.raises(Exception, match="--methods: unknown magic"):
        EvalConfig(domain_train="d", domain_test="t", pool="p", n=3, out="o", methods="magic").method_list()


def test_the_registry_refuses_what_it_could_not_run():
    from ntkselect import Selector

    class Mine(Selector):
        def rank(self, ctx, n):
            raise NotImplementedError

    with pytest.raises(ValueError, match="already registered"):
        registry.register_selector("ntk", Mine)
    with pytest.raises(ValueError, match="none of domain-only, oracle, base"):
        registry.register_selector("oracle", Mine)
    with pytest.raises(TypeError, match="not a subclass"):
        registry.register_selector("mine", object)
    with pytest.raises(ValueError, match="not SelectConfig fields"):
        registry.register_selector("mine", Mine, options=("mine_alpha",))
    with pytest.raises(ValueError, match="needs uses_model"):
        registry.register_selector("mine", Mine, uses_embeddings=True)
    assert "mine" not in registry.selector_names()


def test_every_builtin_registration_names_real_options_and_tasks():
    from ntkselect.runs.shards import get_task, task_names

    specs = {s.name: s for s in registry.selector_specs()}
    assert [n for n in specs if n != "longest"] == BUILTINS
    assert {n for n, s in specs.items() if s.uses_model} >= {"ntk", "embedding", "less", "tsds"}
    assert {n for n, s in specs.items() if s.uses_embeddings} >= {"ntk", "embedding", "tsds"}
    assert set(task_names()) >= {"embed", "score", "less", "ntk-variant-score"}
    for s in specs.values():
        for t in s.tasks:
            assert get_task(t.name) is t


# -- the projector factory ------------------------------------------------------------------


def test_the_projector_factory_gives_the_identity_for_proj_dim_0():
    from ntkselect.grads.projection import NoOpProjector, RademacherProjector, make_projector

    p = make_projector(300, 0, seed=3)
    assert isinstance(p, NoOpProjector) and p.dim == p.proj_dim == 300 and p.describe() is None
    v = torch.randn(300)
    assert torch.equal(p.gram(v), v) and p.gram(v) is v
    assert torch.equal(p.project(v[None]), v[None]) and torch.equal(p.project_back(v), v)
    params = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    assert p.gram_params(params) is params  # the exact path: the same tensors, no copy or conversion
    r = make_projector(300, 64, seed=3)
    assert isinstance(r, RademacherProjector) and r.proj_dim == 64 and r.describe()["kind"] == "rademacher"
    a, b = torch.randn(300), torch.randn(300)
    assert float(r.gram(a) @ b) == pytest.approx(float(r.project(a[None])[0] @ r.project(b[None])[0]), rel=1e-4)
    g = r.gram_params({"a": a[:100].reshape(10, 10), "b": a[100:]})
    assert torch.equal(torch.cat([g["a"].reshape(-1), g["b"]]), r.gram(a))


# -- one stage 2 ----------------------------------------------------------------------------


@pytest.mark.parametrize("proj_dim", [0, 64])
def test_the_cli_stage2_is_run_stage2(data, tiny_model_dir, tmp_path, monkeypatch, proj_dim):
    """`select --method ntk` scores its candidates with run_stage2 (sharded, resumable); run_stage2
    called in memory on the same model and candidates gives the same scores, bit for bit."""
    import ntkselect.selection.ntk.selector as ntk
    from ntkselect.selection.ntk.stage2 import run_stage2

    calls = []

    def spy(model, domain, candidates, rt, proj_dim, seed, **kw):
        res = run_stage2(model, domain, candidates, rt, proj_dim, seed, **kw)
        assert kw["sharding"] is not None  # the run's store and executor
        plain = run_stage2(model, domain, candidates, rt, proj_dim, seed, domain_ids=kw["domain_ids"], candidate_ids=kw["candidate_ids"])
        calls.append((kw["candidate_ids"], res.scores, plain.scores))
        return res

    monkeypatch.setattr(ntk, "run_stage2", spy)
    out = tmp_path / "run"
    assert main(_select(data, tiny_model_dir, out, "--method", "ntk", "--proj-dim", proj_dim, "--knn-k", 3, "--precision", "float32")) == 0
    ((ids, sharded, plain),) = calls
    assert np.array_equal(sharded, plain)
    written = {r["id"]: r["score"] for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}
    assert [written[i] for i in ids] == [float(s) for s in plain]
