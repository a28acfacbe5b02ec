"""The evaluate leak check (issue 14): a test question hidden in any field of any record shape
is found, by containment of normalised text; short questions only by equality; fast."""

from __future__ import annotations

import json
import random
import time

import pytest

from ntkselect.cli.main import main
from ntkselect.data.leak import MIN_WORDS, TestQuestions, normalise
from ntkselect.data.records import Record

Q = "Which vessel carries oxygenated blood from the lungs to the heart?\nA. aorta\nB. pulmonary vein\nC. vena cava\nD. carotid\nAnswer:"
# the same question as a person might paste it elsewhere: other case, spacing, option markers
Q_REFORMATTED = "which  vessel carries OXYGENATED blood from the lungs to the heart?  (A) aorta (B) pulmonary vein (C) vena cava (D) carotid. Answer:"


def hidden(q: str) -> dict[str, dict]:
    """A test question hidden in each record shape and each field a record trains on."""
    m = lambda role: {
        "messages": [
            {"role": "system", "content": "Be brief."} if role != "system" else {"role": "system", "content": f"Context: {q}"},  # noqa: E731
            {"role": "user", "content": f"Please answer: {q}" if role == "user" else "Hello"},
            {"role": "assistant", "content": f"Sure. {q} It is B." if role == "assistant" else "Hi."},
        ]
    }
    return {
        "text": {"text": f"Exam notes. {q} The answer is B."},
        "prompt": {"prompt": f"Quiz: {q}", "response": "B"},
        "response": {"prompt": "Recall a question", "response": f"Here is one: {q}"},
        "instruction": {"instruction": f"Solve {q}", "output": "B"},
        "input": {"instruction": "Solve this.", "input": q, "output": "B"},
        "output": {"instruction": "Write a quiz question.", "output": q},
        "question": {"question": f"{q} (explain)", "answer": "B"},
        "answer": {"question": "Give an example question.", "answer": q},
        "messages-system": m("system"),
        "messages-user": m("user"),
        "messages-assistant": m("assistant"),
        "extra-field": {"prompt": "Say hi", "response": "hi", "text": q},  # train.jsonl keeps it: another trainer may read it
    }


def rec(raw, i="t0"):
    return Record(id=i, raw=raw, path="x.jsonl", line=1)


@pytest.fixture(scope="module")
def tq():
    return TestQuestions(
        [
            rec({"prompt": Q, "answer": "B"}),
            rec({"prompt": "Is it raining?", "answer": "yes"}, "short"),
            rec({"question": "Which of the following is true?", "options": ["The liver makes bile", "Bones are hollow"], "answer": 0}, "stem"),
        ]
    )


@pytest.mark.parametrize("shape", list(hidden(Q)))
def test_a_test_question_hidden_in_each_shape_and_field_is_found(tq, shape):
    for q in (Q, Q_REFORMATTED):
        assert tq.find(hidden(q)[shape]) == "t0", (shape, q)


