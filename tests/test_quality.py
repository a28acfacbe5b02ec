"""The quality benchmark's measurements: held-out loss, the oracle row, paired statistics, gap closed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def _records(texts):
    from ntkselect.data.records import Record

    return [Record(id=str(i), raw=t, path="mem.jsonl", line=i + 1) for i, t in enumerate(texts)]


def _naive_nll(model, ex) -> float:
    """One example, the model's own full (1, L, V) logits, plain log-softmax, no batching."""
    ids = torch.tensor([ex.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # (L, V)
    logp = torch.log_softmax(logits, dim=-1)
    terms = [-logp[t - 1, ex.input_ids[t]].item() for t in range(1, len(ex.input_ids)) if ex.train_mask[t]]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (3, "right"), (8, "left")])
def test_heldout_loss_equals_a_hand_computed_nll(tiny_model_dir, texts, tokenizer, batch_size, padding_side):
    from ntkselect.data.records import tokenize_records
    from ntkselect.evaluation.metrics import heldout_loss
    from ntkselect.model.loading import load_model
    from ntkselect.model.runtime import Runtime

    model = load_model(tiny_model_dir).eval()
    ex, _ = tokenize_records(_records(texts), tokenizer, max_length=64, template="auto")
    rt = Runtime(batch_size=batch_size, max_batch_tokens=4096, padding_side=padding_side, pad_id=tokenizer.pad_token_id, progress=False)
    res = heldout_loss(model, ex, rt)
    want = np.array([_naive_nll(model, e) for e in ex])
    np.testing.assert_allclose(res.loss, want, rtol=2e-5, atol=2e-5)
    assert res.tokens.tolist() == [sum(e.train_mask[1:]) for e in ex]
    # a prompt/response record is scored on its response only: changing the prompt's last
    # word changes the loss through the context, but the count of scored tokens is the response's
    pr = [i for i, t in enumerate(texts) if "prompt" in t][0]
    assert res.tokens[pr] < len(ex[pr].input_ids) - 1


@pytest.mark.parametrize("template,batch_size,padding_side", [("plain", 3, "right"), ("plain", 8, "left"), ("chat", 2, "right")])
def test_accuracy_from_the_loss_pass_equals_the_second_pass(tiny_model_dir, tokenizer, template, batch_size, padding_side):
    """MMLU test records (response "B. ...", options the letters): the option log-likelihoods read
    off the held-out loss pass equal those of the separate option pass, record by record."""
    from ntkselect.data.records import tokenize_records
    from ntkselect.evaluation.metrics import heldout_loss, loss_pass_probes, mc_from_probes, mc_items, option_loglikelihoods
    from ntkselect.model.loading import load_model
    from ntkselect.model.runtime import Runtime

    model = load_model(tiny_model_dir).eval()
    rows = []
    for i in range(7):
        letter = "ABCD"[i % 4]
        prompt = f"Question {i}: " + "which organ " * i + "?\nA. heart\nB. lung\nC. liver\nD. kidney\nAnswer:"
        rows.append({"prompt": prompt, "response": f"{letter}. organ {i}", "answer": letter, "options": ["A", "B", "C", "D"]})
    rows.append({"prompt": "Short?\nA. yes\nB. no\nAnswer:", "response": "an answer without its letter", "answer": "A", "options": ["A", "B"]})
    recs = _records(rows)
    items = mc_items(recs)
    ex, _ = tokenize_records(recs, tokenizer, max_length=512, template=template)
    rt = Runtime(batch_size=batch_size, max_batch_tokens=4096, padding_side=padding_side, pad_id=tokenizer.pad_token_id, progress=False)
    probes = loss_pass_probes(tokenizer, items, ex, template, 512)
    assert sorted(probes) == list(range(len(rows)))  # every prompt is followed by a trained token, every option one token
    res = heldout_loss(model, ex, rt, probes=probes)
    old, _ = option_loglikelihoods(model, tokenizer, items, Runtime(batch_size=4, pad_id=tokenizer.pad_token_id, progress=False), template, 512)
    for i in range(len(rows)):
        np.testing.assert_allclose(res.probes[i], old[i], rtol=1e-5, atol=1e-5)
    assert mc_from_probes(items, [res.probes[i] for i in range(len(rows))]).pred.tolist() == [int(np.argmax(x)) for x in old]
    np.testing.assert_array_equal(res.loss, heldout_loss(model, ex, rt).loss)  # the loss itself is unchanged by probing
    # a prompt the loss example does not start with (cut to max_length) is left to the option pass
    assert 0 not in loss_pass_probes(tokenizer, items, ex, template, 5)


