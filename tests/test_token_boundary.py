"""The trained-token boundary of chat records is found by character offsets (issue 14).

Before, the assistant tokens were located by comparing token prefixes of rendered prefixes of
the conversation, which failed for any response whose leading whitespace the tokenizer merges
with the template's newline ("    return x", "  - item"), with a misleading "not prefix-stable"
error. These tests check that such responses now work under both templates, through the CLI,
and that every ordinary record gets exactly the token ids and trained-token mask of the old
token-prefix method (kept as the fallback for tokenizers without offsets), so selections are
byte-identical."""

from __future__ import annotations

import json
import random

import pytest

from ntkselect.cli.main import main
from ntkselect.data import records as data
from ntkselect.data.records import Record, tokenize_record

LEADING_WS = ["    return x", "  - item\n  - other", "\n\nSecond paragraph.", "\t tab then text", " single space"]


def rec(raw, i=0):
    return Record(id=str(i), raw=raw, path="x.jsonl", line=i + 1)


def trained_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, m in zip(ex.input_ids, ex.train_mask) if m])


def by_tokens(tokenizer, messages):
    """The old method: rendered prefixes must be token prefixes of the conversation."""
    text = data._render_text(tokenizer, messages, False, "x")
    turns = [(i, 0, 0) for i, m in enumerate(messages) if m["role"] == "assistant"]
    return data._chat_example_by_tokens(tokenizer, messages, text, turns, "x")


@pytest.mark.parametrize("response", LEADING_WS)
def test_leading_whitespace_response_trains_the_response_under_chat(tokenizer, response):
    msgs = [{"role": "user", "content": "Write it"}, {"role": "assistant", "content": response}]
    for raw in ({"prompt": "Write it", "response": response}, {"messages": msgs}):
        ex = tokenize_record(rec(raw), tokenizer, 512, "chat")
        got = trained_text(tokenizer, ex)
        # every character of the response is in a trained token; at most the template's
        # newline before it shares the first trained token
        assert response.strip() in got and got.endswith("<|im_end|>\n")
        assert "user" not in got and "Write it" not in got
        start = ex.train_mask.index(True)
        assert tokenizer.decode(ex.input_ids[:start]).endswith(("assistant", "assistant\n"))  # the generation prompt is not trained


def test_the_straddling_token_is_the_only_one_shared_with_the_template(tokenizer):
    msgs = [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "    return x"}]
    text = data._render_text(tokenizer, msgs, False, "x")
    start = len(data._render_text(tokenizer, msgs[:1], True, "x"))
    ids, spans = data._offsets(tokenizer, text)
    ex = tokenize_record(rec({"messages": msgs}), tokenizer, 512, "chat")
    first = ex.train_mask.index(True)
    a, b = spans[first]
    assert a < start < b  # this tokenizer merges "\n" + three of the four spaces into one token: trained
    assert all(not m for m, (_, e) in zip(ex.train_mask, spans) if e <= start)
    assert all(m for m, (s, _) in zip(ex.train_mask, spans) if start <= s < len(text))


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_leading_whitespace_responses_select_through_the_cli(template, tiny_model_dir, tmp_path, capsys):
    pool = [{"id": f"p{i}", "prompt": f"Show example {i}", "response": r} for i, r in enumerate(LEADING_WS)]
    pool.append({"id": "m", "messages": [{"role": "user", "content": "List"}, {"role": "assistant", "content": "  - a\n  - b"}]})
    domain = [{"id": f"d{i}", "prompt": f"Indent line {i}", "response": f"    line {i}"} for i in range(3)]
    paths = {}
    for name, rows in (("domain", domain), ("pool", pool)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = main(
        [
            "select",
            "--domain",
            str(paths["domain"]),
            "--pool",
            str(paths["pool"]),
            "--n",
            "3",
            "--out",
            str(out),
            "--model",
            tiny_model_dir,
            "--warmup-epochs",
            "0",
            "--precision",
            "float32",
            "--knn-k",
            "2",
            "--threads",
            "1",
            "--template",
            template,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert len((out / "selected.jsonl").read_text().splitlines()) == 3


def _ordinary_records():
    """The demo pool and domain (MMLU with lettered options, reasoning-gym with chains of
    thought), the shared fixtures' shapes, and seeded multi-turn conversations."""
    from ntkselect.data.demo import build_demo_data

    rows = []
    rng = random.Random(0)
    words = ["the", "heart", "\n", "é", "日本", "🙂", "x", ".", "42", " - ", "Answer:", "(B)"]
    for _ in range(60):
        p = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        r = rng.choice(["A", "b", "Hello", "1.", "B. yes"]) + "".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        rows.append({"prompt": p or "p", "response": r})
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": p or "s"},
                    {"role": "user", "content": p or "u"},
                    {"role": "assistant", "content": r},
                    {"role": "user", "content": r},
                    {"role": "assistant", "content": "ok " + p},
                ]
            }
        )
    return rows, build_demo_data


def test_ordinary_records_get_the_same_tokens_and_mask_as_the_token_prefix_method(tokenizer, texts, tmp_path):
    rows, build_demo_data = _ordinary_records()
    build_demo_data(tmp_path, domain="medical", n_domain=40, n_pool_mmlu=160, n_pool_reasoning=60, seed=0)
    recs = data.load_records(tmp_path / "pool.jsonl") + data.load_records(tmp_path / "domain.jsonl")
    rows += [r.raw for r in recs] + list(texts)
    checked = 0
    for raw in rows:
        kind = data.record_kind(raw)
        if kind == "text":
            continue
        msgs = (
            raw["messages"]
            if kind == "messages"
            else [{"role": "user", "content": data.prompt_response(raw)[0]}, {"role": "assistant", "content": data.prompt_response(raw)[1]}]
        )
        ids, mask = data._chat_example(tokenizer, msgs, "x")
        assert (ids, mask) == by_tokens(tokenizer, msgs), raw
        checked += 1
    assert checked > 300


def test_a_tokenizer_without_offsets_uses_the_token_prefix_method(tokenizer, monkeypatch):
    raw = {"prompt": "Name a bone.", "response": "The femur."}
    want = tokenize_record(rec(raw), tokenizer, 512, "chat")
    monkeypatch.setattr(data, "_offsets", lambda tok, text: None)
    assert tokenize_record(rec(raw), tokenizer, 512, "chat") == want
