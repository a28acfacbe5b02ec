"""The batches a command's gradient passes get: ``ntkselect`` run in this process with
``make_batches`` (stage 2's batching, also LESS's) wrapped to print the size of every batch.

    head -120 runs/quality-data/arithmetic/pool.jsonl > /tmp/pool120.jsonl
    PYTHONPATH=src python benchmarks/batch_sizes.py select --method less --domain runs/quality-data/arithmetic/domain_train.jsonl \\
        --pool /tmp/pool120.jsonl --n 10 --out /tmp/bs-less --threads 1 --template plain --max-length 320 --precision float32

Prints, per gradient pass, how many batches and their sizes; then the exit code and seconds.
"""

from __future__ import annotations

import collections
import sys
import time

import ntkselect.selection.ntk.stage2 as stage2
from ntkselect.cli.main import main as ntkselect_main


def main(argv: list[str]) -> int:
    passes: list[list[int]] = []
    plain = stage2.make_batches

    def recorded(lengths, *a, **k):
        out = plain(lengths, *a, **k)
        passes.append([len(b) for b in out])
        return out

    stage2.make_batches = recorded
    t = time.perf_counter()
    try:
        rc = ntkselect_main(argv)
    finally:
        stage2.make_batches = plain
    for sizes in passes:
        print(f"pass: {sum(sizes)} examples in {len(sizes)} batches, sizes {sorted(collections.Counter(sizes).items())}")
    print(f"exit {rc}, {time.perf_counter() - t:.1f} s")
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
