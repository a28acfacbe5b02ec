"""Run folders never lose a file ntkselect did not create (issue 14), through the CLI.

* entries that ntkselect's record does not list as the command's own are refused, not deleted;
* inputs that live where outputs go are refused;
* --overwrite writes the new run aside and swaps it in only once it has succeeded (a failed,
  mistyped or interrupted replacement leaves the old run byte-identical; a crash inside the
  swap is completed by the next run);
* one run per folder: a lock with pid and host, stale locks of dead processes taken over;
* temporary files of interrupted runs are swept, and nothing else.
Every command that writes a folder is covered: select, evaluate, diagnose, report, eval-data, demo."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ntkselect.cli.main import main
from ntkselect.runs import folder as runfolder

DOMAIN = [
    {"id": f"d{i}", "question": f"What should a doctor know about {t}?", "answer": f"Facts about {t} matter in the clinic."}
    for i, t in enumerate(["blood pressure", "the kidney", "a fracture", "insulin"])
]
POOL = [
    {"id": f"p{i}", "prompt": f"Question {i}: tell me about {w}.", "response": f"{w.capitalize()} is topic {i}."}
    for i, w in enumerate(["algebra", "a contract", "primes", "torts", "integrals", "fever", "vectors", "asthma"])
]
WORDS = ["heart", "kidney", "liver", "lung", "contract", "court", "prime", "vector", "river", "poem", "engine", "virus"]
RESULTS = ("selected.jsonl", "scores.jsonl", "train.jsonl")


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rf")
    big = [
        {
            "id": f"p{i}",
            "prompt": f"Item {i}: explain the {WORDS[i % len(WORDS)]} in {1 + i % 5} sentences.",
            "response": f"The {WORDS[(i * 7) % len(WORDS)]} is item {i}." + " More." * (i % 4),
        }
        for i in range(96)
    ]
    return {"domain": write_jsonl(d / "domain.jsonl", DOMAIN), "pool": write_jsonl(d / "pool.jsonl", POOL), "big": write_jsonl(d / "big.jsonl", big)}


def sel(files, model, out, *extra, domain=None, pool=None, n=2):
    return [
        "select",
        "--domain",
        str(domain or files["domain"]),
        "--pool",
        str(pool or files["pool"]),
        "--n",
        str(n),
        "--out",
        str(out),
        "--model",
        str(model),
        "--warmup-epochs",
        "0",
        "--precision",
        "float32",
        "--knn-k",
        "2",
        "--threads",
        "1",
        *map(str, extra),
    ]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) with its bytes (None for a folder)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def results(out: Path) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for f in RESULTS}


def one_line_error(rc: int, err: str, *expect: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("ntkselect: error: "), err
    for s in expect:
        assert s in lines[0], (s, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- what is not ours


@pytest.mark.parametrize(
    "theirs, them", [(("work/keep.txt", "adapter/a.bin"), "them"), (("selected.jsonl",), "it"), (("run.json",), "it"), (("manifest.json", "notes.md"), "it")]
)
def test_select_refuses_a_folder_holding_files_it_did_not_create(theirs, them, files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    for rel in theirs:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"the user's own " + rel.encode())
    before = snapshot(out)
    for extra in ((), ("--overwrite",)):
        rc = main(sel(files, tiny_model_dir, out, *extra))
        line = one_line_error(rc, capsys.readouterr().err, str(out), "not by ntkselect", f"move {them} away")
        assert theirs[0].split("/")[0] in line
        assert snapshot(out) == before  # byte-identical, and nothing added (no lock, no record)


def test_a_users_file_next_to_a_run_survives_resume_overwrite_and_the_swap(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.md").write_text("my notes")
    (out / "data").mkdir()
    (out / "data" / "x.jsonl").write_text("{}\n")
    assert main(sel(files, tiny_model_dir, out, "--method", "random")) == 0
    assert main(sel(files, tiny_model_dir, out, "--method", "random", "--seed", 4, "--overwrite")) == 0
    assert (out / "notes.md").read_text() == "my notes" and (out / "data" / "x.jsonl").read_text() == "{}\n"
    assert json.loads((out / "manifest.json").read_text())["seed"] == 4
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [runfolder.RECORD]  # no lock, no staging left behind
    rec = json.loads((out / runfolder.RECORD).read_text())["entries"]
    assert "notes.md" not in rec and "data" not in rec and rec["manifest.json"] == "select"


def test_another_commands_output_is_not_ours_either(files, tiny_model_dir, tmp_path, capsys):
    """An evaluate folder holds a manifest.json too: select into it is refused, not merged."""
    out = tmp_path / "ev"
    out.mkdir()
    (out / runfolder.RECORD).write_text(json.dumps({"tool": "ntkselect", "entries": {"manifest.json": "evaluate"}}))
    (out / "manifest.json").write_text('{"command": "evaluate"}')
    before = snapshot(out)
    one_line_error(main(sel(files, tiny_model_dir, out, "--overwrite")), capsys.readouterr().err, "manifest.json", "by `ntkselect evaluate`")
    assert snapshot(out) == before


# --------------------------------------------------------------------------- inputs where outputs go


def test_an_input_named_like_an_output_in_out_is_refused(files, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    pool = write_jsonl(data / "train.jsonl", POOL)
    domain = write_jsonl(data / "domain.jsonl", DOMAIN)
    before = snapshot(data)
    rc = main(sel(files, tiny_model_dir, data, domain=domain, pool=pool))
    one_line_error(rc, capsys.readouterr().err, f"--pool {pool}", "where this run writes train.jsonl", "choose another --out")
    assert snapshot(data) == before


@pytest.mark.parametrize("where", ["manifest.json", "work/d.jsonl", "adapter/d.jsonl", ".ntkselect-next-select/d.jsonl"])
def test_the_domain_inside_any_output_path_is_refused(where, files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    domain = write_jsonl(out / where, DOMAIN)
    before = snapshot(out)
    one_line_error(main(sel(files, tiny_model_dir, out, domain=domain)), capsys.readouterr().err, "--domain", "where this run writes")
    assert snapshot(out) == before


def test_out_inside_a_dataset_folder_input_or_the_model_is_refused(files, tiny_model_dir, tmp_path, capsys):
    import datasets

    hf = tmp_path / "pool_hf"
    datasets.Dataset.from_list(POOL).save_to_disk(str(hf))
    capsys.readouterr()  # the progress bar of save_to_disk
    before = snapshot(hf)
    one_line_error(main(sel(files, tiny_model_dir, hf / "run", pool=hf)), capsys.readouterr().err, "is inside --pool", "outside it")
    one_line_error(main(sel(files, tiny_model_dir, hf, pool=hf)), capsys.readouterr().err, "is inside --pool")
    assert snapshot(hf) == before
    model_before = snapshot(Path(tiny_model_dir))
    one_line_error(main(sel(files, tiny_model_dir, Path(tiny_model_dir) / "runs")), capsys.readouterr().err, "is inside --model")
    assert snapshot(Path(tiny_model_dir)) == model_before


def test_out_that_is_a_file_is_refused(files, tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("a file")
    one_line_error(main(sel(files, tiny_model_dir, f)), capsys.readouterr().err, "is a file, not a folder")
    assert f.read_text() == "a file"


# --------------------------------------------------------------------------- --overwrite swaps, it does not delete first


@pytest.fixture()
def finished(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sel(files, tiny_model_dir, out)) == 0
    capsys.readouterr()
    return out, snapshot(out)


@pytest.mark.parametrize(
    "bad", [("--lora-target-modules", "q_prj"), ("--lora-r", "100000"), ("--warmup-lr", "nan"), ("--device", "cuda:7"), ("--preselect-factor", "inf")]
)
def test_overwrite_with_a_bad_flag_keeps_the_finished_run(bad, finished, files, tiny_model_dir, capsys):
    out, before = finished
    rc = main(sel(files, tiny_model_dir, out, "--overwrite", *bad))
    one_line_error(rc, capsys.readouterr().err, bad[0])
    assert snapshot(out) == before


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_a_failed_or_interrupted_replacement_keeps_the_old_run_and_resumes(how, finished, files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from ntkselect.errors import NtkSelectError
    from ntkselect.selection.ntk.selector import NtkSelector

    out, before = finished
    real = NtkSelector.rank

    def boom(self, ctx, n):
        real(self, ctx, n)  # all the work is done, then the run fails
        raise NtkSelectError("planted failure") if how == "error" else KeyboardInterrupt()

    monkeypatch.setattr(NtkSelector, "rank", boom)
    rc = main(sel(files, tiny_model_dir, out, "--overwrite", "--seed", 7))
    assert rc == (2 if how == "error" else 130)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    visible = {k: v for k, v in snapshot(out).items() if not k.startswith(".ntkselect")}
    assert visible == {k: v for k, v in before.items() if not k.startswith(".ntkselect")}  # the old run, byte for byte
    if how == "error":
        assert snapshot(out) == before  # and the record too: the failed attempt is gone
    assert (out / ".ntkselect-next-select").exists() == (how == "interrupt")
    monkeypatch.undo()
    assert main(sel(files, tiny_model_dir, out, "--overwrite", "--seed", 7)) == 0
    printed = capsys.readouterr().out
    assert ("resuming the new run aside" if how == "interrupt" else "writing the new run aside") in printed
    ref = tmp_path / "ref"
    assert main(sel(files, tiny_model_dir, ref, "--seed", 7)) == 0
    assert results(out) == results(ref)  # the same bytes as an uninterrupted run
    assert json.loads((out / "manifest.json").read_text())["seed"] == 7 and not (out / ".ntkselect-next-select").exists()


def test_a_crash_at_any_point_of_the_swap_is_completed_by_the_next_run(files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The process dies after k moves of the swap, for every k (and just before the swap): the
    next command completes it; the folder then holds exactly the new run, and the user's file
    is never touched."""
    import shutil

    ref = tmp_path / "ref"
    assert main(sel(files, tiny_model_dir, ref, "--method", "random", "--seed", 3)) == 0
    want = results(ref)
    base = tmp_path / "base"
    base.mkdir()
    (base / "mine.txt").write_text("mine")
    assert main(sel(files, tiny_model_dir, base, "--method", "random")) == 0
    real_replace = os.replace
    for k in range(-1, 40):
        out = tmp_path / f"run{k}"
        shutil.copytree(base, out)
        calls = {"n": 0}

        def flaky(a, b, *rest, k=k, calls=calls):
            swap = os.path.dirname(a) != os.path.dirname(b) and ".ntkselect-" in str(a) + str(b)
            if swap and os.path.basename(b) != "pool":  # a move of the swap (not the tokenised pool moving into the new run)
                calls["n"] += 1
                if calls["n"] > k:
                    raise KeyboardInterrupt  # the process dies here
            return real_replace(a, b, *rest)

        if k == -1:  # the new run had finished aside, the swap had not begun
            monkeypatch.setattr(runfolder.Run, "commit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
        else:
            monkeypatch.setattr(runfolder.os, "replace", flaky)
        rc = main(sel(files, tiny_model_dir, out, "--method", "random", "--seed", 3, "--overwrite"))
        monkeypatch.undo()
        if rc == 0:
            assert results(out) == want
            break
        assert rc == 130 and (out / "mine.txt").read_text() == "mine"
        # the next command (here a plain rerun of the old setup) first completes the swap
        rc = main(sel(files, tiny_model_dir, out, "--method", "random"))
        assert rc == 2 and "already holds a finished run" in capsys.readouterr().err
        assert results(out) == want and json.loads((out / "manifest.json").read_text())["seed"] == 3
        assert (out / "mine.txt").read_text() == "mine"
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [runfolder.RECORD]
    assert k >= 10  # every move of the swap was a crash point (the old entries aside, the new ones in)


# --------------------------------------------------------------------------- the lock


def _holder(out: Path) -> subprocess.Popen:
    code = (
        "import sys, time\nfrom ntkselect.runs.folder import SELECT, open_run\n"
        "with open_run(sys.argv[1], SELECT, log=lambda _: None):\n    print('locked', flush=True)\n    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_live_run_is_refused_in_one_line(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        before = snapshot(out)
        line = one_line_error(
            main(sel(files, tiny_model_dir, out)),
            capsys.readouterr().err,
            "is in use by another ntkselect run",
            f"pid {holder.pid} on {socket.gethostname()}",
            "`ntkselect select`",
            "wait for it",
        )
        assert "choose another --out" in line
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(sel(files, tiny_model_dir, out)) == 0  # the kernel dropped the dead holder's lock


def test_two_select_processes_into_one_out(files, tiny_model_dir, tmp_path, capsys):
    """A real race: the second run refuses in one line; the first finishes; no work/ is left."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = sel(files, tiny_model_dir, out, "--shard-size", 1, "--batch-size", 1, "--warmup-epochs", 1, pool=files["big"], n=4)
    first = subprocess.Popen([sys.executable, "-m", "ntkselect", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / runfolder.LOCK).exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    rc = main(args)
    err = capsys.readouterr().err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    if "already holds a finished run" not in err:  # (on a very fast machine the first may be done already)
        one_line_error(rc, err, "is in use by another ntkselect run", f"pid {first.pid}")
    assert not (out / "work").exists() and not (out / runfolder.LOCK).exists()
    assert main(sel(files, tiny_model_dir, ref, "--shard-size", 1, "--batch-size", 1, "--warmup-epochs", 1, pool=files["big"], n=4)) == 0
    assert results(out) == results(ref)


def test_a_lock_left_by_a_killed_run_is_stale(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = sel(files, tiny_model_dir, out, "--shard-size", 1, "--batch-size", 1, "--warmup-epochs", 1, pool=files["big"], n=4)
    proc = subprocess.Popen([sys.executable, "-m", "ntkselect", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "shards.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert json.loads((out / runfolder.LOCK).read_text())["pid"] == proc.pid  # left behind
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"took over the lock of an ntkselect run that is no longer running (pid {proc.pid})" in printed and "resuming" in printed
    assert not (out / runfolder.LOCK).exists()


def test_without_flock_the_pid_decides(files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import fcntl

    def no_flock(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = {"pid": sleeper.pid, "host": socket.gethostname(), "start": runfolder._proc_start(sleeper.pid), "time": time.time(), "command": "select"}
        (out / runfolder.LOCK).write_text(json.dumps(live))
        one_line_error(main(sel(files, tiny_model_dir, out)), capsys.readouterr().err, f"pid {sleeper.pid}", "in use")
        other_host = {**live, "host": "elsewhere"}
        (out / runfolder.LOCK).write_text(json.dumps(other_host))
        one_line_error(main(sel(files, tiny_model_dir, out)), capsys.readouterr().err, "on elsewhere", f"delete {out / runfolder.LOCK}")
        reused = {**live, "start": "1"}  # the same pid, but another process (started at another time)
        (out / runfolder.LOCK).write_text(json.dumps(reused))
        assert main(sel(files, tiny_model_dir, out)) == 0
    finally:
        sleeper.kill()
        sleeper.wait()


# --------------------------------------------------------------------------- temporary files


def test_temporary_files_of_an_interrupted_run_are_swept_and_nothing_else(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sel(files, tiny_model_dir, out)) == 0
    (out / "manifest.json").unlink()  # an unfinished run, with the litter of a crash
    ours = [
        ".selected.jsonl.a1b2c3d4.tmp",
        ".manifest.json.zz_9y8x7.tmp",
        ".adapter-k3j4h5g6/adapter_model.safetensors",
        ".adapter.old/x",
        "adapter/.adapter_config.json.abcdefgh.tmp",
        "..ntkselect.json.12345678.tmp",
    ]
    theirs = [".notes.tmp", ".selected.jsonl.tmp", ".my-data.abcdefgh.tmp", ".adapter-mine/x", "tmp/.selected.jsonl.a1b2c3d4.tmp"]
    for rel in ours + theirs:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")
    capsys.readouterr()
    assert main(sel(files, tiny_model_dir, out)) == 0
    assert "removed 6 temporary file(s) of an interrupted run" in capsys.readouterr().out
    assert not any((out / rel.split("/")[0]).exists() for rel in ours if not rel.startswith("adapter/"))
    assert not (out / "adapter" / ".adapter_config.json.abcdefgh.tmp").exists()
    assert all((out / rel).read_text() == "x" for rel in theirs)


# --------------------------------------------------------------------------- the other commands


def _eval_files(tmp_path):
    q = lambda i, t: {"id": f"{t}{i}", "prompt": f"About {t} {i}?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:", "response": "A. yes", "answer": "A"}  # noqa: E731
    p = {
        "train": write_jsonl(tmp_path / "in" / "train.jsonl", [q(i, "heart") for i in range(4)]),
        "test": write_jsonl(tmp_path / "in" / "test.jsonl", [{**q(i, "heart"), "options": ["A", "B", "C", "D"]} for i in range(4, 7)]),
        "pool": write_jsonl(tmp_path / "in" / "pool.jsonl", [{"prompt": f"Tell me about {w}.", "response": f"{w} fact."} for w in WORDS]),
    }
    return p


def ev(p, model, out, *extra):
    return [
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
            2,
            "--out",
            out,
            "--model",
            model,
            "--seeds",
            1,
            "--methods",
            "domain-only,random",
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
            *extra,
        ]
    ]


def test_evaluate_keeps_the_users_files_and_swaps_on_overwrite(tiny_model_dir, tmp_path, capsys):
    p = _eval_files(tmp_path)
    out = tmp_path / "ev"
    (out / "cells").mkdir(parents=True)
    (out / "cells" / "mine.json").write_text("{}")
    before = snapshot(out)
    one_line_error(main(ev(p, tiny_model_dir, out)), capsys.readouterr().err, "cells/", "not by ntkselect")
    assert snapshot(out) == before
    inside = dict(p, pool=write_jsonl(tmp_path / "ev3" / "cells" / "pool.jsonl", POOL))
    one_line_error(main(ev(inside, tiny_model_dir, tmp_path / "ev3")), capsys.readouterr().err, "--pool", "where this run writes cells")
    out2 = tmp_path / "ev2"
    assert main(ev(p, tiny_model_dir, out2)) == 0
    capsys.readouterr()
    first = snapshot(out2)
    one_line_error(main(ev(p, tiny_model_dir, out2, "--ft-lr", "nan", "--overwrite")), capsys.readouterr().err, "--ft-lr")
    assert snapshot(out2) == first
    assert main(ev(p, tiny_model_dir, out2, "--ft-lr", "1e-3", "--overwrite")) == 0
    assert "writing the new evaluation aside" in capsys.readouterr().out
    assert json.loads((out2 / "manifest.json").read_text())["config"]["ft_lr"] == 1e-3
    assert sorted(p.name for p in out2.iterdir() if p.name.startswith(".")) == [runfolder.RECORD]


def test_diagnose_refuses_a_users_checkpoints_folder(tiny_model_dir, files, tmp_path, capsys):
    out = tmp_path / "diag"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "my-model.bin").write_bytes(b"weights")
    before = snapshot(out)
    rc = main(
        [
            "diagnose",
            "--domain",
            str(files["domain"]),
            "--pool",
            str(files["pool"]),
            "--out",
            str(out),
            "--model",
            tiny_model_dir,
            "--n-test",
            "0",
            "--epochs",
            "1",
        ]
    )
    one_line_error(rc, capsys.readouterr().err, "checkpoints/", "not by ntkselect")
    assert snapshot(out) == before


def test_report_refuses_a_report_html_it_did_not_write(files, tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(sel(files, tiny_model_dir, out, "--method", "random")) == 0
    (out / "report.html").write_text("<p>my own page</p>")
    one_line_error(main(["report", str(out)]), capsys.readouterr().err, "report.html", "not by ntkselect")
    assert (out / "report.html").read_text() == "<p>my own page</p>"
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and main(["report", str(out)]) == 0  # ours now: replaced
    assert json.loads((out / runfolder.RECORD).read_text())["entries"]["report.html"] == "select"


def test_eval_data_and_demo_refuse_the_users_files(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "split"
    write_jsonl(out / "pool.jsonl", POOL)
    before = snapshot(out)
    one_line_error(
        main(["eval-data", "--out", str(out), "--n-train", "5", "--n-test", "5", "--pool-mmlu", "5", "--pool-reasoning", "0"]),
        capsys.readouterr().err,
        "pool.jsonl",
        "not by ntkselect",
    )
    assert snapshot(out) == before
    gsm = write_jsonl(tmp_path / "g" / "pool.jsonl", [{"question": "1+1?", "answer": "2"}])
    one_line_error(
        main(["eval-data", "--out", str(gsm.parent), "--gsm8k", str(gsm), "--pool-gsm8k", "1", "--n-train", "5", "--n-test", "5"]),
        capsys.readouterr().err,
        "--gsm8k",
        "where this run writes pool.jsonl",
    )
    demo = tmp_path / "demo"
    write_jsonl(demo / "data" / "domain.jsonl", DOMAIN)
    before = snapshot(demo)
    one_line_error(
        main(
            [
                "demo",
                "--model",
                tiny_model_dir,
                "--out",
                str(demo),
                "--domain-size",
                "4",
                "--pool-mmlu",
                "8",
                "--pool-reasoning",
                "0",
                "--n",
                "2",
                "--warmup-epochs",
                "0",
            ]
        ),
        capsys.readouterr().err,
        "domain.jsonl",
        "not by ntkselect",
    )
    assert snapshot(demo) == before


_SAVE = """
import sys
sys.path.insert(0, sys.argv[2])
from helpers import tiny_lora_model
from ntkselect.model.adapters import save_adapter
save_adapter(tiny_lora_model("llama"), sys.argv[1])
"""


def test_the_adapter_has_the_same_bytes_whatever_the_string_hash_seed(tmp_path):
    # peft writes target_modules in a set's order, which follows PYTHONHASHSEED: the demo's adapter_config.json
    # differed between two runs of the same selection (issue 24's before/after check) until save_adapter sorted it
    tests = str(Path(__file__).parent)
    got = set()
    for seed in ("1", "2", "3", "4", "5"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path / seed), tests], env=env, check=True)
        got.add((tmp_path / seed / "adapter_config.json").read_bytes() + (tmp_path / seed / "adapter_model.safetensors").read_bytes())
    assert len(got) == 1
    cfg = json.loads((tmp_path / "1" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(cfg["target_modules"]) and len(cfg["target_modules"]) > 1
