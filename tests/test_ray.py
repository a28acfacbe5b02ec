"""The Ray executor on a local Ray cluster started by the test (CPU only): the same results as
the local executor, also when a worker process is killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import run_outputs, sharded_args
from ntkselect.cli.main import main

ray = pytest.importorskip("ray", reason="the Ray executor needs the 'ray' extra (pip install 'ntkselect[ray]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    # Ray >= 2.5x turns on token authentication once a token exists in ~/.ray (any earlier `ray start`
    # on the machine leaves one), and then this test's driver and workers would need it too: a local
    # test cluster runs without, for the cluster and (through os.environ) every client of it
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    tmp = tmp_path_factory.mktemp("ray")
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
            f"--temp-dir={tmp}",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    yield f"127.0.0.1:{port}"
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)


def _ray_args(big, model, out, address):
    return [
        sys.executable,
        "-m",
        "ntkselect",
        *map(str, sharded_args(big, model, out, "--shard-size", 2, "--executor", "ray", "--ray-address", address, "--ray-workers", 2)),
    ]


@pytest.fixture(scope="module")
def reference(big, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    assert main([str(a) for a in sharded_args(big, tiny_model_dir, out, "--shard-size", 2)]) == 0
    return out


def test_ray_executor_gives_the_local_result(big, tiny_model_dir, tmp_path, cluster, reference):
    out = tmp_path / "ray"
    proc = subprocess.run(_ray_args(big, tiny_model_dir, out, cluster), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Ray executor with 2 CPU worker(s)" in proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["execution"]["executor"] == "ray"
    log = [json.loads(x) for x in (out / "shards.jsonl").read_text().splitlines()]
    assert {r["executor"] for r in log if r["event"] == "shard_done"} == {"ray"}
    assert run_outputs(out) == run_outputs(reference)


def test_a_worker_killed_mid_run_is_restarted_and_the_result_is_unchanged(big, tiny_model_dir, tmp_path, cluster, reference):
    out = tmp_path / "ray-kill"
    proc = subprocess.Popen(_ray_args(big, tiny_model_dir, out, cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []

    def killer():
        log = out / "shards.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and log.read_text().count('"shard_done"') >= 3:
                pids = subprocess.run(["pgrep", "-f", "ray::.*ShardWorker"], capture_output=True, text=True).stdout.split()
                if pids:
                    os.kill(int(pids[0]), signal.SIGKILL)
                    killed.append(int(pids[0]))
                    return
            time.sleep(0.01)

    t = threading.Thread(target=killer)
    t.start()
    stdout, stderr = proc.communicate(timeout=900)
    t.join()
    assert killed, "no worker was running to be killed"
    assert proc.returncode == 0, stderr[-2000:]
    assert run_outputs(out) == run_outputs(reference)


def test_the_drivers_gpu_is_named_as_the_node_names_it_and_left_out():
    from ntkselect.runs.executors.ray import driver_gpu, gpus_without

    assert driver_gpu(0, None) == "0" and driver_gpu(2, "") == "2"
    assert driver_gpu(1, "3,5,7") == "5"  # cuda:1 of a driver that sees GPUs 3, 5, 7 is GPU 5
    assert gpus_without(4, None, "0") == ["1", "2", "3"]
    assert gpus_without(3, "3,5,7", "5") == ["3", "7"]
    assert gpus_without(1, None, "0") == []
