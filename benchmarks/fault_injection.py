"""Fault injection: SIGKILL a selection at random moments, rerun it, compare with an uninterrupted run.

For each method, an uninterrupted run gives the reference outputs (selected.jsonl, scores.jsonl,
train.jsonl) and its wall time T. Then, into one --out, attempts are started one after another
and each is killed with SIGKILL (the main process only, as `kill -9 PID` does: the pool pass's
forked workers may linger a moment) at a moment drawn uniformly from [0.3 s, T]; a kill can land
in the start-up, the pool pass, the warm-up, stage 1, stage 2, the write, the swap or the
cleanup. An attempt that finishes before its kill is compared with the reference and the folder
is started afresh. After the last kill, one attempt runs to the end and is compared. Every
comparison is byte for byte; every finished folder must also hold nothing but the run's own
entries (no lock, no work/, no temporary folder). The stage each kill hit is read from what the
killed attempt left behind. A kill that lands after the manifest (the run had finished, its
cleanup had not) is followed by one rerun that must refuse the finished run in one line, exit 2,
and clear what the kill left; the folder is then compared as a finished one and started afresh.

    PYTHONPATH=src .venv/bin/python benchmarks/fault_injection.py --kills 20 --methods ntk,ntk-trace,tsds

Exit status 1 when any rerun differs from the reference. Needs only CPUs: a tiny random Llama
on the SmolLM2 tokenizer (built into --work, nothing downloaded) and a synthetic pool of
--pool-size records, parsed by --threads worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tiny import tiny_model  # benchmarks/tiny.py: the shared tiny random Llama

RESULTS = ("selected.jsonl", "scores.jsonl", "train.jsonl")
WORDS = ["heart", "kidney", "liver", "lung", "contract", "court", "prime", "vector", "river", "poem", "engine", "virus"]
# what a finished select run folder may hold (runs/folder.py's SELECT layout, without work/ and run.json's siblings of an unfinished run)
FINISHED = {"run.json", "shards.jsonl", "adapter", "selected.jsonl", "scores.jsonl", "train.jsonl", "manifest.json", ".ntkselect.json"}


def write_data(folder: Path, pool_size: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    dom = [{"question": f"What does a doctor check in the {w}?", "answer": f"The {w} has to be examined with care."} for w in WORDS[:6]]
    pool = [
        {
            "id": f"p{i}",
            "prompt": f"Item {i}: explain the {WORDS[i % len(WORDS)]} in {1 + i % 5} sentences.",
            "response": f"The {WORDS[(i * 7) % len(WORDS)]} is item {i}." + " More." * (i % 4),
        }
        for i in range(pool_size)
    ]
    d, p = folder / "domain.jsonl", folder / "pool.jsonl"
    d.write_text("".join(json.dumps(r) + "\n" for r in dom))
    p.write_text("".join(json.dumps(r) + "\n" for r in pool))
    return d, p


def command(method: str, dom: Path, pool: Path, model: str, out: Path, threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ntkselect",
        "select",
        "--method",
        method,
        "--domain",
        str(dom),
        "--pool",
        str(pool),
        "--n",
        "8",
        "--out",
        str(out),
        "--model",
        model,
        "--warmup-epochs",
        "2",
        "--knn-k",
        "8",
        "--precision",
        "float32",
        "--threads",
        str(threads),
        "--batch-size",
        "8",
        "--shard-size",
        "64",
    ]


def stage_reached(out: Path) -> str:
    """What a killed attempt left behind, as the latest stage it reached."""
    if not out.exists():
        return "start-up"
    names = {p.name for p in out.iterdir()}
    if "manifest.json" in names:
        return "after the manifest"
    if any(n.startswith(".ntkselect-swap") for n in names):
        return "swap"
    log = out / "shards.jsonl"
    events = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    stages = {e.get("stage") for e in events if e.get("event") == "shard_done"}
    if "selected.jsonl" in names or "scores.jsonl" in names or ".adapter-" in " ".join(names):
        return "write"
    if stages - {"stage1"}:
        return "stage 2"
    if "stage1" in stages:
        return "stage 1"
    if any(e.get("event") == "warmup_done" for e in events):
        return "stage 1"
    if (out / "work" / "warmup").exists():
        return "warm-up"
    if "run.json" in names:
        return "preflight / warm-up"
    if any(n.startswith(".ntkpool-") for n in names):
        return "pool pass"
    return "start-up"


def results(out: Path) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for f in RESULTS}


def check_finished(out: Path, ref: dict[str, bytes]) -> list[str]:
    problems = []
    if results(out) != ref:
        problems.append("outputs differ from the uninterrupted run")
    extra = sorted(p.name for p in out.iterdir() if p.name not in FINISHED)
    if extra:
        problems.append(f"left in the finished folder: {', '.join(extra)}")
    return problems


def run_method(method: str, kills: int, rng: random.Random, dom: Path, pool: Path, model: str, work: Path, threads: int, log) -> dict:
    ref_out = work / f"{method}-ref"
    shutil.rmtree(ref_out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run(command(method, dom, pool, model, ref_out, threads), capture_output=True, text=True)
    t_ref = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{method}: the uninterrupted run failed: {proc.stderr.strip().splitlines()[-1:]}")
    ref = results(ref_out)
    out = work / f"{method}-killed"
    shutil.rmtree(out, ignore_errors=True)
    hits: dict[str, int] = {}
    problems: list[str] = []
    finished_early = attempts = 0
    for k in range(kills + 1):
        last = k == kills
        attempts += 1
        p = subprocess.Popen(command(method, dom, pool, model, out, threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if not last:
            at = rng.uniform(0.3, t_ref)
            try:
                p.wait(timeout=at)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
        rc = p.wait()
        err = p.stderr.read() if p.stderr else ""
        if rc == -signal.SIGKILL:
            where = stage_reached(out)
            hits[where] = hits.get(where, 0) + 1
            log(f"  {method}: kill {k + 1} at {at:.1f} s, in the {where}")
            if where == "after the manifest":
                # the run had finished: a rerun must refuse it (exit 2, one line) and clear what the kill left (work/, the lock)
                chk = subprocess.run(command(method, dom, pool, model, out, threads), capture_output=True, text=True)
                attempts += 1
                found = [] if chk.returncode == 2 and "already holds a finished run" in chk.stderr else [f"the rerun exited {chk.returncode}"]
                found += check_finished(out, ref)
                problems += [f"attempt {attempts}: {x}" for x in found]
                log(f"  {method}: attempt {attempts} refused the finished run: {'identical, nothing left' if not found else '; '.join(found)}")
                shutil.rmtree(out)  # start afresh: the next kill lands in a new run
            continue
        if rc != 0:
            problems.append(f"attempt {attempts} exited {rc}: {err.strip().splitlines()[-1:] if err.strip() else ''}")
            log(f"  {method}: attempt {attempts} FAILED (exit {rc}): {err.strip()[-300:]}")
            shutil.rmtree(out, ignore_errors=True)
            continue
        found = check_finished(out, ref)
        problems += [f"attempt {attempts}: {x}" for x in found]
        log(f"  {method}: attempt {attempts} finished{' before its kill' if not last else ''}: {'identical' if not found else '; '.join(found)}")
        if not last:
            finished_early += 1
            shutil.rmtree(out)  # start afresh: the next kill lands in a new run
    return {
        "method": method,
        "uninterrupted_seconds": round(t_ref, 1),
        "kills": kills,
        "finished_before_kill": finished_early,
        "hits": hits,
        "problems": problems,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs per method")
    ap.add_argument("--methods", default="ntk,ntk-trace,tsds", help="comma-separated --method values")
    ap.add_argument("--pool-size", type=int, default=2500, help="pool records (more than 1,024 so that the pool pass has several chunks)")
    ap.add_argument("--threads", type=int, default=2, help="--threads of each run (also the pool pass's worker processes)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--work", default="runs/fault-injection", help="folder for the model, the data and the runs")
    a = ap.parse_args(argv)
    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "tiny-llama")
    dom, pool = write_data(work / "data", a.pool_size)
    rng = random.Random(a.seed)
    rows = []
    for method in a.methods.split(","):
        print(f"{method}: {a.kills} kills", flush=True)
        rows.append(run_method(method, a.kills, rng, dom, pool, model, work, a.threads, lambda s: print(s, flush=True)))
    print(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["problems"]]
    print("ALL IDENTICAL" if not bad else f"PROBLEMS in {', '.join(r['method'] for r in bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
