"""Reading the tokenised pool back: the driver's resident memory with memory maps against pread.

Stage 1 reads every pool example back from the token store once (``ntkselect.data.pool``). With
the store's token files memory-mapped, every page read stays mapped into the driver, so its
resident memory (VmHWM, as ``benchmarks/pool_scale.py`` measures it) grows by about 5 bytes per
pool token; with ``pread`` it does not. This builds the store of one pool once, then reads it
back shard by shard (2,048 examples, as stage 1's shards) in two fresh processes, one per mode,
and prints each one's peak resident memory and time side by side.

    PYTHONPATH=src .venv/bin/python benchmarks/pool_readback.py --pool runs/pool-scale/pool-v1-s0-n1000000.jsonl --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from ntkselect.data.pool import PoolExamples, TokenStore
store = TokenStore(sys.argv[1], mmap=sys.argv[2] == "mmap")
ex = PoolExamples(store)
t = time.perf_counter()
tokens = 0
for a in range(0, len(ex), 2048):
    for e in ex[a : a + 2048]:
        tokens += len(e.input_ids)
secs = time.perf_counter() - t
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"mode": sys.argv[2], "seconds": secs, "tokens": tokens, "vmhwm_kib": hwm}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True, help="a JSONL pool (e.g. one that benchmarks/pool_scale.py wrote)")
    ap.add_argument("--store", default=None, help="where the store is built (default: beside the pool, reused when finished)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="processes that build the store")
    args = ap.parse_args(argv)
    from ntkselect.data.pool import build_store
    from ntkselect.model.loading import load_tokenizer

    pool = Path(args.pool)
    store = Path(args.store or pool.with_suffix(".store"))
    if not (store / "store.json").exists():
        t = time.perf_counter()
        build_store(pool, load_tokenizer(None), args.max_length, "plain", store, progress=True, workers=args.threads)
        print(f"built {store} in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for mode in ("mmap", "pread"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(store), mode], capture_output=True, text=True, env=os.environ, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"\nread back {base['tokens']:,} tokens of {pool.name}, 2,048 examples at a time\n")
    print("| reads | peak resident MiB | seconds | peak vs mmap |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['vmhwm_kib'] / 1024:,.0f} | {r['seconds']:.1f} | {r['vmhwm_kib'] / base['vmhwm_kib']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
