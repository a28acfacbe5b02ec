"""Paired comparisons of evaluate cells against one reference method.

Reads ``cells/<method>-seed<s>.json`` of an ``ntkselect evaluate`` folder and prints, per method,
the mean held-out loss difference to ``--ref`` over the same seeds and test records, its percentile
bootstrap interval (seeds and records resampled) and the two-sided sign-flip p over records: the
statistics ``results.md`` gives against random, here against any row.

    PYTHONPATH=src python benchmarks/quality/compare.py --out runs/quality-arithmetic-variants --ref ntk \
        --methods ntk-norm,ntk-loss,ntk-diverse,ntk-ensemble,embedding,tsds --seeds 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ntkselect.evaluation.stats import paired_bootstrap, paired_sign_flip_test


def losses(out: Path, method: str, seeds: list[int]) -> np.ndarray:
    """(seeds, test records) per-record losses of one method."""
    return np.array([json.loads((out / "cells" / f"{method}-seed{s}.json").read_text())["losses"] for s in seeds], dtype=np.float64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="an ntkselect evaluate folder")
    ap.add_argument("--ref", default="ntk", help="the reference method (default: %(default)s)")
    ap.add_argument("--methods", required=True, help="comma-separated methods to compare with --ref")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds every method has a cell for (default: %(default)s)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    ref = losses(args.out, args.ref, seeds)
    print("| comparison | Δ loss | 95% CI | paired p |")
    print("| --- | ---: | ---: | ---: |")
    for m in [m.strip() for m in args.methods.split(",") if m.strip()]:
        a = losses(args.out, m, seeds)
        lo, hi = paired_bootstrap(a, ref)
        d = (a - ref).mean(axis=0)  # (records,) seed-averaged differences
        print(f"| {m} − {args.ref} | {d.mean():+.4f} | [{lo:+.4f}, {hi:+.4f}] | {paired_sign_flip_test(d):.2g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
