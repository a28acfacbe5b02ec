"""A hostile pass over the CLI (issue 23): each real mistake or real file ends in one clear line
(naming the file or flag and the fix), a correct result, or a warning, never a traceback, a
hang, or lost or silently wrong output. One test per row of the issue's list (row 1, the
refused run, is tests/test_lock_race.py), and for the class behind it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_jsonl
from ntkselect.cli.main import main
from ntkselect.data.leak import TestQuestions, split_options
from ntkselect.data.records import Record
from ntkselect.errors import NtkSelectError
from ntkselect.runs import folder as runfolder

RESULTS = ("selected.jsonl", "scores.jsonl", "train.jsonl")
DOMAIN = [
    {"id": f"d{i}", "question": f"What should a doctor know about {t}?", "answer": f"Facts about {t} matter."} for i, t in enumerate(["the heart", "a fever"])
]
POOL = [
    {"id": f"p{i}", "prompt": f"Question {i}: tell me about {w}.", "response": f"{w.capitalize()} is topic {i}.", "subject": s}
    for i, (w, s) in enumerate([("the heart", "$$"), ("algebra", "$x^$"), ("a fever", "a_b$"), ("torts", "law"), ("primes", "maths"), ("the liver", "med")])
]


def one_line(rc: int, err: str, *expect: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("ntkselect: error: "), err
    for s in expect:
        assert s in lines[0], (s, lines[0])
    return lines[0]


def sel(model, out, domain, pool, *extra, n=2, method="bm25") -> list[str]:
    base = ["select", "--domain", str(domain), "--pool", str(pool), "--n", str(n), "--out", str(out), "--model", str(model), "--method", method]
    return [*base, "--threads", "1", "--precision", "float32", *map(str, extra)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    return {"domain": write_jsonl(d / "domain.jsonl", DOMAIN), "pool": write_jsonl(d / "pool.jsonl", POOL), "dir": d}


@pytest.fixture(scope="module")
def finished(files, tiny_model_dir, tmp_path_factory):
    """A finished bm25 run (fast: no warm-up) whose pool subjects are mathtext-like."""
    out = tmp_path_factory.mktemp("fin") / "run"
    assert main(sel(tiny_model_dir, out, files["domain"], files["pool"])) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("report.html", runfolder.LOCK))
    return dst


# ----------------------------------------------------------------- 2: report and mathtext


def test_2_report_shows_subjects_that_look_like_mathtext_as_written(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    page = (run / "report.html").read_text()
    assert "<img" in page and "$$" in page  # the composition plot was drawn, the subject shown as it is


# ----------------------------------------------------------------- 3: bm25 without words


def test_3_bm25_on_a_pool_without_a_word_is_one_line_and_no_shared_word_warns(files, tiny_model_dir, tmp_path, capsys):
    pool = write_jsonl(tmp_path / "nowords.jsonl", [{"text": f"{c} {c}"} for c in "abcdef"])
    one_line(main(sel(tiny_model_dir, tmp_path / "a", files["domain"], pool)), capsys.readouterr().err, "--method bm25", str(pool), "another --method")
    assert not (tmp_path / "a" / "manifest.json").exists()
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": f"zebra number {w} grazes"} for w in ("one", "two", "three", "four")])
    assert main(sel(tiny_model_dir, tmp_path / "b", files["domain"], other)) == 0
    err = capsys.readouterr().err
    assert "warning: --method bm25: no domain example shares a word with the pool" in err and "Traceback" not in err


# ----------------------------------------------------------------- 4: Ctrl-C twice, SIGTERM


def _pool_big(path: Path, n: int = 60000) -> Path:
    # large enough that the load lasts seconds even on a fast machine: a test starved of CPU for a
    # moment must still find it loading when its signal arrives (with 6000 records, a run under
    # load once finished before the signal and exited 0)
    return write_jsonl(path, [{"prompt": f"Item {i}: say something about {i % 97} things.", "response": f"Thing {i} is said. " * 3} for i in range(n)])


def _start_load(files, model, out, pool):
    args = sel(model, out, files["domain"], pool, n=2)
    args[args.index("--threads") + 1] = "2"  # forked workers in the pool pass, as on a real machine
    proc = subprocess.Popen(
        [sys.executable, "-m", "ntkselect", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as from a terminal: a test run started in the background (`cmd &`, nohup) ignores SIGINT,
        # its children inherit that, and Python keeps an inherited SIGINT ignored (the run then
        # finished, exit 0, and this test failed only when CI ran in the background)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not (out.exists() and any(p.name.startswith(".ntkpool-") for p in out.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    return proc


@pytest.mark.parametrize("how", ["ctrl-c twice", "sigterm"])
def test_4_ctrl_c_twice_or_sigterm_during_the_load_ends_quietly_and_leaves_nothing(how, files, tiny_model_dir, tmp_path):
    pool = _pool_big(tmp_path / "big.jsonl")
    out = tmp_path / "run"
    proc = _start_load(files, tiny_model_dir, out, pool)
    if how == "sigterm":
        os.kill(proc.pid, signal.SIGTERM)
    else:  # a terminal's Ctrl-C goes to the whole process group (the driver and its workers)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130; or death by the second SIGINT itself once the interpreter has finished (the shell shows 130 too)
    assert proc.returncode in ((130, -signal.SIGINT) if how != "sigterm" else (143,)), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len([x for x in err.splitlines() if x.startswith("ntkselect:")]) <= 1, err
    assert not any(p.name.startswith(".ntkpool-") for p in tmp_path.iterdir())  # never beside --out
    if how == "sigterm":  # its cleanup ran: nothing of the interrupted load is left
        assert not out.exists() or not any(p.name.startswith(".ntkpool-") for p in out.iterdir())


# ----------------------------------------------------------------- 5 and 8: damaged or edited runs


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("manifest {}", "not the manifest of a finished ntkselect selection"),
        ("no scores", "scores.jsonl is missing"),
        ("no selected", "selected.jsonl is missing"),
        ("scores edited", "scores.jsonl has changed since the run wrote it"),
    ],
)
def test_5_report_on_a_damaged_run_is_one_line(damage, expect, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    if damage == "manifest {}":
        (run / "manifest.json").write_text("{}")
    elif damage == "no scores":
        (run / "scores.jsonl").unlink()
    elif damage == "no selected":
        (run / "selected.jsonl").unlink()
    else:
        rows = (run / "scores.jsonl").read_text().splitlines()
        (run / "scores.jsonl").write_text("\n".join(reversed(rows)) + "\n")
    one_line(main(["report", str(run)]), capsys.readouterr().err, expect, "rerun the selection" if "edited" not in damage else "restore it")
    assert not (run / "report.html").exists()


def test_8_an_input_edited_after_the_run(files, tiny_model_dir, tmp_path, capsys):
    dom = write_jsonl(tmp_path / "domain.jsonl", DOMAIN)
    pool = write_jsonl(tmp_path / "pool.jsonl", POOL)
    run = tmp_path / "run"
    assert main(sel(tiny_model_dir, run, dom, pool)) == 0
    capsys.readouterr()
    write_jsonl(dom, [{**DOMAIN[0], "answer": "Something else entirely."}, DOMAIN[1]])
    assert main(["report", str(run)]) == 0  # the report still shows the run, with a warning and a note instead of the neighbours
    err = capsys.readouterr().err
    assert "warning: report: the domain file is not the one the run read" in err and "has changed since the run read it" in err
    page = (run / "report.html").read_text()
    assert "has changed since the run read it" in page and "Something else entirely" not in page
    write_jsonl(pool, POOL[:-1])
    rc = main(["diagnose", "--run", str(run), "--out", str(tmp_path / "diag")])
    one_line(rc, capsys.readouterr().err, f"--run {run}", "the --domain of the run", "has changed since the run read it", "pass --domain")
    assert not (tmp_path / "diag").exists()


# ----------------------------------------------------------------- 6: a test question split across fields


def test_6_a_test_question_split_across_instruction_and_input_is_a_leak():
    q = {"id": "t1", "prompt": "About heart 6?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:", "response": "A. yes", "options": ["A", "B", "C", "D"]}
    assert split_options(q["prompt"]) == ("About heart 6?", ["yes", "no", "maybe", "never"])
    long_q = {"id": "t2", "prompt": "Which of these organs filters the blood and makes urine?\n(A) kidney\n(B) lung\n(C) heart\n(D) brain"}
    tq = TestQuestions([Record(id=r["id"], raw=r, path="test.jsonl", line=i) for i, r in enumerate((q, long_q), 1)])
    opts = "A. yes\nB. no\nC. maybe\nD. never"
    assert tq.find({"instruction": "About heart 6?", "input": opts, "output": "A"}) == "t1"
    assert tq.find({"instruction": opts, "input": "About heart 6?", "output": "A"}) == "t1"  # either order
    assert tq.find({"messages": [{"role": "user", "content": "About heart 6?"}, {"role": "assistant", "content": opts}]}) == "t1"
    split = {"instruction": "Question: Which of these organs filters the blood and makes urine?", "input": "kidney, lung, heart or brain", "output": "kidney"}
    assert tq.find(split) == "t2"
    assert tq.find({**split, "instruction": split["instruction"] + " In a fish?"}) is None  # more words after the stem: another question
    # not leaks: the short stem without its options, or the options of another question
    assert tq.find({"instruction": "About heart 6?", "input": "something else", "output": "A"}) is None
    assert tq.find({"instruction": "About heart 7?", "input": opts, "output": "A"}) is None
    assert tq.find({"instruction": "Which of these organs filters the blood and makes urine?", "input": "kidney or liver", "output": "kidney"}) is None


# ----------------------------------------------------------------- 7: duplicates in a pool


def test_7_duplicates_in_the_pool_are_candidates_once_with_a_warning(files, tiny_model_dir, tmp_path, capsys):
    dup = write_jsonl(tmp_path / "dup.jsonl", POOL + [dict(POOL[0], id="copy-a"), dict(POOL[2], id="copy-b")] + [dict(POOL[0], id=f"x{i}") for i in range(40)])
    assert main(sel(tiny_model_dir, tmp_path / "dup", files["domain"], dup, n=4)) == 0
    err = capsys.readouterr().err
    assert "warning: 42 records of --pool" in err and "repeat the text of an earlier record exactly (e.g. line 7 repeats line 1)" in err
    m = json.loads((tmp_path / "dup" / "manifest.json").read_text())
    assert m["inputs"]["pool"]["excluded"]["duplicates_in_pool"] == 42 and m["summary"]["n_pool"] == len(POOL)
    texts = [(r["prompt"], r["response"]) for r in map(json.loads, (tmp_path / "dup" / "selected.jsonl").read_text().splitlines())]
    assert len(set(texts)) == len(texts) == 4
    # the same selection as on the pool without the copies (bm25's statistics too)
    assert main(sel(tiny_model_dir, tmp_path / "clean", files["domain"], files["pool"], n=4)) == 0
    for f in ("selected.jsonl", "scores.jsonl"):
        assert (tmp_path / "dup" / f).read_bytes() == (tmp_path / "clean" / f).read_bytes()
    # an --n larger than the distinct records is refused in one line
    one_line(main(sel(tiny_model_dir, tmp_path / "big-n", files["domain"], dup, n=7)), capsys.readouterr().err, "--n 7 is larger than the pool", "42")


# ----------------------------------------------------------------- 9: kill -9 just after the manifest, or during the load


_KILL_AFTER = """
import os, signal, sys
from ntkselect import pipeline
write = pipeline.write_selection
def then_die(*a, **k):
    r = write(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # the manifest is written, work/ not yet removed
pipeline.write_selection = then_die
from ntkselect.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_9_kill_9_just_after_the_manifest_or_during_the_load_leaves_nothing_for_good(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = sel(tiny_model_dir, out, files["domain"], files["pool"])
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER, *args], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and (out / "manifest.json").exists() and (out / "work").exists()
    one_line(main(args), capsys.readouterr().err, "already holds a finished run")  # refused, but its leftovers are cleared
    assert not (out / "work").exists() and not (out / runfolder.LOCK).exists()
    assert main(["report", str(out)]) == 0
    # kill -9 during the load: the temporary store is inside --out (never beside it) and the next run sweeps it
    pool = _pool_big(tmp_path / "big.jsonl")
    out2 = tmp_path / "run2"
    p = _start_load(files, tiny_model_dir, out2, pool)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not any(x.name.startswith(".ntkpool-") for x in tmp_path.iterdir())
    capsys.readouterr()
    assert main(sel(tiny_model_dir, out2, files["domain"], files["pool"])) == 0
    printed = capsys.readouterr().out
    assert "removed 1 temporary file(s) of an interrupted run" in printed and "took over the lock" in printed
    assert not any(x.name.startswith(".ntkpool-") for x in out2.iterdir())


def test_9_a_killed_run_whose_forked_workers_linger_does_not_keep_the_lock(tmp_path, capsys):
    code = (
        "import os, sys, time\nfrom ntkselect.runs.folder import SELECT, open_run\n"
        "with open_run(sys.argv[1], SELECT, log=lambda _: None):\n"
        "    if os.fork() == 0:\n        time.sleep(60); os._exit(0)\n"  # a worker that outlives its driver
        "    os._exit(9)\n"  # the driver dies without releasing anything (as with kill -9)
    )
    out = tmp_path / "run"
    assert subprocess.run([sys.executable, "-c", code, str(out)]).returncode == 9
    lines: list[str] = []
    with runfolder.open_run(out, runfolder.SELECT, log=lines.append):  # not refused: the lingering child closed its copy of the lock
        pass
    assert any("took over the lock" in x for x in lines)


def _orphan_holder(out: Path, hold: float) -> None:
    """A run that dies (exit 9) leaving a forked worker that keeps its copy of the lock for
    ``hold`` seconds before closing it: a worker not yet scheduled after the fork, or slow to die."""
    code = (
        "import os, sys, time\nfrom ntkselect.runs import folder\n"
        "with folder.open_run(sys.argv[1], folder.SELECT, log=lambda _: None):\n"
        "    fds = list(folder._HELD); folder._HELD.clear()\n"  # so that the child keeps its copy
        "    if os.fork() == 0:\n"
        "        time.sleep(float(sys.argv[2])); [os.close(f) for f in fds]; time.sleep(5); os._exit(0)\n"
        "    os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(out), str(hold)]).returncode == 9


def test_9_a_dead_runs_lock_still_held_by_its_worker_for_a_moment_is_waited_for(tmp_path):
    out = tmp_path / "run"
    _orphan_holder(out, hold=1.5)
    lines: list[str] = []
    t0 = time.monotonic()
    with runfolder.open_run(out, runfolder.SELECT, log=lines.append):
        pass
    assert time.monotonic() - t0 >= 1.0 and any("took over the lock" in x for x in lines)


def test_9_a_dead_runs_lock_held_longer_than_the_grace_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder, "ORPHAN_GRACE", 0.5)
    out = tmp_path / "run"
    _orphan_holder(out, hold=10)
    with pytest.raises(NtkSelectError, match="is in use by another ntkselect run"):
        with runfolder.open_run(out, runfolder.SELECT, log=lambda _: None):
            pass


def test_9_without_flock_another_hosts_lock_is_stale_once_its_heartbeat_is_old(tmp_path, monkeypatch):
    import fcntl

    def no_flock(*a):
        raise OSError(38, "no flock")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    out.mkdir()
    lock = out / runfolder.LOCK
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "start": "1", "time": time.time(), "command": "select"}))
    with pytest.raises(runfolder.NtkSelectError, match="in use by another ntkselect run .*on elsewhere"):
        with runfolder.open_run(out, runfolder.SELECT, log=lambda _: None):
            pass
    old = time.time() - runfolder.STALE_AFTER - 5
    os.utime(lock, (old, old))  # no heartbeat for longer than STALE_AFTER
    lines: list[str] = []
    with runfolder.open_run(out, runfolder.SELECT, log=lines.append):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    assert lines == ["ntkselect: took over the lock of an ntkselect run that is no longer running (pid 4242) on elsewhere"]


