"""The multiple-choice evaluator, the split builder and `ntkselect evaluate` end to end."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from helpers import write_eval_data
from ntkselect.data.records import Record
from ntkselect.errors import NtkSelectError
from ntkselect.evaluation.metrics import MCItem, evaluate_mc, mc_items, option_loglikelihoods
from ntkselect.model.runtime import Runtime


def _rt(tokenizer, **kw):
    return Runtime(pad_id=tokenizer.pad_token_id, progress=False, dtype=torch.float32, **kw)


def _bias_model(model_dir, bias: torch.Tensor):
    """The tiny model with an LM head whose weight is 0 and whose bias is ``bias``: every
    position's logits are exactly ``bias``, so log p(token) = bias[token] - logsumexp(bias)
    whatever the prompt — log-likelihoods known by hand."""
    from ntkselect.model.loading import load_model

    model = load_model(model_dir)
    head = torch.nn.Linear(model.config.hidden_size, bias.numel(), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    model.lm_head = head
    return model.eval()


def test_loglikelihoods_match_a_hand_computation(tiny_model_dir, tokenizer):
    V = len(tokenizer)
    bias = torch.zeros(V)
    tok = {s: tokenizer(s, add_special_tokens=False)["input_ids"] for s in ("A", "B", "C", "D", " maybe not")}
    bias[tok["A"][0]], bias[tok["B"][0]], bias[tok["C"][0]] = 2.0, 5.0, -1.0
    model = _bias_model(tiny_model_dir, bias)
    lse = torch.logsumexp(bias, 0).item()
    items = [MCItem("q1", "Which?\nA. x\nB. y\nC. z\nD. w\nAnswer:", ["A", "B", "C", "D"], 1), MCItem("q2", "Long options", ["A", " maybe not"], 0)]
    ll, _ = option_loglikelihoods(model, tokenizer, items, _rt(tokenizer))
    assert ll[0] == pytest.approx([2 - lse, 5 - lse, -1 - lse, 0 - lse], abs=1e-4)
    multi = sum(bias[t].item() - lse for t in tok[" maybe not"])  # every token of a multi-token option counts
    assert len(tok[" maybe not"]) > 1 and ll[1] == pytest.approx([2 - lse, multi], abs=1e-4)
    res = evaluate_mc(model, tokenizer, items, _rt(tokenizer))
    assert res.pred.tolist() == [1, 0] and res.accuracy == 1.0


def test_fast_path_equals_per_option_scoring_and_full_logits(tiny_model_dir, tokenizer):
    """One forward for single-token options == one continuation per option == log_softmax of the
    model's own full logits; independent of batch size and padding."""
    from ntkselect.model.loading import load_model

    model = load_model(tiny_model_dir).eval()
    items = [MCItem(str(i), f"Question {i}: " + "word " * (3 * i) + "\nA. a\nB. b\nAnswer:", ["A", "B", "C", "D"], i % 4) for i in range(6)]
    fast, _ = option_loglikelihoods(model, tokenizer, items, _rt(tokenizer, batch_size=4))
    slow, _ = option_loglikelihoods(model, tokenizer, items, _rt(tokenizer, batch_size=1), single_token_fast_path=False)
    assert np.allclose(np.stack(fast), np.stack(slow), atol=1e-4)
    from ntkselect.evaluation.metrics import _context_ids

    for it, got in zip(items, fast):
        ctx = _context_ids(tokenizer, it.prompt, "chat")
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx])).logits[0, -1].float(), -1)
        want = [logp[tokenizer(o, add_special_tokens=False)["input_ids"][0]].item() for o in it.options]
        assert np.allclose(got, want, atol=1e-4)


def test_mc_items_reads_every_supported_shape():
    recs = [
        {"prompt": "Q?\nA. one\nB. two\nC. three\nAnswer:", "answer": "B"},
        {"question": "Is water wet?", "answer": "yes"},
        {"prompt": "Pick", "options": ["red", "blue"], "answer": 1},
        {"prompt": "Pick", "choices": ["red", "blue"], "answer": "red"},
    ]
    items = mc_items([Record(str(i), r, "t.jsonl", i + 1) for i, r in enumerate(recs)])
    assert [(it.options, it.answer) for it in items] == [(["A", "B", "C"], 1), (["yes", "no", "maybe"], 0), (["red", "blue"], 1), (["red", "blue"], 0)]
    with pytest.raises(NtkSelectError, match=r"t.jsonl line 7: no .options."):
        mc_items([Record("x", {"prompt": "free text", "answer": "42"}, "t.jsonl", 7)])
    with pytest.raises(NtkSelectError, match="outside"):
        mc_items([Record("x", {"prompt": "Pick", "options": ["a", "b"], "answer": 5}, "t.jsonl", 1)])


