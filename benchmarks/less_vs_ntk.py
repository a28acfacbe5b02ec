"""LESS against NTK-Selector: selection cost side by side, in one run (issue 22).

Runs ``ntkselect select`` once per method, one after the other, each in its own process on the
same inputs and options, and reports per method the selection cost the manifest records (tokens
and seconds, the shared warm-up and embeddings counted as if run alone), the wall time of the
process and its peak resident memory (``ru_maxrss`` of that child alone, from ``wait4``). Run it
with nothing else on the machine if the seconds are to mean anything; the tokens are exact either
way. The last line is JSON.

    PYTHONPATH=src python benchmarks/less_vs_ntk.py --domain runs/quality-data/arithmetic/domain_train.jsonl \\
        --pool runs/quality-data/arithmetic/pool.jsonl --n 100 --threads 1 -- --template plain --max-length 320
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(method: str, args, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "ntkselect", "select", "--domain", args.domain, "--pool", args.pool, "--n", str(args.n)]
    cmd += ["--method", method, "--out", str(out), "--threads", str(args.threads), "--model", args.model, "--seed", str(args.seed), *extra]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{method}: ntkselect select failed ({proc.returncode}):\n{err[-2000:]}")
    man = json.loads((out / "manifest.json").read_text())
    return {
        "method": method,
        "selection_tokens": man["cost"]["tokens"],
        "selection_seconds": man["cost"]["seconds"],
        "timings": man["timings"],
        "process_seconds": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--model", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="ntk,less")
    ap.add_argument("extra", nargs="*", help="further `ntkselect select` options after --, the same for every method")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="less-vs-ntk-") as tmp:
        for m in [x.strip() for x in args.methods.split(",") if x.strip()]:
            rows.append(run(m, args, args.extra, Path(tmp) / m))
            r = rows[-1]
            print(
                f"{m:>6}: selection {r['selection_tokens'] / 1e3:.1f}K tokens, {r['selection_seconds']:.1f} s "
                f"(process {r['process_seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB); stages {r['timings']}",
                flush=True,
            )
    if len(rows) == 2:
        a, b = rows[1], rows[0]
        print(
            f"{a['method']} / {b['method']}: tokens {a['selection_tokens'] / max(1, b['selection_tokens']):.2f}x, "
            f"seconds {a['selection_seconds'] / max(1e-9, b['selection_seconds']):.2f}x, peak RSS {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x"
        )
    print(json.dumps({"rows": rows, "args": vars(args)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