# ----------------------------------------------------------------- 10: --out on another file system


def test_10_out_on_another_file_system_than_its_parent(files, tiny_model_dir, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm on another file system")
    target = Path(shm / f"ntkselect-test-{os.getpid()}")
    try:
        (tmp_path / "run").symlink_to(target, target_is_directory=True)
        target.mkdir()
        assert main(sel(tiny_model_dir, tmp_path / "run", files["domain"], files["pool"])) == 0
        assert (target / "manifest.json").exists() and not (target / "work").exists()
        assert main(sel(tiny_model_dir, tmp_path / "run", files["domain"], files["pool"], "--overwrite")) == 0
    finally:
        shutil.rmtree(target, ignore_errors=True)


# ----------------------------------------------------------------- 11: unclear messages


def test_11_messages_name_the_line_the_shape_and_the_flags(files, tiny_model_dir, tmp_path, capsys):
    csv_path = tmp_path / "pool.csv"
    csv_path.write_bytes(b"prompt,response\nfine,ok\nalso fine,\xff\xfe bad\n")
    rc = main(sel(tiny_model_dir, tmp_path / "a", files["domain"], csv_path))
    one_line(rc, capsys.readouterr().err, f"{csv_path} line 3: not UTF-8", "column 2 ('response')")
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    line = one_line(main(sel(tiny_model_dir, tmp_path / "b", files["domain"], one)), capsys.readouterr().err, "holds a single record", "wrap it in [ ]")
    assert "'role'" not in line
    from ntkselect.data.demo import build_eval_data
    from ntkselect.errors import NtkSelectError

    with pytest.raises(NtkSelectError, match="^--n-train must be a non-negative integer"):
        build_eval_data(tmp_path / "e", n_train=-1)
    with pytest.raises(NtkSelectError, match="^--pool-gsm8k needs --gsm8k"):
        build_eval_data(tmp_path / "e", n_pool_gsm8k=3)


# ----------------------------------------------------------------- 12: /dev/stdin from a file


def test_12_dev_stdin_redirected_from_a_file_works(files, tiny_model_dir, tmp_path):
    args = sel(tiny_model_dir, tmp_path / "stdin", files["domain"], "/dev/stdin")
    with open(files["pool"], "rb") as f:
        proc = subprocess.run([sys.executable, "-m", "ntkselect", *args], stdin=f, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert main(sel(tiny_model_dir, tmp_path / "file", files["domain"], files["pool"])) == 0
    for f in RESULTS:
        assert (tmp_path / "stdin" / f).read_bytes() == (tmp_path / "file" / f).read_bytes()


# ----------------------------------------------------------------- 13: a 16 MB record


def _long_cases() -> dict[str, dict]:
    import random

    rng = random.Random(13)
    words = ["heart", "kidney", "the", "of", "patient", "ü", "日本語", "12345", "naïve", "\n", "  "]
    prose = " ".join(rng.choice(words) for _ in range(6000))  # ~30K characters of mixed scripts and whitespace
    word = "a" * 20_000  # one pre-token: byte-pair merges run across the whole word
    return {
        "text": {"text": prose},
        "one long word": {"text": word + " end"},
        "long prompt": {"prompt": prose, "response": "The answer is 4."},
        "long response": {"prompt": "Tell me.", "response": prose},
        "both long": {"prompt": prose, "response": prose[::-1]},
        "long word in the prompt": {"prompt": "x " + word, "response": "ok"},
        "instruction and input": {"instruction": "Summarise.", "input": prose, "output": "Short."},
        "messages": {
            "messages": [
                {"role": "system", "content": prose[:9000]},
                {"role": "user", "content": prose},
                {"role": "assistant", "content": "First answer."},
                {"role": "user", "content": prose[::-1]},
                {"role": "assistant", "content": prose},
            ]
        },
    }


@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("max_length", [32, 200])
def test_13_a_long_record_keeps_the_tokens_of_whole_tokenisation(tokenizer, template, max_length):
    from ntkselect.data.records import tokenize_batch, tokenize_record

    for name, raw in _long_cases().items():
        if template == "plain" and "messages" in raw:
            continue
        rec = Record(id=name, raw=raw, path="pool.jsonl", line=1)
        whole = tokenize_record(rec, tokenizer, max_length, template, _whole=True)  # the old path: tokenise everything, then truncate
        assert whole.truncated, name
        assert tokenize_record(rec, tokenizer, max_length, template) == whole, name
        short = Record(id="s", raw={"prompt": "hi", "response": "there"}, path="pool.jsonl", line=2)
        assert tokenize_batch([short, rec, short], tokenizer, max_length, template)[1] == whole, name


_RSS = """
import resource, sys
from ntkselect.data.records import Record, tokenize_records
from ntkselect.model.loading import load_tokenizer
tok = load_tokenizer(None)
big = ("heart kidney the patient 12345 " * 600_000)[:16_000_000]
recs = [Record(id=str(i), raw=raw, path="pool.jsonl", line=i + 1)
        for i, raw in enumerate([{"text": big}, {"prompt": big, "response": "4"}, {"prompt": "Q?", "response": big}, {"prompt": "hi", "response": "there"}])]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ex, stats = tokenize_records(recs, tok, 320, sys.argv[1])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024, stats.truncated)
"""


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_13_a_16_mb_record_costs_memory_bounded_by_max_length(template):
    # before: the record was tokenised whole (ids and character offsets of ~3.2M tokens), 2.4-3.1 GB above the baseline
    proc = subprocess.run([sys.executable, "-c", _RSS, template], capture_output=True, text=True, check=True)
    growth_mb, truncated = map(int, proc.stdout.split())
    assert truncated == 3 and growth_mb < 300, proc.stdout