def test_paired_sign_flip_test():
    from ntkselect.evaluation.harness import paired_sign_flip_test

    assert paired_sign_flip_test(np.zeros(10)) == 1.0
    # exact case: 4 non-zero differences all +1: only 2 of the 16 sign patterns reach |sum| = 4
    assert paired_sign_flip_test(np.array([1, 1, 1, 1, 0, 0.0])) == pytest.approx(2 / 16)
    rng = np.random.default_rng(0)
    assert paired_sign_flip_test(rng.normal(0.5, 1, 200)) < 1e-3  # a clear shift
    assert paired_sign_flip_test(rng.normal(0, 1, 200)) > 0.01


def test_eval_split_is_stratified_disjoint_and_seeded(tmp_path):
    from ntkselect.data.demo import build_eval_data

    a = build_eval_data(tmp_path / "a", "medical", n_train=40, n_test=60, n_pool_mmlu=50, n_pool_reasoning=0, seed=1)
    b = build_eval_data(tmp_path / "b", "medical", n_train=40, n_test=60, n_pool_mmlu=50, n_pool_reasoning=0, seed=1)
    c = build_eval_data(tmp_path / "c", "medical", n_train=40, n_test=60, n_pool_mmlu=50, n_pool_reasoning=0, seed=2)
    assert a["sha256"] == b["sha256"] and a["ids"] != c["ids"]
    assert not set(a["ids"]["train"]) & set(a["ids"]["test"])
    rows = {
        k: [json.loads(x) for x in (tmp_path / "a" / f).read_text().splitlines()]
        for k, f in (("train", "domain_train.jsonl"), ("test", "domain_test.jsonl"), ("pool", "pool.jsonl"))
    }
    norm = lambda r: " ".join(r["prompt"].lower().split())  # noqa: E731
    assert not {norm(r) for r in rows["test"]} & ({norm(r) for r in rows["train"]} | {norm(r) for r in rows["pool"]})
    assert all(r["options"] == ["A", "B", "C", "D"] for r in rows["test"])
    assert all(r["subject"] not in a["domain_subjects"] for r in rows["pool"])
    # stratified: each subject's share of the test set is its share of the domain, within one question
    total = sum(a["test_per_subject"].values())
    usable = {}
    for r in rows["train"] + rows["test"]:
        usable[r["subject"]] = usable.get(r["subject"], 0) + 1
    assert set(a["test_per_subject"]) == set(a["domain_subjects"])
    assert all(abs(a["test_per_subject"][s] / total - a["train_per_subject"][s] / 40) < 0.06 for s in a["domain_subjects"])


def man_summary(out):
    return json.loads((out / "manifest.json").read_text())["summary"]