def test_is_mc_record_separates_loss_only_records():
    from ntkselect.errors import NtkSelectError
    from ntkselect.evaluation.metrics import is_mc_record, mc_items

    recs = _records(
        [
            {"prompt": "Q?\nA. x\nB. y\nAnswer:", "response": "A. x", "answer": "A"},  # lettered lines + answer: MC
            {"prompt": "How many apples?", "response": "Three apples, so 3.\n#### 3"},  # a worked solution: loss only
            {"prompt": "Pick", "options": ["a", "b"], "answer": "b", "response": "b"},  # explicit options: MC
            {"text": "plain text"},  # loss only
        ]
    )
    assert [is_mc_record(r) for r in recs] == [True, False, True, False]
    bad = _records([{"prompt": "Pick", "options": ["a", "b"], "answer": 7, "response": "b"}])
    assert is_mc_record(bad[0])  # names options, so it must parse: mc_items says what is wrong
    with pytest.raises(NtkSelectError, match="outside"):
        mc_items(bad)


def test_gap_closed_on_a_synthetic_case():
    from ntkselect.evaluation.stats import bootstrap_indices, gap_closed

    rng = np.random.default_rng(0)
    random = 2.0 + rng.normal(0, 0.3, size=(3, 400))  # (seeds, examples)
    oracle = random - 0.4 + rng.normal(0, 0.05, size=random.shape)  # in-domain data: 0.4 nats better
    half = random - 0.5 * (random - oracle)  # closes exactly half of the gap, example by example
    idx = bootstrap_indices(3, 400, 500)
    g = gap_closed(half, random, oracle, idx)
    assert g.value == pytest.approx(0.5, abs=1e-12) and g.low == pytest.approx(0.5) and g.high == pytest.approx(0.5)
    assert gap_closed(oracle, random, oracle, idx).value == pytest.approx(1.0)
    assert gap_closed(random, random, oracle, idx).value == pytest.approx(0.0)
    noisy = random - 0.2 + rng.normal(0, 0.3, size=random.shape)
    gn = gap_closed(noisy, random, oracle, idx)
    assert gn.low < gn.value < gn.high and gn.low < 0.5 < gn.high  # a real interval around the truth (0.5)
    assert gn.denominator == pytest.approx(float(random.mean() - oracle.mean()))
    # no gap to close (the oracle is not better than random): undefined, never a division by ~0
    same = gap_closed(noisy, random, random + 0.01, idx)
    assert np.isnan(same.value) and np.isnan(same.low)


def test_paired_bootstrap_interval():
    from ntkselect.evaluation.stats import paired_bootstrap

    rng = np.random.default_rng(1)
    b = rng.normal(1.0, 0.5, size=(3, 300))
    lo, hi = paired_bootstrap(b - 0.1, b)  # a constant shift: the paired interval is that shift exactly
    assert lo == pytest.approx(-0.1) and hi == pytest.approx(-0.1)
    a = b + rng.normal(0.05, 0.2, size=b.shape)
    lo, hi = paired_bootstrap(a, b)
    assert lo < float((a - b).mean()) < hi and lo > 0  # 0.05 ± 0.2 / sqrt(900): clearly positive
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:, :10])


def _cells(losses: dict) -> dict:
    return {(m, s): {"losses": v[s].tolist()} for m, v in losses.items() for s in range(v.shape[0])}


