"""Extra statistics for an `ntkselect evaluate` folder: how much the methods' selections overlap,
how stable each is across seeds, and how skewed the fine-tuned models' answers are.

    .venv/bin/python benchmarks/eval/analyse.py runs/eval-med-cpu
"""

from __future__ import annotations

import collections
import itertools
import json
import sys
from pathlib import Path

import numpy as np


def main(folder: str) -> None:
    out = Path(folder)
    cells = {p.stem: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}
    sel = {}
    for d in sorted((out / "selections").iterdir()):
        ids = [json.loads(x)["id"] for x in (d / "selected.jsonl").read_text().splitlines()]
        sel[d.name] = set(ids)
    seeds = sorted({int(k.rsplit("-seed", 1)[1]) for k in sel})
    methods = sorted(m for m in {k.rsplit("-seed", 1)[0] for k in sel} if all(f"{m}-seed{s}" in sel for s in seeds))

    def jac(a, b):
        return len(a & b) / len(a | b)

    print("## Selection overlap (Jaccard), same seed, mean over seeds")
    print("| | " + " | ".join(methods) + " |")
    print("| --- |" + " ---: |" * len(methods))
    for a in methods:
        row = [np.mean([jac(sel[f"{a}-seed{s}"], sel[f"{b}-seed{s}"]) for s in seeds]) for b in methods]
        print(f"| {a} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
    print("\n## Stability across seeds (mean Jaccard between seeds)")
    for m in methods:
        pairs = [jac(sel[f"{m}-seed{a}"], sel[f"{m}-seed{b}"]) for a, b in itertools.combinations(seeds, 2)]
        print(f"- {m}: {np.mean(pairs):.2f}")
    cfg = json.loads((out / "evaluate_config.json").read_text())["config"]
    answers = [json.loads(x).get("answer") for x in Path(cfg["domain_test"]).read_text().splitlines()]
    kc = collections.Counter(answers)
    k_letter, k_n = kc.most_common(1)[0]
    print(
        f"\n## Answer skew: share of each model's most frequent predicted letter (always answering {k_letter}, the test key's "
        f"most frequent, scores {k_n / len(answers):.2f})"
    )
    for name, c in cells.items():
        cnt = collections.Counter(c["pred"])
        letter, n = cnt.most_common(1)[0]
        print(f"- {name}: {'ABCD'[letter]} {n / len(c['pred']):.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