def test_evaluate_end_to_end_resumes_and_refuses_a_changed_config(tiny_model_dir, tmp_path, capsys):
    from ntkselect.cli.main import main

    p = write_eval_data(tmp_path)
    out = tmp_path / "ev"
    args = [
        "evaluate",
        "--domain-train",
        p["train"],
        "--domain-test",
        p["test"],
        "--pool",
        p["pool"],
        "--n",
        3,
        "--out",
        out,
        "--model",
        tiny_model_dir,
        "--seeds",
        2,
        "--methods",
        "domain-only,oracle,random,bm25,embedding,less,ntk",
        "--knn-k",
        2,
        "--domain-extra",
        p["extra"],
        "--less-proj-dim",
        64,
        "--ft-epochs",
        1,
        "--ft-batch-size",
        4,
        "--batch-size",
        4,
        "--max-batch-tokens",
        512,
    ]
    assert main([str(a) for a in args]) == 0
    md = (out / "results.md").read_text()
    assert "| base (no fine-tuning) |" in md and "| ntk |" in md and "paired p" in md.lower()
    assert "## Held-out domain loss" in md and "## Accuracy" in md and "gap closed" in md
    for c in [json.loads(f.read_text()) for f in (out / "cells").glob("random-*.json")]:
        assert sum(c["by_relation"].values()) == 3 and set(c["by_relation"]) <= {"related", "unrelated"}
    ntk_row = next(line for line in md.splitlines() if line.startswith("| ntk |"))
    assert re.search(r"\| \d+% \|", ntk_row)  # the related share of S, next to its loss
    assert "benchmark is sensitive" in md or "does not count" in md  # the calibration verdict is always stated
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,seed,loss,") and ",accuracy," in rows[0]
    assert len(rows) == 1 + 1 + 7 * (2 + 2)  # header, base, per method: 2 seeds + mean + std
    man = json.loads((out / "manifest.json").read_text())
    assert man["excluded_pool_records"]["test_questions"] == 1  # the planted test question was dropped from the pool
    cells = {f.name: json.loads(f.read_text()) for f in (out / "cells").iterdir()}
    assert len(cells) == 1 + 7 * 2
    assert all(c["test_overlap"] == 0 and c["n_test"] == 4 for c in cells.values())
    for c in cells.values():  # every record's held-out loss, and their mean
        assert len(c["losses"]) == 4 and c["loss"] == pytest.approx(np.mean(c["losses"])) and all(x > 0 for x in c["losses"])
    extra_ids = {f"heart{i}" for i in range(10, 15)}
    for s in (0, 1):  # the oracle draws N distinct records of --domain-extra, by seed
        assert len(set(cells[f"oracle-seed{s}.json"]["selected_ids"])) == 3 and set(cells[f"oracle-seed{s}.json"]["selected_ids"]) <= extra_ids
    assert "gap_closed" in man_summary(out)["ntk"] and "vs_random" in man_summary(out)["oracle"]
    for c in cells.values():  # P(correct) is a probability per question; accuracy counts its argmax flips
        assert all(0 < p < 1 for p in c["p_correct"]) and c["mean_p_correct"] == pytest.approx(np.mean(c["p_correct"]), abs=1e-6)
    assert all(c["n_selected"] == (0 if c["method"] in ("domain-only", "base") else 3) for c in cells.values())
    assert all(set(c["by_source"]) <= {"law", "math", "heart", "kidney"} for c in cells.values() if c["method"] not in ("oracle", "base", "domain-only"))
    for m in ("random", "bm25", "embedding", "less", "ntk"):
        sel = [json.loads(x)["id"] for x in (out / "selections" / f"{m}-seed0" / "selected.jsonl").read_text().splitlines()]
        assert "leak" not in sel and len(set(sel)) == 3
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun of the same command reuses every finished cell
    mtimes = {f.name: f.stat().st_mtime_ns for f in (out / "cells").iterdir()}
    (out / "cells" / "ntk-seed1.json").unlink()  # as if the run had died before this cell
    assert main([str(a) for a in args]) == 0
    after = {f.name: f.stat().st_mtime_ns for f in (out / "cells").iterdir()}
    assert {k for k in after if after[k] != mtimes.get(k)} == {"ntk-seed1.json"}
    assert json.loads((out / "cells" / "ntk-seed1.json").read_text())["correct"] == cells["ntk-seed1.json"]["correct"]  # deterministic

    # a different recipe into the same folder is refused, in one line
    capsys.readouterr()
    assert main([str(a) for a in args + ["--ft-lr", "1e-3"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different configuration (ft_lr)" in err


def test_evaluate_config_file_and_errors(tmp_path, capsys):
    from ntkselect.cli.main import main
    from ntkselect.evaluation.harness import EvalConfig

    toml = tmp_path / "c.toml"
    toml.write_text('[evaluate]\ndomain_train = "a"\ndomain_test = "b"\npool = "c"\nn = 7\nout = "o"\nseeds = "0,4"\n')
    cfg = EvalConfig.from_toml(str(toml), {"n": 9})
    assert cfg.n == 9 and cfg.seed_list() == [0, 4] and cfg.domain_test == "b"
    toml.write_text("n = 7\nbogus = 1\n")
    assert main(["evaluate", "--config", str(toml)]) == 2
    assert "unknown key(s) bogus" in capsys.readouterr().err
    assert (
        main(["evaluate", "--domain-train", "a", "--domain-test", "b", "--pool", "c", "--n", "3", "--out", str(tmp_path / "o"), "--methods", "ntk,magic"]) == 2
    )
    assert "unknown magic" in capsys.readouterr().err
    assert math.isfinite(EvalConfig(domain_train="a", domain_test="b", pool="c", n=1, out="o").recipe().lr)
