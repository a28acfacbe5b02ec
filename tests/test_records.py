"""Benchmark records (issue 22): finished evaluate cells kept as committed files, resumed on a fresh
clone, never mixed with another configuration or device, and rendered into a document alone."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import write_eval_data
from ntkselect.cli.main import main
from ntkselect.errors import NtkSelectError
from ntkselect.evaluation import harness
from ntkselect.evaluation.records import read_set


def _render_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "render.py"
    spec = importlib.util.spec_from_file_location("quality_render", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(p, out, model, records, *extra):
    a = ["evaluate", "--domain-train", p["train"], "--domain-test", p["test"], "--pool", p["pool"], "--domain-extra", p["extra"], "--n", 3]
    a += ["--out", out, "--model", model, "--seeds", 2, "--methods", "domain-only,oracle,random,ntk", "--knn-k", 2, "--ft-epochs", 1]
    a += ["--ft-batch-size", 4, "--batch-size", 4, "--max-batch-tokens", 512, "--precision", "float32", "--records", records, *extra]
    return [str(x) for x in a]


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("records")
    p = write_eval_data(tmp)
    rec = tmp / "records" / "toy"
    assert main(_args(p, tmp / "a", tiny_model_dir, rec)) == 0
    return tmp, p, rec


def _no_compute(monkeypatch, calls):
    def refuse(*a, **k):
        calls.append(a)
        raise NtkSelectError("computed a cell")

    monkeypatch.setattr(harness, "finetune", refuse)
    monkeypatch.setattr(harness, "load_model", refuse)


def test_every_cell_becomes_a_record_with_its_provenance(first_run):
    tmp, _, rec = first_run
    sets = list(rec.iterdir())
    assert [s.name for s in sets] == ["cpu-float32"]  # the resolved device type and precision name the set
    setup, base, cells = read_set(sets[0])
    assert set(cells) == {(m, s) for m in ("domain-only", "oracle", "random", "ntk") for s in (0, 1)} and base["method"] == "base"
    for (m, s), row in cells.items():
        cell = json.loads((tmp / "a" / "cells" / f"{m}-seed{s}.json").read_text())
        assert row == cell  # the record is the cell, exactly
        assert len(row["losses"]) == 4 and len(row["selected_ids"]) == (0 if m == "domain-only" else 3)
        assert row["label"] == "cpu-float32" and row["finetune_tokens"] > 0
    raw = json.loads((sets[0] / "ntk-seed0.json").read_text())["record"]
    assert raw["key"] == setup["key"] and raw["machine"]["device"] == "cpu" and raw["machine"]["precision"] == "float32"
    assert "torch" in raw["versions"] and raw["machine"]["threads"] >= 1
    assert "ft_lr" in setup["fingerprint"]["config"] and "pool" in setup["fingerprint"]["inputs"]
    assert "pool" not in setup["fingerprint"]["config"]  # the inputs count by content, not by path
    assert not (tmp / "a" / "work").exists()  # each seed's selection work is removed once its cells are done


def test_a_fresh_clone_resumes_from_the_records_and_computes_nothing(first_run, tiny_model_dir, monkeypatch):
    tmp, p, rec = first_run
    clone = tmp / "clone"  # the same data files under another path, another --out: as on another machine
    shutil.copytree(rec, clone / "records")
    q = {k: shutil.copy(v, clone / Path(v).name) for k, v in p.items()}
    calls: list = []
    _no_compute(monkeypatch, calls)
    assert main(_args(q, clone / "b", tiny_model_dir, clone / "records")) == 0
    assert calls == []
    assert (clone / "b" / "results.md").read_text() == (tmp / "a" / "results.md").read_text()


def test_records_of_another_configuration_or_device_are_refused_or_kept_apart(first_run, tiny_model_dir, monkeypatch, capsys):
    tmp, p, rec = first_run
    capsys.readouterr()
    assert main(_args(p, tmp / "c", tiny_model_dir, rec, "--ft-lr", "1e-3")) == 2  # another recipe, same records: refused
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different configuration (config.ft_lr)" in err
    assert not (tmp / "c" / "cells").exists() or not list((tmp / "c" / "cells").iterdir())

    # records made on another device or precision sit in their own set: a CPU run never reads them
    other = tmp / "records-gpu"
    shutil.copytree(rec / "cpu-float32", other / "cuda-bfloat16")
    calls: list = []
    _no_compute(monkeypatch, calls)
    assert main(_args(p, tmp / "d", tiny_model_dir, other)) == 2
    assert len(calls) == 1  # it went to compute the base row instead of taking the GPU's

    # a record moved into another set is refused, not used
    mixed = tmp / "records-mixed"
    shutil.copytree(rec, mixed)
    r = mixed / "cpu-float32" / "ntk-seed0.json"
    key = json.loads(r.read_text())["record"]["key"]
    r.write_text(r.read_text().replace(key, "0" * 32))
    capsys.readouterr()
    assert main(_args(p, tmp / "e", tiny_model_dir, mixed)) == 2
    assert "a record of another configuration or device" in capsys.readouterr().err


def test_a_cell_of_another_device_in_out_is_refused(first_run, tiny_model_dir, capsys):
    tmp, p, rec = first_run
    out = tmp / "f"
    shutil.copytree(tmp / "a", out)
    cell = out / "cells" / "random-seed1.json"
    cell.write_text(cell.read_text().replace('"label": "cpu-float32"', '"label": "cuda-bfloat16"'))
    capsys.readouterr()
    assert main(_args(p, out, tiny_model_dir, tmp / "records-f")) == 2
    assert "are not mixed" in capsys.readouterr().err


def test_an_interrupted_seed_resumes_its_selection_work(first_run, tiny_model_dir, monkeypatch, capsys):
    tmp, p, _ = first_run
    real = harness.finetune

    def die_on_ntk(model, examples, recipe, rt, seed, desc=""):
        if "ntk" in desc:
            raise NtkSelectError("interrupted")
        return real(model, examples, recipe, rt, seed, desc=desc)

    monkeypatch.setattr(harness, "finetune", die_on_ntk)
    args = _args(p, tmp / "g", tiny_model_dir, tmp / "records-g") + ["--seeds", "0,"]
    assert main(args) == 2
    assert (tmp / "g" / "work" / "seed0" / "warmup" / "warmup.done").exists()  # the warm-up survived, inside --out
    monkeypatch.setattr(harness, "finetune", real)
    capsys.readouterr()
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "warm-up already done" in cap.out + cap.err
    assert not (tmp / "g" / "work").exists()


def test_render_writes_the_tables_from_the_records_alone(first_run, tmp_path):
    tmp, _, rec = first_run
    render = _render_module()
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nHand-written text stays.\n")
    assert render.main(["--records", str(rec.parent), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nHand-written text stays.\n") and render.BEGIN in text and render.END in text
    # the tables are the ones evaluate wrote from its cells (headings one level deeper)
    ours = [ln for ln in (tmp / "a" / "results.md").read_text().splitlines() if ln.startswith("|")]
    sets, verdict = text.split("### Verdict across domains")
    rendered = [ln for ln in sets.splitlines() if ln.startswith("|")]
    assert rendered == ours and any(ln.startswith("| ntk |") for ln in rendered)
    assert "| ntk |" in verdict and "not yet: 1 of 3 domains" in verdict  # the toy set has no TSDS: the bar is not judged
    assert (tmp_path / "quality-toy-cpu-float32.png").read_bytes()[:4] == b"\x89PNG"
    assert render.main(["--records", str(rec.parent), "--doc", str(doc), "--check"]) == 0
    assert render.main(["--records", str(rec.parent), "--doc", str(doc)]) == 0 and doc.read_text() == text  # the same bytes again
    doc.write_text(text.replace("| ntk |", "| ntk? |"))
    assert render.main(["--records", str(rec.parent), "--doc", str(doc), "--check"]) == 1


def test_render_leaves_out_a_method_without_every_seed(first_run, tmp_path):
    _, _, rec = first_run
    render = _render_module()
    part = tmp_path / "records"
    shutil.copytree(rec.parent, part)
    (part / "toy" / "cpu-float32" / "ntk-seed1.json").unlink()
    doc = tmp_path / "R.md"
    assert render.main(["--records", str(part), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "| ntk |" not in text and "Incomplete, not in the table: ntk (seeds 0)." in text


def test_domain_only_is_the_warm_up_when_they_train_the_same(tiny_model_dir, tmp_path):
    """With the warm-up's recipe equal to the fine-tune's, domain-only reuses the warm-up instead of
    training it again, and its test losses are those of a separate fine-tune on D."""
    from ntkselect.data.records import load_records, tokenize_records
    from ntkselect.evaluation.metrics import heldout_loss
    from ntkselect.model.loading import load_tokenizer
    from ntkselect.model.runtime import Runtime
    from ntkselect.training.finetune import FinetuneRecipe, finetune

    p = write_eval_data(tmp_path)
    out = tmp_path / "ev"
    same = ["--warmup-lr", "5e-4", "--ft-lr", "5e-4", "--warmup-epochs", "1", "--max-length", "64", "--ft-max-length", "64", "--seeds", "0,"]
    args = _args(p, out, tiny_model_dir, tmp_path / "rec", *same)
    args[args.index("--methods") + 1] = "domain-only,ntk"
    args[args.index("--ft-batch-size") + 1] = "8"  # the warm-up's batch size
    assert main(args) == 0
    cell = json.loads((out / "cells" / "domain-only-seed0.json").read_text())
    assert cell["finetune_shared"] == "warmup"
    tok = load_tokenizer(tiny_model_dir)
    rt = Runtime(pad_id=tok.pad_token_id, progress=False)
    train, _ = tokenize_records(load_records(str(p["train"])), tok, 64, "auto")
    model, _ = finetune(tiny_model_dir, train, FinetuneRecipe(epochs=1, lr=5e-4, batch_size=8, max_length=64), rt, 0)
    test, _ = tokenize_records(load_records(str(p["test"])), tok, 512, "auto")
    assert cell["losses"] == pytest.approx(heldout_loss(model, test, rt).loss.tolist(), rel=1e-6, abs=1e-6)
    assert "finetune_shared" not in json.loads((out / "cells" / "ntk-seed0.json").read_text())


def _cells(domain_shift: dict[str, float], seeds=(0, 1), n=80, seed=0) -> dict:
    """Synthetic cells: every method's per-record losses are a shared per-record difficulty plus noise plus its shift."""
    rng = np.random.default_rng(seed)
    hard = rng.normal(2.0, 0.3, n)
    return {
        (m, s): {"losses": (hard + shift + rng.normal(0, 0.01, n)).tolist(), "selection_tokens": 100.0 if m != "random" else 0.0, "selection_seconds": 1.0}
        for m, shift in domain_shift.items()
        for s in seeds
    }


