"""Peak resident memory of each stage of a selection, next to the ``--dry-run`` estimate.

For each setting (the default flags, and a 4x larger token budget: ``--max-batch-tokens 32768
--batch-size 64``, since 16 examples of at most 512 tokens already cap a batch at 8,192 tokens)
it runs, each in a fresh process:

1. the dry run's estimate (:func:`ntkselect.runs.plan.estimate`): the predicted peak and the
   predicted peak of each stage;
2. the selection itself, with the stage boundaries marked (the model load with the preflight,
   the warm-up, stage 1, stage 2, writing the outputs) and the process's peak resident memory
   of each stage read from the kernel: ``VmHWM`` is reset at every boundary by writing 5 to
   ``/proc/self/clear_refs`` (where that is not allowed, a thread samples ``VmRSS`` every 20 ms).

It prints a table per setting (measured, estimated, error) and, last, one JSON line.

    # the default demo (SmolLM2-135M-Instruct, D = 100 MMLU medical questions, pool 800 + 200)
    python benchmarks/memory.py
    # any data and model, e.g. the tiny test model:
    python benchmarks/memory.py --domain d.jsonl --pool p.jsonl --n 8 --model /path/to/model
    # more settings: extra flags per setting, separated by ';'
    python benchmarks/memory.py --settings "; --max-batch-tokens 32768 --batch-size 64; --proj-dim 8192"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("load", "warm-up", "stage 1", "stage 2", "write")

_CHILD = r"""
import json, os, sys, threading, time
import ntkselect.selection.base as B, ntkselect.selection.less as L, ntkselect.selection.ntk.selector as N, ntkselect.runs.shards as H
from ntkselect.cli.main import build_parser, config_from_args
from ntkselect.pipeline import select

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

def can_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

RESET = can_reset()
peaks, seconds, cur, t0 = {}, {}, ["load"], [time.perf_counter()]
sampled = [0]

def sampler():
    while True:
        sampled[0] = max(sampled[0], status("VmRSS"))
        time.sleep(0.02)

if not RESET:
    threading.Thread(target=sampler, daemon=True).start()

def mark(stage):
    if stage == cur[0]:
        return
    peak = status("VmHWM") if RESET else max(sampled[0], status("VmRSS"))
    peaks[cur[0]] = max(peaks.get(cur[0], 0), peak)
    seconds[cur[0]] = seconds.get(cur[0], 0.0) + time.perf_counter() - t0[0]
    if RESET:
        can_reset()
    else:
        sampled[0] = status("VmRSS")
    cur[0], t0[0] = stage, time.perf_counter()

def wrap(fn, stage):
    def inner(*a, **k):
        mark(stage)
        return fn(*a, **k)
    return inner

# where each stage starts: the call sites in the selection code (the preflight calls the same
# stage functions from its own imports, and stays in "load")
B.warmup_or_resume = wrap(B.warmup_or_resume, "warm-up")
B.embed_sets = wrap(B.embed_sets, "stage 1")
N.run_stage2 = wrap(N.run_stage2, "stage 2")
L.projected_features = wrap(L.projected_features, "less")
for name, stage in (("embed", "stage 1"), ("score", "stage 2"), ("less", "less")):
    task = H.get_task(name)
    task.fn = wrap(task.fn, stage)
import ntkselect.pipeline as P
P.write_selection = wrap(P.write_selection, "write")

argv = json.loads(sys.argv[1])
cfg = config_from_args(build_parser().parse_args(argv))
select(cfg, log=lambda *a: None)
mark("done")
print("MEMORY-JSON " + json.dumps({"peaks": peaks, "seconds": seconds, "hwm_reset": RESET, "peak": status("VmHWM")}))
"""

_ESTIMATE = r"""
import json, sys
from ntkselect.cli.main import build_parser, config_from_args
from ntkselect.runs.plan import estimate
cfg = config_from_args(build_parser().parse_args(json.loads(sys.argv[1])))
plan = estimate(cfg)
m = plan["memory"]
print("PLAN-JSON " + json.dumps({"peak": m["peak"], "by_stage": m.get("by_stage", {}), "process": m["process"], "weights": m["weights"],
                                 "activations": m["activations"], "budget": m.get("budget"), "stages": [s["stage"] for s in plan["stages"]]}))
