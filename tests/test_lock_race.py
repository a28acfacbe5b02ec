"""A refused run must not harm the live one (issue 23): the lock is the first thing a command
does in its --out, so a second `select` into a folder a live run owns exits with the one-line
message before it reads, reuses, moves or deletes anything there, and the live run finishes
with the selection a lone run makes.

* held at each stage (the pool pass, the warm-up, stage 1, stage 2, the write, the swap), the
  live run's folder is byte for byte the same before and after a second run is refused;
* two processes started at once, or a moment apart, race for the lock: one wins and finishes
  with the lone run's selection, the other is refused in one line;
* with --overwrite (the live run's token store under the staging folder) the same.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_big_data
from ntkselect.cli.main import main

RESULTS = ("selected.jsonl", "scores.jsonl", "train.jsonl")

# where the live run is held: (name, the module attribute wrapped so that it waits for the test first)
POINTS = (
    ("pool pass", "ntkselect.data.pool", "_accept"),
    ("warm-up", "ntkselect.selection.base", "warmup_or_resume"),
    ("stage 1", "ntkselect.selection.ntk.selector", "preselect"),
    ("stage 2", "ntkselect.selection.ntk.selector", "run_stage2"),
    ("write", "ntkselect.pipeline", "write_selection"),
    ("swap", "ntkselect.runs.folder.Run", "commit"),
)

# the live run: `ntkselect select ...` with each point wrapped to write ctl/at-K and wait for ctl/go-K
_HELD = """
import importlib, sys, time
from pathlib import Path
ctl = Path(sys.argv[1])
points = {points!r}

def hold(k, fn):
    def held(*a, **kw):
        if not (ctl / f"go-{{k}}").exists():
            (ctl / f"at-{{k}}").touch()
            while not (ctl / f"go-{{k}}").exists():
                time.sleep(0.01)
        return fn(*a, **kw)
    return held

for k, (_, mod, name) in enumerate(points):
    parts = mod.split(".")
    try:
        owner = importlib.import_module(mod)
    except ModuleNotFoundError:  # a class: module.Class
        owner = getattr(importlib.import_module(".".join(parts[:-1])), parts[-1])
    setattr(owner, name, hold(k, getattr(owner, name)))
from ntkselect.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return write_big_data(tmp_path_factory.mktemp("race"))


def args(big, model, out, *extra) -> list[str]:
    dom, pool = big
    return [
        "select",
        "--domain",
        str(dom),
        "--pool",
        str(pool),
        "--n",
        "6",
        "--out",
        str(out),
        "--model",
        str(model),
        "--warmup-epochs",
        "1",
        "--knn-k",
        "8",
        "--precision",
        "float32",
        "--threads",
        "1",
        "--batch-size",
        "4",
        "--shard-size",
        "16",
        *map(str, extra),
    ]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def results(out: Path) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for f in RESULTS}


def refused_in_one_line(rc: int, err: str, out: Path, where: str = "") -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, (where, err)
    assert lines[0].startswith(f"ntkselect: error: --out {out} is in use by another ntkselect run (pid "), err


@pytest.fixture(scope="module")
def lone(big, tiny_model_dir, tmp_path_factory):
    """The selection of a lone run."""
    out = tmp_path_factory.mktemp("lone") / "run"
    assert main(args(big, tiny_model_dir, out)) == 0
    return results(out)


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_a_run_refused_at_any_stage_leaves_the_live_run_untouched(overwrite, big, tiny_model_dir, lone, tmp_path, capsys):
    out, ctl = tmp_path / "run", tmp_path / "ctl"
    ctl.mkdir()
    extra = ()
    if overwrite:  # a finished run there first: the live run writes aside, its token store under the staging folder
        assert main(args(big, tiny_model_dir, out, "--seed", 1)) == 0
        extra = ("--overwrite",)
    capsys.readouterr()
    code = _HELD.format(points=POINTS)
    live = subprocess.Popen([sys.executable, "-c", code, str(ctl), *args(big, tiny_model_dir, out, *extra)], stderr=subprocess.PIPE, text=True)
    try:
        for k, (where, _, _) in enumerate(POINTS):
            deadline = time.time() + 300
            while not (ctl / f"at-{k}").exists():
                assert live.poll() is None and time.time() < deadline, f"the live run did not reach the {where}: {live.stderr.read() if live.stderr else ''}"
                time.sleep(0.01)
            before = snapshot(out)
            for second in (args(big, tiny_model_dir, out, *extra), args(big, tiny_model_dir, out, "--overwrite")):
                refused_in_one_line(main(second), capsys.readouterr().err, out, where)
                assert snapshot(out) == before, f"the refused run changed the live run's folder during the {where}"
            (ctl / f"go-{k}").touch()
        assert live.wait(timeout=300) == 0, live.stderr.read() if live.stderr else ""
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    assert results(out) == lone
    assert not (out / "work").exists() and not any(p.name.startswith((".ntkpool-", ".ntkselect-")) for p in out.iterdir())


@pytest.mark.parametrize("delay", [0.0, 2.0])
def test_two_processes_started_at_once_or_a_moment_apart(delay, big, tiny_model_dir, lone, tmp_path):
    """A real race, with no hooks: exactly one run finishes, with the lone run's selection; the
    other is refused in one line (or, if it came to the lock after the first had finished, told
    that the folder holds a finished run)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ntkselect", *args(big, tiny_model_dir, out)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in (first, second)]
    ok = [err for rc, err in done if rc == 0]
    bad = [(rc, err) for rc, err in done if rc != 0]
    assert len(ok) == 1 and len(bad) == 1, done
    rc, err = bad[0]
    if "already holds a finished run" not in err:
        refused_in_one_line(rc, err, out)
    assert results(out) == lone