def test_the_verdict_applies_issue_25s_bar_to_paired_comparisons():
    render = _render_module()
    base = {"domain-only": 0.5, "oracle": -0.3, "random": 0.2, "embedding": 0.0, "tsds": 0.0}
    win, level, lose = {**base, "ntk-x": -0.05}, {**base, "ntk-x": 0.0}, {**base, "ntk-x": +0.05}
    seeds = [0, 1]

    def verdict(*domains):
        return {f"d{i}": render.compare_domain(_cells(sh, seed=i), list(sh), seeds) for i, sh in enumerate(domains)}

    per = verdict(win, win, level)
    assert per["d0"]["ntk-x"]["rank"] == 1 and per["d0"]["ntk-x"]["tsds"]["p_value"] < 0.05 and per["d0"]["ntk-x"]["tsds"]["delta"] < 0
    assert per["d2"]["ntk-x"]["tsds"]["p_value"] > 0.05  # the same losses up to noise: level
    assert per["d0"]["ntk-x"]["best_baseline"]["ref"] in ("embedding", "tsds")
    assert render.bar(per, "ntk-x")[1] is True
    assert render.bar(verdict(win, win, lose), "ntk-x")[1] is False  # significantly worse on the third domain
    assert render.bar(verdict(win, level, level), "ntk-x")[1] is False  # wins on one domain only
    assert render.bar(verdict(win, win), "ntk-x") == ("not yet: 2 of 3 domains with TSDS and embedding", False)
    assert render.bar(per, "tsds") == ("a peer", False)
    doms = {"a": win, "b": win, "c": level}
    text = render.render_verdict("cpu-float32", {d: (list(win), seeds, _cells(sh, seed=i)) for i, (d, sh) in enumerate(doms.items())})
    assert "Cleared the bar: ntk-x." in text and any(ln.startswith("| ntk-x | 3 | ") and "| 2 / 1 / 0 | 2 / 1 / 0 |" in ln for ln in text.splitlines())


def test_why_reports_the_length_correlation_and_the_generators_covered(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "why.py"
    spec = importlib.util.spec_from_file_location("quality_why", path)
    why = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(why)
    rel = lambda i: "related" if i < 6 else "unrelated"  # noqa: E731
    pool = {f"r{i}": {"id": f"r{i}", "prompt": "x" * (10 + i), "response": "y" * (30 - i), "subject": "ab"[i % 2], "relation": rel(i)} for i in range(10)}
    sel = tmp_path / "selections" / "ntk-seed0"
    sel.mkdir(parents=True)
    # scores fall with the prompt's length (short records score high, as faithful NTK's do) and the top 3 are selected
    (sel / "scores.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "score": 10.0 - i}) + "\n" for i in range(10)))
    (sel / "selected.jsonl").write_text("".join(json.dumps(pool[f"r{i}"]) + "\n" for i in (0, 2, 4)))
    r = why.analyse(sel, pool)
    assert r["rho_prompt"] == pytest.approx(-1.0) and r["rho_response"] == pytest.approx(1.0)
    assert r["related_share"] == 1.0 and (r["covers"], r["of_related"]) == (1, 2) and r["composition"] == [("a", 3)]