def test_no_false_hit_on_a_longer_number_or_a_partial_question(tq):
    assert tq.find({"text": Q.replace("heart", "heart 1")}) is None  # words in between
    assert tq.find({"text": Q[: len(Q) // 2]}) is None  # only half of it
    other = TestQuestions([rec({"prompt": "About the heart 1 in medicine today, explain", "answer": "A"})])
    assert other.find({"text": "about the heart 10 in medicine today, explain"}) is None  # whole words
    assert other.find({"text": "About the heart 1 in medicine today, explain it"}) is not None


def test_short_questions_count_only_as_a_whole_field(tq):
    assert len(normalise("Is it raining?")) < MIN_WORDS
    assert tq.find({"text": "My diary: is it raining? No, the sun is out today and it is warm."}) is None
    assert tq.find({"prompt": "Is it  RAINING ?", "response": "no"}) == "short"


def test_a_short_stem_with_options_needs_its_options(tq):
    assert tq.find({"text": "Which of the following is true? A. Cells divide B. Water boils"}) is None
    assert tq.find({"text": "Which of the following is true? 1) the liver makes bile 2) bones are hollow"}) == "stem"


def test_containment_is_fast_on_10k_records_and_1k_questions():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)] + ["the", "of", "which", "is", "a"] * 200
    sent = lambda n: " ".join(rng.choice(vocab) for _ in range(n))  # noqa: E731
    tests = [rec({"prompt": sent(rng.randint(8, 60)) + "\nA. x\nB. y\nAnswer:", "answer": "A"}, str(i)) for i in range(1000)]
    pool = [{"prompt": sent(rng.randint(20, 120)), "response": sent(rng.randint(5, 120))} for _ in range(10000)]
    for k in range(0, 10000, 1000):
        pool[k]["response"] += " " + tests[k // 10].raw["prompt"]
    t = time.perf_counter()
    index = TestQuestions(tests)
    found = [index.find(r) for r in pool]
    seconds = time.perf_counter() - t
    assert [i for i, f in enumerate(found) if f] == list(range(0, 10000, 1000))
    assert seconds < 20, seconds  # about 1 s on the 2-core development machine


# --------------------------------------------------------------------------- through the CLI


def _mc(i, topic):
    return {
        "id": f"{topic}{i}",
        "prompt": f"Question {i} about the {topic}: what does it do in the body?\nA. pumps\nB. filters\nC. stores\nD. none\nAnswer:",
        "response": "A. pumps",
        "answer": "A",
        "subject": topic,
    }


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_drops_every_pool_record_that_hides_a_test_question(tiny_model_dir, tmp_path, capsys):
    train = [_mc(i, "heart") for i in range(4)]
    test = [{**_mc(i, "kidney"), "options": ["A", "B", "C", "D"]} for i in range(4)]
    pool = [{"id": f"p{i}", "prompt": f"Tell me about {w} {i}.", "response": f"{w} fact {i}.", "source": w} for i, w in enumerate(["law", "math", "art"] * 2)]
    planted = {f"leak-{shape}": raw for shape, raw in hidden(test[1]["prompt"]).items()}
    pool += [{"id": k, **v} for k, v in planted.items()]
    p = {n: _write(tmp_path / f"{n}.jsonl", rows) for n, rows in (("train", train), ("test", test), ("pool", pool))}
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
        6,
        "--out",
        out,
        "--model",
        tiny_model_dir,
        "--seeds",
        1,
        "--methods",
        "random,bm25",
        "--ft-epochs",
        1,
        "--ft-batch-size",
        4,
        "--batch-size",
        4,
        "--max-batch-tokens",
        512,
        "--warmup-epochs",
        0,
    ]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    assert man["excluded_pool_records"]["test_questions"] == len(planted)
    for m in ("random", "bm25"):
        sel = [json.loads(x)["id"] for x in (out / "selections" / f"{m}-seed0" / "selected.jsonl").read_text().splitlines()]
        assert len(sel) == 6 and not any(s.startswith("leak-") for s in sel)  # n = every clean record: none of the planted ones
    assert "Test-set overlap with every training set: 0 (must be 0). Pool records excluded as test questions: 12." in (out / "results.md").read_text()


@pytest.mark.parametrize("shape", ["text", "messages-user", "response"])
def test_evaluate_refuses_a_domain_record_that_hides_a_test_question(shape, tiny_model_dir, tmp_path, capsys):
    test = [{**_mc(i, "kidney"), "options": ["A", "B", "C", "D"]} for i in range(3)]
    train = [_mc(i, "heart") for i in range(3)] + [{"id": "sneaky", **hidden(test[2]["prompt"])[shape]}]
    pool = [{"id": f"p{i}", "prompt": f"Tell me about {w} {i}.", "response": f"{w} fact {i}."} for i, w in enumerate(["law", "math", "art"])]
    p = {n: _write(tmp_path / f"{n}.jsonl", rows) for n, rows in (("train", train), ("test", test), ("pool", pool))}
    out = tmp_path / "ev"
    rc = main(
        [
            str(a)
            for a in [
                "evaluate",
                "--domain-train",
                p["train"],
                "--domain-test",
                p["test"],
                "--pool",
                p["pool"],
                "--n",
                1,
                "--out",
                out,
                "--model",
                tiny_model_dir,
                "--seeds",
                1,
                "--methods",
                "random",
            ]
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "1 training question(s) also appear in" in err and "'sneaky'" in err
    assert not (out / "manifest.json").exists() and not out.exists()  # the inputs are checked before --out is created
