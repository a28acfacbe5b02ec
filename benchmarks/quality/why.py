"""Why a selector picks what it picks (issue 25, item 4): for each method's selection in an
``evaluate --out`` folder, the rank correlation of its scores with the candidates' length, the
related share of S and the related generators it covers.

    PYTHONPATH=src python benchmarks/quality/why.py --out runs/quality-arithmetic \
        --pool runs/quality-data/arithmetic/pool.jsonl --methods ntk,ntk-cos,tsds,embedding

Length is counted in characters of the prompt and of the response (tokenizer-free; the SmolLM2
tokenizer's counts rank the same way on these pools up to ties). The correlation is over the
candidates the method scored (for NTK-Selector the M survivors of stage 1) and is Spearman's, with
average ranks for ties; a method whose scores are all equal or absent has none. "Covers" counts the
related generators (``subject`` of the pool records labelled ``relation: related``) with at least
one selected record, out of the related generators in the pool. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ntkselect.diagnostics.diagnose import spearman


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def analyse(selection: Path, pool: dict[str, dict]) -> dict:
    """The figures of one selection folder (scores.jsonl, selected.jsonl) against its pool."""
    scores = [r for r in _read_jsonl(selection / "scores.jsonl") if r.get("score") is not None and np.isfinite(r["score"])]
    chosen = [r["id"] for r in _read_jsonl(selection / "selected.jsonl") if r["id"] in pool]
    related = {p["subject"] for p in pool.values() if p.get("relation") == "related"}
    s = np.array([r["score"] for r in scores], dtype=np.float64)
    corr: dict[str, float | None] = {}
    for field in ("prompt", "response"):
        n = np.array([len(pool[r["id"]].get(field, "")) for r in scores], dtype=np.float64)
        corr[field] = spearman(s, n) if len(s) > 2 and np.ptp(s) > 0 and np.ptp(n) > 0 else None
    kinds = Counter(pool[i].get("subject", "?") for i in chosen)
    rel = sum(pool[i].get("relation") == "related" for i in chosen)
    return {
        "scored": len(scores),
        "rho_prompt": corr["prompt"],
        "rho_response": corr["response"],
        "related_share": rel / len(chosen) if chosen else None,
        "covers": len({k for k in kinds if k in related}),
        "of_related": len(related),
        "composition": kinds.most_common(6),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="an `ntkselect evaluate --out` folder (its selections/<method>-seed<k>/)")
    ap.add_argument("--pool", type=Path, required=True, help="the pool JSONL the selections were made from")
    ap.add_argument("--methods", default="", help="comma-separated methods (default: every selection in the folder)")
    args = ap.parse_args(argv)
    sel_root = args.out / "selections"
    if not sel_root.is_dir():
        print(f"why: {sel_root} is not a folder: pass an `ntkselect evaluate --out` folder", file=sys.stderr)
        return 2
    pool = {r["id"]: r for r in _read_jsonl(args.pool)}
    wanted = [m for m in args.methods.split(",") if m]
    rows = []
    for d in sorted(sel_root.iterdir()):
        method, _, seed = d.name.rpartition("-seed")
        if (wanted and method not in wanted) or not (d / "scores.jsonl").exists():
            continue
        rows.append((wanted.index(method) if wanted else 0, method, int(seed), analyse(d, pool)))
    print("| method | seed | scored | ρ(score, prompt length) | ρ(score, response length) | related share of S | related generators covered | S by generator |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for _, m, s, r in sorted(rows):
        f = lambda x: "" if x is None else f"{x:+.2f}"  # noqa: E731
        share = "" if r["related_share"] is None else f"{100 * r['related_share']:.0f}%"
        comp = ", ".join(f"{k} {v}" for k, v in r["composition"])
        print(f"| {m} | {s} | {r['scored']} | {f(r['rho_prompt'])} | {f(r['rho_response'])} | {share} | {r['covers']} of {r['of_related']} | {comp} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