"""


def _run(code: str, argv: list[str], env: dict, timeout: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, env=env, timeout=timeout)
    tag = "MEMORY-JSON " if "MEMORY-JSON" in code else "PLAN-JSON "
    for line in proc.stdout.splitlines():
        if line.startswith(tag):
            return json.loads(line[len(tag) :])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise SystemExit(f"benchmarks/memory.py: the child process failed (exit {proc.returncode})")


def _mib(x) -> str:
    return f"{x / 2**20:,.0f}" if x else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", help="domain JSONL (default: the demo's, built with ntkselect.data.demo)")
    ap.add_argument("--pool", help="pool JSONL (default: the demo's)")
    ap.add_argument("--n", type=int, default=100, help="N (the demo: 100)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--settings", default="; --max-batch-tokens 32768 --batch-size 64", help="';'-separated extra select flags, one group per setting")
    ap.add_argument("--extra", default="", help="select flags added to every setting (e.g. '--threads 2')")
    ap.add_argument("--timeout", type=int, default=6 * 3600)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ntkselect-memory-"))
    if not args.domain:
        from ntkselect.data.demo import build_demo_data

        build_demo_data(work / "data", domain="medical", n_domain=100, n_pool_mmlu=800, n_pool_reasoning=200, seed=0)
        args.domain, args.pool = str(work / "data" / "domain.jsonl"), str(work / "data" / "pool.jsonl")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for k, flags in enumerate(s.strip() for s in args.settings.split(";")):
        extra = shlex.split(flags) + shlex.split(args.extra)
        base = [
            "select",
            "--domain",
            args.domain,
            "--pool",
            args.pool,
            "--n",
            str(args.n),
            "--model",
            args.model,
            "--out",
            str(work / f"run-{k}"),
            "--overwrite",
            *extra,
        ]
        t = time.perf_counter()
        plan = _run(_ESTIMATE, base + ["--dry-run"], env, args.timeout)
        t_plan = time.perf_counter() - t
        t = time.perf_counter()
        meas = _run(_CHILD, base, env, args.timeout)
        t_run = time.perf_counter() - t
        label = flags or "default flags"
        print(f"\n## {label}  (dry run {t_plan:.0f} s, run {t_run:.0f} s; peak reset per stage: {meas['hwm_reset']})\n")
        print("| stage | seconds | peak resident MiB | dry-run estimate MiB | error |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for st in (*STAGES, "less"):
            if st not in meas["peaks"]:
                continue
            est = plan["by_stage"].get(st)
            if st == "load":
                est = plan["process"] + plan["weights"]
            err = f"{(est - meas['peaks'][st]) / meas['peaks'][st]:+.0%}" if est else "-"
            print(f"| {st} | {meas['seconds'].get(st, 0):.0f} | {_mib(meas['peaks'][st])} | {_mib(est)} | {err} |")
        peak = max(meas["peaks"].values())
        print(
            f"| **whole run** | {sum(meas['seconds'].values()):.0f} | **{_mib(peak)}** | **{_mib(plan['peak'])}** | **{(plan['peak'] - peak) / peak:+.0%}** |"
        )
        print(
            f"\nestimate: process {_mib(plan['process'])} MiB + weights {_mib(plan['weights'])} MiB + activations "
            f"{_mib(plan['activations'])} MiB (batch budget {_mib(plan['budget'])} MiB)"
        )
        results.append({"setting": label, "measured": meas, "estimate": plan, "error": (plan["peak"] - peak) / peak})
    print(json.dumps({"benchmark": "memory", "model": args.model, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
