"""The streamed pool (issue 13): read once, tokenised in batches into a token store on disk.

The reference everywhere is the in-memory path it replaced: ``load_records`` and one
``tokenize_record`` call per record, held as Python lists."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import FORMATS, run_outputs, sharded_args, write_any, write_big_data, write_cli_data
from ntkselect import pipeline
from ntkselect.config import SelectConfig
from ntkselect.data import pool as poolmod
from ntkselect.data.pool import PoolExamples, PoolRecords, build_store, find_store, scan_pool, tokenizer_fingerprint
from ntkselect.data.records import RecordStream, TokenizeStats, load_records, record_text, tokenize_batch, tokenize_record
from ntkselect.errors import NtkSelectError
from ntkselect.files import sha256_path

# every record shape, long enough in places to be truncated, with unicode and a leading space
SHAPES = [
    {"id": "pr", "prompt": "What is 2+2?", "response": "  It is 4.", "source": "maths"},
    {"id": "txt", "text": "Plain text about the heart, its valves and é accents. " * 3, "subject": "medicine"},
    {"id": "qa", "question": "Capital of France? " * 12, "answer": "Paris", "source": "geo"},
    {"id": "io", "instruction": "Translate", "input": "Bonjour", "output": "Hello"},
    {
        "id": "msg",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "more?"},
            {"role": "assistant", "content": " ok\n"},
        ],
    },
]


def pool_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        r = dict(SHAPES[i % len(SHAPES)])
        r["id"] = f"{r['id']}{i}"
        for k in ("prompt", "text", "question", "instruction"):
            if k in r:
                r[k] = f"{r[k]} (record {i})"
        rows.append(r)
    return rows


def reference(path, tokenizer, max_length, template):
    recs = load_records(path)
    return recs, [tokenize_record(r, tokenizer, max_length, "auto" if template == "auto" else template) for r in recs]


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_reads_back_the_same_records_and_tokens_in_every_format(tmp_path, tokenizer, fmt, monkeypatch):
    rows = [r for r in pool_rows() if fmt not in ("csv", "parquet", "hf") or "messages" not in r]  # tables hold flat columns
    if fmt == "csv":  # one header for every row: prompt/response records only, some of them long
        rows = [{"id": f"c{i}", "prompt": f"Question {i}: " + "why? " * (i % 9) * 3, "response": f"  Answer {i}.", "source": "s"} for i in range(40)]
    elif fmt in ("parquet", "hf"):  # every column in every row (missing: null), as a table holds them
        cols = list(dict.fromkeys(k for r in rows for k in r))
        rows = [{k: r.get(k) for k in cols} for r in rows]
    path = write_any(tmp_path, fmt, rows, "pool")
    monkeypatch.setattr(poolmod, "SHARD_ROWS", 7)  # several shards, the last one partial
    for template in ("plain", "chat"):
        recs, exs = reference(path, tokenizer, 24, template)
        store = build_store(path, tokenizer, 24, template, tmp_path / f"store-{template}", progress=False)
        assert store.meta["shards"] == -(-len(recs) // 7)
        got_r, got_e = PoolRecords(store), PoolExamples(store)
        assert len(got_r) == len(recs) and list(got_r) == recs
        assert list(got_e) == exs
        assert list(got_r.ids) == [r.id for r in recs]
        assert got_e.lengths.tolist() == [len(e.input_ids) for e in exs]
        assert got_e.trained.tolist() == [sum(e.train_mask) for e in exs]
        assert any(e.truncated for e in exs)  # the fixture really exercises truncation
        assert store.sha256 == sha256_path(path)
        # a subset view is the same records at those positions
        keep = [5, 0, 3]
        assert list(got_r.subset(keep)) == [recs[i] for i in keep] and list(got_e.subset(keep)) == [exs[i] for i in keep]


def test_batch_tokenizing_equals_one_record_at_a_time(tmp_path, tokenizer):
    recs = load_records(write_any(tmp_path, "jsonl", pool_rows(60), "pool"))
    for template in ("plain", "chat", "auto"):
        for max_length in (8, 24, 512):
            assert tokenize_batch(recs, tokenizer, max_length, template) == [tokenize_record(r, tokenizer, max_length, template) for r in recs]


def test_batch_tokenizing_reports_the_first_bad_record(tmp_path, tokenizer):
    rows = pool_rows(10)
    rows[6] = {"id": "bad", "messages": [{"role": "assistant", "content": "first"}]}  # a chat template cannot locate it
    rows[8] = {"id": "bad2", "messages": [{"role": "assistant", "content": "also"}]}
    recs = load_records(write_any(tmp_path, "jsonl", rows, "pool"))
    with pytest.raises(NtkSelectError) as one:
        tokenize_record(recs[6], tokenizer, 64, "chat")
    with pytest.raises(NtkSelectError) as batch:
        tokenize_batch(recs, tokenizer, 64, "chat")
    assert str(batch.value) == str(one.value) and "line 7" in str(batch.value)


def test_store_hashes_the_bytes_it_read_in_one_pass(tmp_path, tokenizer):
    path = write_any(tmp_path, "jsonl", pool_rows(), "pool")
    opened = []
    real_open = open

    def counting_open(p, *a, **kw):
        if os.fspath(p) == os.fspath(path):
            opened.append(p)
        return real_open(p, *a, **kw)

    import builtins

    builtins.open, saved = counting_open, builtins.open
    try:
        store = build_store(path, tokenizer, 24, "plain", tmp_path / "s", progress=False)
    finally:
        builtins.open = saved
    assert len(opened) == 1 and store.sha256 == sha256_path(path)


def test_a_bad_record_leaves_no_store_behind(tmp_path, tokenizer):
    rows = pool_rows()
    path = write_any(tmp_path, "jsonl", rows, "pool")
    path.write_text(path.read_text() + '{"text": broken\n')
    with pytest.raises(NtkSelectError, match=f"line {len(rows) + 1}: not valid JSON"):
        build_store(path, tokenizer, 24, "plain", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_excluded_records_are_counted_and_left_out(tmp_path, tokenizer):
    rows = pool_rows()
    path = write_any(tmp_path, "jsonl", rows, "pool")
    texts = {record_text(r) for r in rows[:3]}
    store = build_store(path, tokenizer, 24, "plain", tmp_path / "s", drop=[("dupes", lambda r: record_text(r.raw) in texts)], progress=False)
    # the messages shape repeats its text: a repeat of an earlier record is kept in the store but is no candidate
    first: dict[str, int] = {}
    repeats = []  # (row, the earlier row with its text)
    for k, r in enumerate(rows[3:]):
        if record_text(r) in first:
            repeats.append((k, first[record_text(r)]))
        else:
            first[record_text(r)] = k
    assert repeats and store.duplicates.tolist() == [list(x) for x in repeats]
    assert store.meta["excluded"] == {"dupes": 3, "duplicates_in_pool": len(repeats)} and store.n == len(rows) - 3
    assert [r.id for r in PoolRecords(store)] == [r["id"] for r in rows[3:]]
    assert [r.id for r in PoolRecords(store, store.keep)] == [r["id"] for k, r in enumerate(rows[3:]) if k not in dict(repeats)]
    scan = scan_pool(path, tokenizer, 24, "plain", [("dupes", lambda r: record_text(r.raw) in texts)], progress=False)
    assert scan.lengths.tolist() == PoolExamples(store, store.keep).lengths.tolist() and scan.excluded == store.meta["excluded"]


def test_find_store_refuses_another_tokenizer_max_length_or_file(tmp_path, tokenizer):
    path = write_any(tmp_path, "jsonl", pool_rows(), "pool")
    build_store(path, tokenizer, 24, "plain", tmp_path / "s", exclusion_key="k", progress=False)
    notes: list[str] = []
    assert find_store([tmp_path / "s"], path, tokenizer, 24, "plain", "k", log=notes.append) is not None
    assert find_store([tmp_path / "s"], path, tokenizer, 32, "plain", "k", log=notes.append) is None
    assert "--max-length changed" in notes[-1]
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<a-new-token>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    assert find_store([tmp_path / "s"], path, other, 24, "plain", "k", log=notes.append) is None
    assert "the tokenizer changed" in notes[-1]
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ messages }}"  # the same vocabulary, another chat template
    assert find_store([tmp_path / "s"], path, other, 24, "plain", "k", log=notes.append) is None
    time.sleep(0.01)
    path.write_text(path.read_text())  # same bytes, new modification time: not trusted without reading it again
    assert find_store([tmp_path / "s"], path, tokenizer, 24, "plain", "k", log=notes.append) is None
    assert "the pool file changed" in notes[-1]


def _in_memory_inputs(cfg: SelectConfig) -> pipeline.Inputs:
    """The Inputs the pipeline built before issue 13: every record and tokenised example in lists."""
    from ntkselect.model.loading import load_tokenizer

    tok = load_tokenizer(cfg.model)
    domain, pool_all = load_records(cfg.domain), load_records(cfg.pool)
    texts = {record_text(r.raw) for r in domain}
    pool = [r for r in pool_all if record_text(r.raw) not in texts]
    stats = {}
    exs = {}
    for name, recs in (("domain", domain), ("pool", pool)):
        st = TokenizeStats(template="plain" if cfg.template == "plain" else "chat")
        exs[name] = [tokenize_record(r, tok, cfg.max_length, cfg.template) for r in recs]
        for e in exs[name]:
            st.add(e)
        stats[name] = st
    return pipeline.Inputs(
        domain,
        pool,
        len(pool_all),
        {"duplicates_of_domain": len(pool_all) - len(pool)},
        tok,
        exs["domain"],
        exs["pool"],
        stats["domain"],
        stats["pool"],
        0.0,
        hashes={"domain": sha256_path(cfg.domain), "pool": sha256_path(cfg.pool)},
    )


def _cfg(dom, pool, model, out, method, **kw):
    base = dict(domain=str(dom), pool=str(pool), n=5, out=str(out), model=model, method=method, threads=1, warmup_epochs=1, knn_k=4, precision="float32")
    return SelectConfig(**{**base, **kw})


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_selection_is_byte_identical_to_the_in_memory_one(tmp_path, tiny_model_dir, fmt):
    dom, _, rows = write_cli_data(tmp_path)
    pool = write_any(tmp_path, fmt, rows if fmt in ("jsonl", "json") else rows[:-1], "pool")  # tables: the prompt/response records (one set of columns)
    methods = ["bm25", "random"] + (["ntk"] if fmt in ("jsonl", "parquet") else [])
    for method in methods:
        streamed = pipeline.select(_cfg(dom, pool, tiny_model_dir, tmp_path / f"s-{method}", method), log=lambda m: None)
        cfg = _cfg(dom, pool, tiny_model_dir, tmp_path / f"m-{method}", method)
        cfg.validate()
        pipeline._select(cfg, _in_memory_inputs(cfg), lambda m: None, time.perf_counter())
        a, b = run_outputs(tmp_path / f"s-{method}"), run_outputs(tmp_path / f"m-{method}")
        assert a == b, (fmt, method)
        ma = json.loads((tmp_path / f"s-{method}" / "manifest.json").read_text())
        mb = json.loads((tmp_path / f"m-{method}" / "manifest.json").read_text())
        for k in ("inputs", "tokens", "summary"):
            assert ma[k] == mb[k] if k != "inputs" else ma[k]["pool"] | {"path": 0} == mb[k]["pool"] | {"path": 0}
        assert len(streamed.selected) == 5
    assert not any(p.name.startswith(".ntkpool-") for p in tmp_path.iterdir())  # no temporary store left beside --out


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ntkselect", *map(str, args)], capture_output=True, text=True, input=stdin)


def test_a_pipe_as_pool_works_and_equals_the_file(tmp_path, tiny_model_dir):
    dom, pool, _ = write_cli_data(tmp_path)
    common = ["--domain", dom, "--n", 5, "--model", tiny_model_dir, "--method", "bm25", "--threads", 1]
    assert _cli("select", "--pool", pool, "--out", tmp_path / "file", *common).returncode == 0
    proc = _cli("select", "--pool", "/dev/stdin", "--out", tmp_path / "stdin", *common, stdin=pool.read_text())
    assert proc.returncode == 0, proc.stderr
    assert run_outputs(tmp_path / "stdin") == run_outputs(tmp_path / "file")
    man = json.loads((tmp_path / "stdin" / "manifest.json").read_text())
    assert man["inputs"]["pool"]["sha256"] == sha256_path(pool)
    # a FIFO too, written by another thread while the run reads it once
    fifo = tmp_path / "pool.fifo.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(pool.read_bytes()))
    writer.start()
    proc = _cli("select", "--pool", fifo, "--out", tmp_path / "fifo", *common)
    writer.join()
    assert proc.returncode == 0, proc.stderr
    assert run_outputs(tmp_path / "fifo") == run_outputs(tmp_path / "file")


def test_a_pipe_of_parquet_is_refused_in_one_line(tmp_path, tiny_model_dir):
    dom, _, _ = write_cli_data(tmp_path)
    fifo = tmp_path / "pool.parquet"
    os.mkfifo(fifo)
    proc = _cli("select", "--domain", dom, "--pool", fifo, "--n", 5, "--model", tiny_model_dir, "--out", tmp_path / "run", "--method", "bm25")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a pipe" in lines[0] and "write it to a file first" in lines[0], proc.stderr
    with pytest.raises(NtkSelectError, match="is a pipe"):
        RecordStream(fifo)


def test_resume_reuses_the_tokenised_pool_and_refuses_a_changed_one(tmp_path, tiny_model_dir, monkeypatch):
    big = write_big_data(tmp_path)
    from ntkselect.cli.main import main

    args = [str(a) for a in sharded_args(big, tiny_model_dir, tmp_path / "run")]
    want = tmp_path / "ref"
    assert main([str(a) for a in sharded_args(big, tiny_model_dir, want)]) == 0

    # the run stops after its pool was tokenised and moved into the run (here: in stage 2)
    from ntkselect.selection.ntk import stage2

    real = stage2.run_stage2
    monkeypatch.setattr("ntkselect.selection.ntk.selector.run_stage2", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(args) != 0
    store = tmp_path / "run" / "work" / "pool"
    assert (store / "store.json").exists()
    monkeypatch.setattr("ntkselect.selection.ntk.selector.run_stage2", real)

    # the rerun reads nothing of the pool again: building a store would fail
    monkeypatch.setattr(pipeline, "build_store", lambda *a, **k: pytest.fail("the pool was tokenised again"))
    assert main(args) == 0
    assert run_outputs(tmp_path / "run") == run_outputs(want)
    # the manifest says the store was reused; the reference run's says how long its pass took
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["load"] == {"pool_pass_seconds": None, "pool_store_reused": True}
    ref_load = json.loads((want / "manifest.json").read_text())
    assert not ref_load["load"]["pool_store_reused"] and 0 < ref_load["load"]["pool_pass_seconds"] <= ref_load["timings"]["load"]

    # with another --max-length (and --overwrite) the left store is not trusted
    monkeypatch.undo()
    monkeypatch.setattr("ntkselect.selection.ntk.selector.run_stage2", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    args2 = [str(a) for a in sharded_args(big, tiny_model_dir, tmp_path / "run2")]
    assert main(args2) != 0
    monkeypatch.undo()
    built = []
    real_build = pipeline.build_store
    monkeypatch.setattr(pipeline, "build_store", lambda *a, **k: built.append(1) or real_build(*a, **k))
    assert main([*args2, "--max-length", "40", "--overwrite"]) == 0
    assert built == [1]


def test_pool_views_cost_a_few_bytes_per_record(tmp_path, tokenizer):
    """The driver holds per-record numbers, not token lists: the arrays it keeps are O(records)."""
    path = write_any(tmp_path, "jsonl", pool_rows(200), "pool")
    store = build_store(path, tokenizer, 512, "plain", tmp_path / "s", progress=False)
    held = sum(a.nbytes for a in (store.lengths, store.trained, store.truncated, store.group_codes, store.source_codes))
    assert held <= 40 * store.n
    tokens = int(store.lengths.sum())
    ids_bytes = sum((d / "ids.bin").stat().st_size for d in store.folder.glob("shard-*"))
    assert ids_bytes == 4 * tokens and np.array_equal(np.diff(np.load(store.folder / "shard-00000" / "tok_off.npy")), store.lengths)


def test_worker_processes_write_the_same_store_and_the_same_first_error(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(poolmod, "TOKENIZE_BATCH", 6)  # many chunks, so that two processes share them
    monkeypatch.setattr(poolmod, "SHARD_ROWS", 16)
    rows = pool_rows(100)
    path = write_any(tmp_path, "jsonl", rows, "pool")
    texts = {record_text(r) for r in rows[10:14]}
    drop = [("dupes", lambda r: record_text(r.raw) in texts)]
    one = build_store(path, tokenizer, 24, "chat", tmp_path / "one", drop=drop, progress=False, workers=1)
    two = build_store(path, tokenizer, 24, "chat", tmp_path / "two", drop=drop, progress=False, workers=2)
    for f in sorted(p.relative_to(one.folder) for p in one.folder.rglob("*") if p.is_file() and p.name != "store.json"):
        assert (one.folder / f).read_bytes() == (two.folder / f).read_bytes(), f
    strip = lambda m: {k: v for k, v in m.items() if k not in ("seconds", "workers")}  # noqa: E731
    assert strip(one.meta) == strip(two.meta) and one.meta["excluded"]["dupes"] == 4  # (and the pool's repeated texts, found the same way)
    # a bad line deep in the file, and a duplicate id after it: the line is reported, by both
    lines = path.read_text().splitlines()
    lines[57] = '{"text": broken'
    lines[80] = lines[3]
    path.write_text("\n".join(lines) + "\n")
    errors = []
    for w in (1, 2):
        with pytest.raises(NtkSelectError) as err:
            build_store(path, tokenizer, 24, "chat", tmp_path / f"bad{w}", progress=False, workers=w)
        errors.append(str(err.value))
        assert not (tmp_path / f"bad{w}").exists()
    assert errors[0] == errors[1] and "line 58: not valid JSON" in errors[0]
    lines[57] = json.dumps(rows[57])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(NtkSelectError, match="duplicate id 'io3' at line 4 and line 81"):
        build_store(path, tokenizer, 24, "chat", tmp_path / "dup", progress=False, workers=2)


def test_the_dry_run_prices_the_token_store(tmp_path, tiny_model_dir):
    from ntkselect.model.loading import load_tokenizer
    from ntkselect.runs.plan import estimate, format_plan

    dom, _, _ = write_cli_data(tmp_path)
    pool = write_any(tmp_path, "jsonl", pool_rows(300), "pool")
    cfg = _cfg(dom, pool, tiny_model_dir, tmp_path / "run", "ntk", max_length=48)
    plan = estimate(cfg)
    store = build_store(pool, load_tokenizer(tiny_model_dir), 48, "auto", tmp_path / "s", progress=False)
    assert plan["disk"]["tokenised_pool"] == pytest.approx(store.bytes_on_disk(), rel=0.15)
    text = format_plan(plan)
    assert "tokenised pool" in text and "load: measured, not estimated" in text