def test_calibration_says_whether_the_oracle_beats_random():
    from ntkselect.evaluation.harness import calibration, summarise_loss

    rng = np.random.default_rng(2)
    r = 2.0 + rng.normal(0, 0.3, size=(3, 200))
    methods = ["domain-only", "oracle", "random", "ntk"]
    good = {"domain-only": r + 0.1, "oracle": r - 0.3 + rng.normal(0, 0.05, r.shape), "random": r, "ntk": r - 0.1}
    loss = summarise_loss(_cells(good), methods, [0, 1, 2], n_boot=300)
    cal = calibration(loss, methods)
    assert cal["checked"] and cal["sensitive"] and cal["p_value"] < 0.05
    assert loss["ntk"]["gap_closed"]["value"] == pytest.approx(0.1 / 0.3, rel=0.1)
    assert loss["ntk"]["vs_random"]["delta"] == pytest.approx(-0.1) and loss["ntk"]["vs_domain_only"]["delta"] == pytest.approx(-0.2)
    flat = {**good, "oracle": r + rng.normal(0, 0.3, r.shape)}  # the oracle is no better: the domain does not count
    cal = calibration(summarise_loss(_cells(flat), methods, [0, 1, 2], n_boot=300), methods)
    assert cal["checked"] and not cal["sensitive"]
    assert not calibration(loss, ["random", "ntk"])["checked"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_oracle_records_never_repeat_a_test_or_domain_question(tiny_model_dir, tmp_path, capsys):
    """--domain-extra must be unseen data: a record that repeats a D or test question is
    refused before anything is written; the oracle's N come only from that file."""
    from ntkselect.cli.main import main

    def q(i):
        return {"id": f"q{i}", "prompt": f"Question {i} about the heart?", "response": f"Answer {i}."}

    train, test, extra = [q(i) for i in range(4)], [q(i) for i in range(4, 8)], [q(i) for i in range(8, 12)]
    pool = [{"id": f"p{i}", "prompt": f"General {i}?", "response": f"Reply {i}."} for i in range(6)]
    p = {k: _write(tmp_path / f"{k}.jsonl", v) for k, v in (("train", train), ("test", test), ("pool", pool))}
    base = [
        "evaluate",
        "--domain-train",
        p["train"],
        "--domain-test",
        p["test"],
        "--pool",
        p["pool"],
        "--n",
        "2",
        "--model",
        tiny_model_dir,
        "--methods",
        "domain-only,oracle",
        "--seeds",
        "1",
        "--ft-epochs",
        "1",
        "--ft-batch-size",
        "4",
    ]
    for leaked, side in ((test[1], "test set"), (train[2], "training set D")):
        bad = _write(tmp_path / "extra_bad.jsonl", extra + [{**leaked, "id": "sneaky"}])
        out = tmp_path / f"out-{side[:4]}"
        assert main([*base, "--domain-extra", bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'sneaky'" in err and side in err
        assert not out.exists()  # nothing written before the inputs were checked
    assert main([*base, "--out", str(tmp_path / "o2")]) == 2  # oracle without --domain-extra
    assert "--domain-extra" in capsys.readouterr().err
    short = _write(tmp_path / "extra_short.jsonl", extra[:1])
    assert main([*base, "--domain-extra", short, "--out", str(tmp_path / "o3")]) == 2
    assert "fewer than --n 2" in capsys.readouterr().err

    good = _write(tmp_path / "extra.jsonl", extra)
    out = tmp_path / "ok"
    assert main([*base, "--domain-extra", good, "--out", str(out)]) == 0
    cell = json.loads((out / "cells" / "oracle-seed0.json").read_text())
    assert len(cell["selected_ids"]) == 2 and set(cell["selected_ids"]) <= {r["id"] for r in extra}
    assert "Calibration not checked" in (out / "results.md").read_text()  # no random row: no verdict claimed


def _build_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "build.py"
    spec = importlib.util.spec_from_file_location("quality_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("domain", ["arithmetic", "math", "medical"])
def test_benchmark_domains_are_disjoint_labelled_and_reproducible(tmp_path, domain):
    """Each quality-benchmark domain builds offline in one call: D, extra and test are disjoint
    from each other and from the pool, every pool record says whether it is related, and the
    same arguments give the same bytes."""
    build = _build_module()
    gsm = tmp_path / "gsm8k.jsonl"  # a stand-in for ../shared/data/gsm8k: the builder only reads question/answer
    gsm.write_text(
        "".join(
            json.dumps({"question": f"Tom has {i} apples and buys {i + 3} more. How many now?", "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"})
            + "\n"
            for i in range(60)
        )
    )
    sizes = {
        "n_train": 6,
        "n_extra": 5,
        "n_test": 8,
        "pool_mmlu_related": 6,
        "pool_mmlu_unrelated": 8,
        "pool_rg_related": 8,
        "pool_rg_unrelated": 8,
        "pool_gsm8k": 4,
    }
    sizes = {k: v for k, v in sizes.items() if k in build.DEFAULTS[domain] or k.startswith("n_")}
    a = build.build(domain, tmp_path / "a", str(gsm), 0, sizes)
    b = build.build(domain, tmp_path / "b", str(gsm), 0, sizes)
    assert a["sha256"] == b["sha256"] and not any(a["checks"].values())
    rows = {k: [json.loads(x) for x in (tmp_path / "a" / f"domain_{k}.jsonl").read_text().splitlines()] for k in ("train", "extra", "test")}
    rows["pool"] = [json.loads(x) for x in (tmp_path / "a" / "pool.jsonl").read_text().splitlines()]
    assert [len(rows[k]) for k in ("train", "extra", "test")] == [6, 5, 8]
    norm = lambda r: " ".join(r["prompt"].lower().split())  # noqa: E731
    seen = [{norm(r) for r in rows[k]} for k in rows]
    assert sum(map(len, seen)) == len(set().union(*seen))  # no question on two sides
    assert {r["relation"] for r in rows["pool"]} == {"related", "unrelated"}
    assert all("options" in r for r in rows["test"]) == (domain == "medical")
    if domain != "arithmetic":  # a generated domain has no fixed size; the others refuse to ask for more than exists
        with pytest.raises(build.NtkSelectError, match="usable"):
            build.build(domain, tmp_path / "c", str(gsm), 0, {**sizes, "n_test": 10**5})
