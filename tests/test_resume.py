"""Sharded runs: shard size does not change the result, a run killed with SIGKILL resumes to
the same selection, and a run folder never mixes two setups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_outputs, sharded_args
from ntkselect.cli.main import main


def test_shard_size_does_not_change_the_selection(big, tiny_model_dir, tmp_path):
    for name, size in (("one", 4096), ("many", 5)):
        assert main([str(a) for a in sharded_args(big, tiny_model_dir, tmp_path / name, "--shard-size", size)]) == 0
    ids = {n: [json.loads(x)["id"] for x in (tmp_path / n / "selected.jsonl").read_text().splitlines()] for n in ("one", "many")}
    assert ids["one"] == ids["many"]
    s = {n: [json.loads(x)["score"] for x in (tmp_path / n / "scores.jsonl").read_text().splitlines()] for n in ("one", "many")}
    assert s["one"] == pytest.approx(s["many"], rel=1e-5)
    m = json.loads((tmp_path / "many" / "manifest.json").read_text())
    assert m["execution"]["pool_shards"] == 20 and not (tmp_path / "many" / "work").exists()  # shards are dropped once the manifest vouches
    log = [json.loads(x) for x in (tmp_path / "many" / "shards.jsonl").read_text().splitlines()]
    done = [r for r in log if r["event"] == "shard_done"]
    assert {r["stage"] for r in done} == {"stage1", "stage2"} and all(r["seconds"] >= 0 and r["tokens"] > 0 for r in done)
    assert sum(r["examples"] for r in done if r["stage"] == "stage1") == 96


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_result(big, tiny_model_dir, tmp_path):
    ref = tmp_path / "ref"
    assert main([str(a) for a in sharded_args(big, tiny_model_dir, ref, "--shard-size", 2)]) == 0
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "ntkselect", *map(str, sharded_args(big, tiny_model_dir, out, "--shard-size", 2))]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "shards.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count('"shard_done"') >= 5:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()
    before = log.read_text().count('"shard_done"')
    assert main([str(a) for a in sharded_args(big, tiny_model_dir, out, "--shard-size", 2)]) == 0
    events = [json.loads(x) for x in log.read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed and resumed[0]["shards_done"] >= 5
    assert sum(e["event"] == "shard_done" for e in events) - before == 48 + 12 - resumed[0]["shards_done"] - sum(
        e["shards_done"] for e in resumed[1:]
    )  # only the missing shards were computed again
    m = json.loads((out / "manifest.json").read_text())
    assert m["execution"]["resumed"]["warmup"] is True
    assert run_outputs(out) == run_outputs(ref)  # byte for byte


def test_a_run_folder_never_mixes_setups(big, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [str(a) for a in sharded_args(big, tiny_model_dir, out, "--shard-size", 8)]
    assert main(args) == 0
    (out / "manifest.json").unlink()  # as if it had died just before the end: an unfinished run
    capsys.readouterr()
    assert main(args[:-2] + ["--seed", "3"] + args[-2:]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different setup (changed: seed)" in err and "--overwrite" in err
    dom, pool = big
    changed = tmp_path / "pool2.jsonl"
    changed.write_text(Path(pool).read_text().replace("Item 5:", "Item five:"))
    assert main([a if a != str(pool) else str(changed) for a in args]) == 2
    assert "changed: pool, pool contents" in capsys.readouterr().err
    # execution-only options may change when resuming; --overwrite starts over
    assert main(args[:-2] + ["--shard-size", "16", "--batch-size", "2"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert main(args[:-2] + ["--seed", "3", "--overwrite"] + args[-2:]) == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
