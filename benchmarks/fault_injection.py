"""Fault injection: SIGKILL a selection at random moments, rerun it, compare with an uninterrupted run.

For each method, an uninterrupted run gives the reference outputs (selected.jsonl, scores.jsonl,
train.jsonl) and its wall time T. Then, into one --out, attempts are started one after another
and each is killed with SIGKILL (the main process only, as `kill -9 PID` does: the pool pass's
forked workers may linger a moment). Each kill aims at a stage drawn uniformly from those the
uninterrupted run went through (start-up and pool pass, warm-up, stage 1, stage 2, the write),
at a moment drawn uniformly within that stage's length in the uninterrupted run, counted from when
the attempt prints that it entered the stage (its progress bars and log lines are read as they
come). An attempt that resumes past its target stage, or finishes before its kill, is compared
with the reference and the folder is started afresh. After the last kill, one attempt runs to the
end and is compared. Every comparison is byte for byte; every finished folder must also hold
nothing but the run's own entries (no lock, no work/, no temporary folder). The stage each kill
landed in is the last one the attempt had printed. A kill that lands after the manifest (the run had finished, its
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
import threading
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


#: --warmup-epochs of every run (--warmup-epochs of this script: more epochs give the kills a longer warm-up to land in)
WARMUP_EPOCHS = ["2"]


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
        WARMUP_EPOCHS[0],
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


#: what a run prints as it enters a stage (progress bars and log lines, stdout and stderr together), in order
MARKERS = (
    ("warm-up", ("warm-up:",)),
    ("stage 1", ("stage 1:",)),
    ("stage 2", ("stage 2:", "rules:", "ntk variant:", "kernel:", "less:", "ensemble:")),
    ("write", ("ntkselect: selected",)),
)
STAGES = ("start-up and pool pass", *(name for name, _ in MARKERS))


class Watched:
    """A run whose merged output is read as it comes: the moment each stage first appeared."""

    def __init__(self, cmd: list[str]):
        self.t0 = time.perf_counter()
        self.seen: dict[str, float] = {STAGES[0]: 0.0}
        self.tail = ""
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        buf = b""
        while chunk := self.p.stdout.read1(65536):
            buf = (buf + chunk)[-4096:]
            text = buf.decode(errors="replace")
            now = time.perf_counter() - self.t0
            for name, keys in MARKERS:
                if name not in self.seen and any(k in text for k in keys):
                    self.seen[name] = now
            self.tail = text

    def stage(self) -> str:
        """The latest stage this run has entered."""
        return max(self.seen, key=lambda n: self.seen[n])

    def wait(self) -> int:
        rc = self.p.wait()
        self.reader.join(timeout=5)
        return rc


def run_method(method: str, kills: int, rng: random.Random, dom: Path, pool: Path, model: str, work: Path, threads: int, log) -> dict:
    ref_out = work / f"{method}-ref"
    shutil.rmtree(ref_out, ignore_errors=True)
    ref_run = Watched(command(method, dom, pool, model, ref_out, threads))
    if ref_run.wait() != 0:
        raise SystemExit(f"{method}: the uninterrupted run failed: {ref_run.tail.strip().splitlines()[-1:]}")
    t_ref = time.perf_counter() - ref_run.t0
    # each stage's window in the uninterrupted run: from its first output to the next stage's (the last: to the exit)
    starts = sorted(ref_run.seen.items(), key=lambda kv: kv[1])
    windows = {name: (t, (starts[i + 1][1] if i + 1 < len(starts) else t_ref) - t) for i, (name, t) in enumerate(starts)}
    log(f"  {method}: uninterrupted {t_ref:.1f} s; stage windows " + ", ".join(f"{n} {w:.1f} s" for n, (_, w) in windows.items()))
    ref = results(ref_out)
    out = work / f"{method}-killed"
    shutil.rmtree(out, ignore_errors=True)
    hits: dict[str, int] = {}
    problems: list[str] = []
    finished_early = attempts = 0
    targets = [name for name in STAGES if name in windows]
    for k in range(kills + 1):
        last = k == kills
        attempts += 1
        # the target: a stage drawn uniformly from those the uninterrupted run went through, then a moment drawn
        # uniformly within its window, counted from when this attempt enters it (a resumed attempt may skip it)
        target = rng.choice(targets)
        delay = rng.uniform(0.0, max(windows[target][1], 0.05))
        w = Watched(command(method, dom, pool, model, out, threads))
        killed_in = None
        if not last:
            while w.p.poll() is None:
                if target in w.seen and time.perf_counter() - w.t0 >= w.seen[target] + delay:
                    killed_in = w.stage()
                    os.kill(w.p.pid, signal.SIGKILL)
                    break
                time.sleep(0.01)
        rc = w.wait()
        if rc == -signal.SIGKILL:
            where = "after the manifest" if (out / "manifest.json").exists() else (killed_in or w.stage())
            hits[where] = hits.get(where, 0) + 1
            log(f"  {method}: kill {k + 1} aimed at {target} + {delay:.1f} s, landed in {where} (at {time.perf_counter() - w.t0:.1f} s)")
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
            problems.append(f"attempt {attempts} exited {rc}: {w.tail.strip().splitlines()[-1:]}")
            log(f"  {method}: attempt {attempts} FAILED (exit {rc}): {w.tail.strip()[-300:]}")
            shutil.rmtree(out, ignore_errors=True)
            continue
        found = check_finished(out, ref)
        problems += [f"attempt {attempts}: {x}" for x in found]
        when = f" before its kill (aimed at {target})" if not last else ""
        log(f"  {method}: attempt {attempts} finished{when}: {'identical' if not found else '; '.join(found)}")
        if not last:
            finished_early += 1
            shutil.rmtree(out)  # start afresh: the next kill lands in a new run
    return {
        "method": method,
        "uninterrupted_seconds": round(t_ref, 1),
        "stage_windows_seconds": {n: round(w, 2) for n, (_, w) in windows.items()},
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
    ap.add_argument("--warmup-epochs", type=int, default=2, help="--warmup-epochs of each run (the warm-up on 6 records is short: more epochs lengthen it)")
    a = ap.parse_args(argv)
    WARMUP_EPOCHS[0] = str(a.warmup_epochs)
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
