"""Loading data files and the trained-token convention, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest

from helpers import FORMATS, write_any
from ntkselect.data.records import (
    Record,
    load_records,
    prompt_response,
    record_kind,
    record_text,
    resolve_template,
    token_convention,
    tokenize_record,
    tokenize_records,
)
from ntkselect.errors import NtkSelectError

ROWS = [
    {"id": "a", "prompt": "What is 2+2?", "response": "4", "note": ""},
    {"id": "b", "prompt": "Capital of France?", "response": "Paris", "note": "geo"},
    {"id": "c", "prompt": "Say hi", "response": "hi there", "note": ""},
]
NO_ID = [{k: v for k, v in r.items() if k != "id"} for r in ROWS]


def write_jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines = lines[:1] + ["", "   "] + lines[1:]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_same_records_with_ids(tmp_path, fmt):
    path = write_any(tmp_path, fmt, ROWS)
    recs = load_records(path)
    assert [r.id for r in recs] == ["a", "b", "c"]
    assert [r.raw for r in recs] == ROWS  # CSV empty cells stay "" (not NaN)
    assert all(r.path == str(path) for r in recs)
    # CSV: header is line 1, so rows start at 2; other formats: 1-based row / line.
    assert [r.line for r in recs] == ([2, 3, 4] if fmt == "csv" else [1, 2, 3])
    json.dumps([r.raw for r in recs])  # JSON-serialisable


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_number_ids_when_no_id_field(tmp_path, fmt):
    recs = load_records(write_any(tmp_path, fmt, NO_ID))
    assert [r.id for r in recs] == ["0", "1", "2"]
    assert [prompt_response(r.raw) for r in recs] == [(r["prompt"], r["response"]) for r in NO_ID]


def test_numeric_ids_become_strings(tmp_path):
    rows = [{"id": 10, "text": "hello world"}, {"id": 11, "text": "good night"}]
    for fmt in ("jsonl", "parquet", "hf"):
        recs = load_records(write_any(tmp_path, fmt, rows, name=f"n{fmt}"))
        assert [r.id for r in recs] == ["10", "11"]
        assert type(recs[0].raw["id"]) is int  # numpy/arrow scalars converted to Python


def test_jsonl_blank_lines_skipped_but_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.ndjson", NO_ID, blank_after_first=True)
    recs = load_records(path)
    assert [r.line for r in recs] == [1, 4, 5]
    assert [r.id for r in recs] == ["0", "1", "2"]  # row number, not line number


def test_csv_multiline_cell_lines_are_physical(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('text,extra\n"line one\nline two",\n\nsecond,x\n', encoding="utf-8")
    recs = load_records(path)
    assert [r.line for r in recs] == [2, 5]
    assert recs[0].raw == {"text": "line one\nline two", "extra": ""}


def test_json_object_with_single_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 2, "data": ROWS}), encoding="utf-8")
    assert [r.id for r in load_records(path)] == ["a", "b", "c"]


def test_hf_datasetdict_single_split_and_several(tmp_path):
    import datasets

    one = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(one))
    assert [r.id for r in load_records(one)] == ["a", "b", "c"]
    two = tmp_path / "two"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(two))
    with pytest.raises(NtkSelectError) as e:
        load_records(two)
    msg = str(e.value)
    assert "train" in msg and "test" in msg and str(two / "train") in msg


def test_parquet_null_fields_treated_as_absent(tmp_path):
    # A unified schema gives every row every column; None must not count as a field.
    rows = [{"text": "plain text row", "prompt": None, "response": None}, {"text": None, "prompt": "p", "response": "r"}]
    recs = load_records(write_any(tmp_path, "parquet", rows))
    assert [record_kind(r.raw) for r in recs] == ["text", "prompt_response"]


# --------------------------------------------------------------------------- shapes

SHAPES = {
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    "prompt_response": {"prompt": "P", "response": "R"},
    "instruction": {"instruction": "Translate", "input": "chat", "output": "cat"},
    "instruction_no_input": {"instruction": "Say yes", "input": "", "output": "yes"},
    "question": {"question": "Q?", "answer": 42},
    "text": {"text": "Just some text.", "meta": {"x": 1}},
}


def test_record_kinds_and_text():
    assert record_kind(SHAPES["messages"]) == "messages"
    assert record_kind(SHAPES["text"]) == "text"
    for k in ("prompt_response", "instruction", "instruction_no_input", "question"):
        assert record_kind(SHAPES[k]) == "prompt_response"
    assert prompt_response(SHAPES["instruction"]) == ("Translate\n\nchat", "cat")
    assert prompt_response(SHAPES["instruction_no_input"]) == ("Say yes", "yes")
    assert prompt_response(SHAPES["question"]) == ("Q?", "42")
    assert record_text(SHAPES["prompt_response"]) == "P\nR"
    assert record_text(SHAPES["messages"]) == "Hi\nHello!"
    assert record_text(SHAPES["text"]) == "Just some text."
    # messages win over other fields; prompt+response over text
    assert record_kind({**SHAPES["messages"], "text": "x"}) == "messages"
    assert record_kind({"prompt": "a", "response": "b", "text": "x"}) == "prompt_response"
    with pytest.raises(NtkSelectError):
        prompt_response(SHAPES["text"])


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_every_shape_loads_and_tokenizes(tmp_path, tokenizer, template):
    path = write_jsonl(tmp_path / "shapes.jsonl", list(SHAPES.values()))
    recs = load_records(path)
    exs, stats = tokenize_records(recs, tokenizer, max_length=512, template=template)
    assert stats.examples == len(SHAPES) and stats.template == template and stats.truncated == 0
    assert stats.tokens == sum(len(e.input_ids) for e in exs)
    assert stats.trained_tokens == sum(sum(e.train_mask) for e in exs)
    for e in exs:
        assert len(e.input_ids) == len(e.train_mask) and not e.truncated
        assert not e.train_mask[0] and any(e.train_mask)


def _trained_text(tokenizer, ex):
    return tokenizer.decode([t for t, m in zip(ex.input_ids, ex.train_mask) if m])


def rec(raw, path="x.jsonl", line=1):
    return Record(id="0", raw=raw, path=path, line=line)


def test_chat_prompt_response_trains_response_and_end_of_turn(tokenizer):
    prompt, response = "Name a large planet, please.", "Jupiter is the largest planet."
    ex = tokenize_record(rec({"prompt": prompt, "response": response}), tokenizer, 512, "chat")
    trained = _trained_text(tokenizer, ex)
    assert trained.startswith(response)
    assert trained[len(response) :].strip() == "<|im_end|>"  # end-of-turn token(s)
    assert prompt not in trained and "user" not in trained
    full = tokenizer.decode(ex.input_ids)
    assert prompt in full and "You are a helpful AI assistant" in full  # default system prompt is context


def test_plain_prompt_response_trains_response_plus_eos(tokenizer):
    ex = tokenize_record(rec({"question": "What is the capital of Italy?", "answer": "Rome."}), tokenizer, 512, "plain")
    trained = [t for t, m in zip(ex.input_ids, ex.train_mask) if m]
    assert trained == tokenizer("Rome.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert _trained_text(tokenizer, ex) == "Rome." + tokenizer.eos_token
    assert tokenizer.decode(ex.input_ids).startswith("What is the capital of Italy?\n")


def test_text_trains_every_predicted_token(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ex = tokenize_record(rec({"text": text}), tokenizer, 512, "chat")
    assert ex.input_ids == tokenizer(text)["input_ids"]
    assert ex.train_mask == [False] + [True] * (len(ex.input_ids) - 1)  # index 0 is never predicted


def test_multi_turn_messages_train_exactly_both_assistant_turns(tokenizer):
    msgs = [
        {"role": "system", "content": "You answer tersely."},
        {"role": "user", "content": "First question here?"},
        {"role": "assistant", "content": "Alpha answer."},
        {"role": "user", "content": "Second question here?"},
        {"role": "assistant", "content": "Beta answer."},
    ]
    ex = tokenize_record(rec({"messages": msgs}), tokenizer, 512, "chat")
    # Split the trained positions into contiguous spans: one per assistant turn.
    spans, cur = [], []
    for t, m in zip(ex.input_ids, ex.train_mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    texts = [tokenizer.decode(s) for s in spans]
    assert len(texts) == 2
    assert texts[0].startswith("Alpha answer.") and texts[0][len("Alpha answer.") :].strip() == "<|im_end|>"
    assert texts[1].startswith("Beta answer.") and texts[1][len("Beta answer.") :].strip() == "<|im_end|>"
    untrained = tokenizer.decode([t for t, m in zip(ex.input_ids, ex.train_mask) if not m])
    assert "question here" in untrained and "answer." not in untrained


def test_plain_messages_train_only_assistant_content(tokenizer):
    msgs = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "One"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Two"},
    ]
    ex = tokenize_record(rec({"messages": msgs}), tokenizer, 512, "plain")
    eos = tokenizer.eos_token
    assert _trained_text(tokenizer, ex) == f"One{eos}Two{eos}"
    assert tokenizer.decode(ex.input_ids) == f"user: Hello\nassistant: One{eos}\nuser: Again\nassistant: Two{eos}"


def test_resolve_template(tokenizer):
    assert resolve_template(tokenizer, "auto") == "chat"
    assert resolve_template(tokenizer, "plain") == "plain"

    class NoChat:
        chat_template = None

    assert resolve_template(NoChat(), "auto") == "plain"
    with pytest.raises(NtkSelectError, match="--template plain"):
        resolve_template(NoChat(), "chat")
    with pytest.raises(NtkSelectError, match="auto, chat, plain"):
        resolve_template(tokenizer, "fancy")


def test_messages_without_chat_template_names_file_and_line(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(NtkSelectError) as e:
        tokenize_record(rec(SHAPES["messages"], path="conv.jsonl", line=9), tokenizer, 512, "chat")
    msg = str(e.value)
    assert "conv.jsonl line 9" in msg and "--template plain" in msg and "\n" not in msg


def test_not_prefix_stable_template_is_an_error(tokenizer, monkeypatch):
    # A template that drops earlier assistant turns (like some "thinking" templates).
    tpl = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    monkeypatch.setattr(tokenizer, "chat_template", tpl)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(NtkSelectError, match="prefix-stable") as e:
        tokenize_record(rec({"messages": msgs}, line=4), tokenizer, 512, "chat")
    assert "x.jsonl line 4" in str(e.value)


def test_assistant_first_message_is_an_error_with_chat(tokenizer):
    msgs = [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}]
    with pytest.raises(NtkSelectError, match="starts with an assistant message") as e:
        tokenize_record(rec({"messages": msgs}, line=6), tokenizer, 512, "chat")
    assert "x.jsonl line 6" in str(e.value)
    ex = tokenize_record(rec({"messages": msgs}), tokenizer, 512, "plain")  # plain has no such problem
    assert _trained_text(tokenizer, ex) == "I start." + tokenizer.eos_token


def test_token_convention(tokenizer):
    conv = token_convention("auto", tokenizer)
    assert conv["template"] == "chat" and conv["eos_token_id"] == tokenizer.eos_token_id
    assert set(conv["kinds"]) == {"text", "prompt_response", "messages"}
    assert "t-1" in conv["prediction"] and "max_length" in conv["truncation"]
    json.dumps(conv)
    assert token_convention("plain", tokenizer)["template"] == "plain"


# --------------------------------------------------------------------------- truncation


def test_truncation_keeps_trained_tokens_of_long_prompt(tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(300))
    records = [
        rec({"prompt": long_prompt, "response": "Short answer."}),
        rec({"prompt": "Hi", "response": "Hello."}),
        rec({"text": long_prompt}),
    ]
    for template in ("chat", "plain"):
        exs, stats = tokenize_records(records, tokenizer, max_length=64, template=template)
        assert stats.truncated == 2 and stats.examples == 3
        long_ex, short_ex, text_ex = exs
        assert long_ex.truncated and len(long_ex.input_ids) == 64
        assert "Short answer." in _trained_text(tokenizer, long_ex)
        # The response sits at the end, so the window is the last 64 tokens (full context).
        full = tokenize_record(records[0], tokenizer, 4096, template)
        assert long_ex.input_ids == full.input_ids[-64:] and long_ex.train_mask[1:] == full.train_mask[-63:]
        assert sum(long_ex.train_mask) == sum(full.train_mask)
        assert not short_ex.truncated
        # text: keep the head, all tokens after index 0 trained
        assert text_ex.truncated and text_ex.input_ids == tokenizer(long_prompt)["input_ids"][:64]
        assert text_ex.train_mask == [False] + [True] * 63


def test_truncation_window_starts_quarter_before_long_response(tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(300))
    long_response = " ".join(f"tok{i}" for i in range(200))
    r = rec({"prompt": long_prompt, "response": long_response})
    ex = tokenize_record(r, tokenizer, 64, "plain")
    full = tokenize_record(r, tokenizer, 4096, "plain")
    first = full.train_mask.index(True)
    assert ex.truncated and ex.train_mask.index(True) == 64 // 4
    assert ex.input_ids == full.input_ids[first - 16 : first + 48]
    assert all(ex.train_mask[16:])


def test_truncation_keeps_head_when_it_has_trained_tokens(tokenizer):
    long_response = " ".join(f"tok{i}" for i in range(200))
    ex = tokenize_record(rec({"prompt": "Q", "response": long_response}), tokenizer, 40, "plain")
    full = tokenize_record(rec({"prompt": "Q", "response": long_response}), tokenizer, 4096, "plain")
    assert ex.truncated and ex.input_ids == full.input_ids[:40] and ex.train_mask == full.train_mask[:40]


# --------------------------------------------------------------------------- errors


def assert_one_line_error(path, match, *parts):
    with pytest.raises(NtkSelectError) as e:
        load_records(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert path.name in msg
    for p in parts:
        assert p in msg, msg
    assert match in msg, msg
    return msg


def test_error_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nope.jsonl", "no such file")


def test_error_unknown_extension(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("hello")
    msg = assert_one_line_error(p, "unsupported file type")
    for ext in (".jsonl", ".json", ".csv", ".parquet", "save_to_disk"):
        assert ext in msg


def test_error_malformed_jsonl_line(tmp_path):
    p = tmp_path / "med.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "a" "b"}\n', encoding="utf-8")
    assert_one_line_error(p, "not valid JSON", "line 3", "column", "fix or remove the line")


def test_error_malformed_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n{"text": "ok"},\n{"text": }\n]', encoding="utf-8")
    assert_one_line_error(p, "not valid JSON", "line 3")


def test_error_record_not_object(tmp_path):
    p = tmp_path / "arr.jsonl"
    p.write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    assert_one_line_error(p, "must be a JSON object", "line 2")
    q = tmp_path / "arr.json"
    q.write_text('[{"text": "ok"}, "just a string"]', encoding="utf-8")
    assert_one_line_error(q, "must be a JSON object", "row 2")


def test_error_no_recognised_fields(tmp_path):
    p = write_jsonl(tmp_path / "f.jsonl", [{"text": "ok"}, {"text": "fine"}, {"body": "x", "label": 1}])
    msg = assert_one_line_error(p, "no recognised fields", "line 3", "'body'", "'label'")
    for shape in ("messages", "prompt+response", "instruction+output", "question+answer", "text"):
        assert shape in msg


def test_error_half_shape_names_missing_partner(tmp_path):
    p = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "only a prompt"}])
    assert_one_line_error(p, "without its partner", "line 1", "prompt")


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"text": "   "}, "empty text"),
        ({"text": ""}, "empty text"),
        ({"prompt": "p", "response": ""}, "empty response"),
        ({"instruction": "i", "output": " \n"}, "empty response"),
        ({"question": "q", "answer": ""}, "empty response"),
        ({"prompt": "p", "response": ["a"]}, "must be a string"),
    ],
)
def test_error_empty_text_or_response(tmp_path, bad, match):
    p = write_jsonl(tmp_path / "e.jsonl", [{"text": "ok"}, bad])
    assert_one_line_error(p, match, "line 2")


@pytest.mark.parametrize(
    "messages,match",
    [
        ("hello", "must be a list"),
        ([], "must be a list"),
        ([{"role": "user"}], "message 0"),
        ([{"role": "user", "content": "hi"}, "bye"], "message 1"),
        ([{"role": "user", "content": "hi"}], "found only roles user"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "empty content"),
    ],
)
def test_error_bad_messages(tmp_path, messages, match):
    p = write_jsonl(tmp_path / "msgs.jsonl", [{"text": "ok"}, {"text": "ok2"}, {"messages": messages}])
    assert_one_line_error(p, match, "line 3")


@pytest.mark.parametrize("fmt,where", [("jsonl", "line 1 and line 3"), ("csv", "line 2 and line 4"), ("parquet", "row 1 and row 3")])
def test_error_duplicate_ids(tmp_path, fmt, where):
    rows = [{"id": "x1", "text": "a"}, {"id": "x2", "text": "b"}, {"id": "x1", "text": "c"}]
    assert_one_line_error(write_any(tmp_path, fmt, rows), "duplicate id 'x1'", where)


def test_error_duplicate_between_id_and_row_number(tmp_path):
    p = write_jsonl(tmp_path / "mix.jsonl", [{"text": "a"}, {"id": "0", "text": "b"}])
    assert_one_line_error(p, "duplicate id '0'", "line 1 and line 2")


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]"])
def test_error_empty_file(tmp_path, content):
    for name in ("empty.jsonl", "empty.json"):
        if content == "[]" and name.endswith("jsonl"):
            continue
        p = tmp_path / name
        p.write_text(content, encoding="utf-8")
        assert_one_line_error(p, "has no records")
    c = tmp_path / "empty.csv"
    c.write_text("text,id\n", encoding="utf-8")
    assert_one_line_error(c, "has no records")


def test_error_csv_ragged_row(tmp_path):
    p = tmp_path / "rag.csv"
    p.write_text("text,id\nhello,1\nhello, world,2\n", encoding="utf-8")
    assert_one_line_error(p, "3 fields but the header has 2", "line 3")


def test_error_folder_not_a_dataset(tmp_path):
    d = tmp_path / "justafolder"
    d.mkdir()
    assert_one_line_error(d, "save_to_disk")


def test_error_nothing_to_train_on(tmp_path, tokenizer):
    one_token = "hello"
    assert len(tokenizer(one_token)["input_ids"]) == 1
    p = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "hello world again"}, {"text": one_token}])
    recs = load_records(p)  # loading is fine; tokenizing finds nothing to predict
    with pytest.raises(NtkSelectError) as e:
        tokenize_records(recs, tokenizer, max_length=64)
    msg = str(e.value)
    assert "tiny.jsonl line 2" in msg and "nothing to train on" in msg and "\n" not in msg
