"""Render the quality benchmark's tables and plots in docs/RESULTS.md from the committed records alone.

Every record set ``benchmarks/quality/records/<domain>/<device>-<precision>/`` (written by
``ntkselect evaluate --records``, see src/ntkselect/evaluation/records.py) becomes one section
between the markers below in the document, with the same tables ``evaluate`` writes to
results.md, and one plot ``docs/quality-<domain>-<device>-<precision>.png``. Nothing else in the
document is touched; rendering twice gives the same bytes.

    PYTHONPATH=src python benchmarks/quality/render.py            # records -> docs/RESULTS.md
    PYTHONPATH=src python benchmarks/quality/render.py --check    # exit 1 if the document is stale

The table of a set uses the seeds its ``random`` row has (else its first method's); a method
without a cell for each of those seeds is listed as incomplete, not averaged over fewer seeds.

After the sets comes the verdict across domains (issues 22 and 25), for each device-precision label
with more than one domain or any selector: per domain, each selector against the best baseline,
TSDS and embedding similarity (paired over test records on the seed-averaged difference, as in
the tables); across domains, its mean rank, its significant wins and losses against TSDS and
embedding, what it costs against them, and whether it clears issue 25's bar: lower loss than both
TSDS and embedding with paired p < 0.05 on at least two of three domains, and never significantly
worse than either on the third.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from ntkselect.errors import NtkSelectError
from ntkselect.evaluation.harness import all_methods, plot_results, results_markdown
from ntkselect.evaluation.records import SETUP, read_set
from ntkselect.evaluation.stats import bootstrap_indices, paired_bootstrap, paired_sign_flip_test

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- quality-records:begin (rendered by benchmarks/quality/render.py from benchmarks/quality/records; do not edit) -->"
END = "<!-- quality-records:end -->"


def choose(cells: dict) -> tuple[list[str], list[int], dict[str, list[int]]]:
    """(methods in the table, their common seeds, {incomplete method: its seeds})."""
    have: dict[str, set[int]] = {}
    for m, s in cells:
        have.setdefault(m, set()).add(s)
    known = ["domain-only", "oracle", "random", *(m for m in all_methods() if m not in ("domain-only", "oracle", "random"))]  # calibration rows first
    order = sorted(have, key=lambda m: (known.index(m) if m in known else len(known), m))
    if not order:
        return [], [], {}
    seeds = sorted(have["random"] if "random" in have else have[order[0]])
    methods = [m for m in order if set(seeds) <= have[m]]
    return methods, seeds, {m: sorted(have[m]) for m in order if m not in methods}


def render_set(domain: str, root: Path, plots: Path, doc_dir: Path, write_plots: bool = True) -> str:
    setup, base, cells = read_set(root)
    label = setup["label"]
    methods, seeds, partial = choose(cells)
    rel = root.relative_to(ROOT) if root.resolve().is_relative_to(ROOT) else root
    lines = [f"### {domain}, {label}", "", f"From the records in `{rel}` ({len(cells)} cells).", ""]
    if not base or not methods:
        return "\n".join([*lines, "No complete rows yet.", ""])
    lines.append(results_markdown(setup["meta"], methods, seeds, base, cells, level=4))
    png = plots / f"quality-{domain}-{label}.png"
    if write_plots:
        plot_results(png, methods, seeds, cells, base)
    lines += [f"![held-out loss per method, {domain}, {label}]({os.path.relpath(png, doc_dir)})", ""]
    if partial:
        lines += ["Incomplete, not in the table: " + "; ".join(f"{m} (seeds {', '.join(map(str, s))})" for m, s in partial.items()) + ".", ""]
    return "\n".join(lines)


CALIBRATION = ("domain-only", "oracle")  # rows that are not selectors
BASELINES = ("random", "bm25", "embedding", "tsds", "less")  # the peers; every other method is ntkselect's own
REFS = ("tsds", "embedding")  # issue 25's bar: beat both
ALPHA = 0.05
BAR_DOMAINS = 2  # of three


def compare_domain(cells: dict, methods: list[str], seeds: list[int], n_boot: int = 2000) -> dict:
    """Per selector of one domain: its loss, its rank among the selectors (1 = lowest loss), and
    against the best baseline (the lowest-loss peer other than itself), TSDS and embedding the
    paired difference {delta, ci95, p_value, ref}."""
    sel = [m for m in methods if m not in CALIBRATION]
    if not sel:
        return {}
    L = {m: np.array([cells[(m, s)]["losses"] for s in seeds], dtype=np.float64) for m in sel}  # (seeds, examples)
    idx = bootstrap_indices(len(seeds), next(iter(L.values())).shape[1], n_boot)
    mean = {m: float(L[m].mean()) for m in sel}
    order = sorted(sel, key=lambda m: (mean[m], m))

    def vs(m: str, ref: str) -> dict | None:
        if ref not in L or ref == m:
            return None
        d = (L[m] - L[ref]).mean(axis=0)  # (examples,) seed-averaged; negative = m has the lower loss
        lo, hi = paired_bootstrap(L[m], L[ref], idx)
        return {"ref": ref, "delta": float(d.mean()), "ci95": [lo, hi], "p_value": paired_sign_flip_test(d, seed=0)}

    out = {}
    for m in sel:
        peers = [b for b in BASELINES if b in L and b != m]
        best = min(peers, key=lambda b: (mean[b], b)) if peers else None
        row = {"loss": mean[m], "rank": order.index(m) + 1, "n_selectors": len(sel), "best_baseline": vs(m, best) if best else None}
        for ref in REFS:
            row[ref] = vs(m, ref)
        row["cost"] = {k: float(np.mean([cells[(m, s)].get(k) or 0 for s in seeds])) for k in ("selection_seconds", "selection_tokens")}
        out[m] = row
    return out


def _outcome(v: dict | None) -> str:
    """'win' / 'loss' (p < ALPHA) or 'level'; None without the comparison."""
    if v is None:
        return "n/a"
    if v["p_value"] < ALPHA:
        return "win" if v["delta"] < 0 else "loss"
    return "level"


def bar(per_domain: dict[str, dict], m: str, n_domains: int = 3) -> tuple[str, bool]:
    """Issue 25's bar for method m over {domain: compare_domain(...)}: (the reason, cleared)."""
    rows = [d[m] for d in per_domain.values() if m in d]
    if m in BASELINES:
        return "a peer", False
    if len(rows) < n_domains or any(r[ref] is None for r in rows for ref in REFS):
        return f"not yet: {len(rows)} of {n_domains} domains with TSDS and embedding", False
    beats = sum(all(_outcome(r[ref]) == "win" for ref in REFS) for r in rows)
    worse = sum(any(_outcome(r[ref]) == "loss" for ref in REFS) for r in rows)
    ok = beats >= BAR_DOMAINS and worse == 0
    return f"beats both on {beats} of {len(rows)}; significantly worse than one on {worse}", ok


def _d(v: dict | None) -> str:
    if v is None:
        return ""
    lo, hi = v["ci95"]
    return f"{v['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}] p={v['p_value']:.2g}"


def render_verdict(label: str, sets: dict[str, tuple[list[str], list[int], dict]]) -> str:
    """The verdict across the domains of one device-precision label, from {domain: (methods, seeds, cells)}."""
    per = {d: compare_domain(cells, methods, seeds) for d, (methods, seeds, cells) in sets.items()}
    per = {d: v for d, v in per.items() if v}
    lines = [f"### Verdict across domains, {label}", ""]
    if not per:
        return "\n".join([*lines, "No complete selector rows yet.", ""])
    seeds_of = {d: sets[d][1] for d in per}
    lines += [
        "Per domain, each selector against the best baseline (the lowest-loss peer other than itself among "
        + ", ".join(BASELINES)
        + "), TSDS and embedding: Δ loss in nats/token [95% bootstrap CI] and the paired sign-flip p over test records "
        f"(seeds: {'; '.join(f'{d} {len(s)}' for d, s in seeds_of.items())}). Δ < 0: lower loss than the reference.",
        "",
    ]
    for d, rows in per.items():
        lines += [f"#### {d}", "", "| method | loss | rank | vs best baseline | vs TSDS | vs embedding |", "| --- | ---: | ---: | --- | --- | --- |"]
        for m in sorted(rows, key=lambda m: rows[m]["rank"]):
            r = rows[m]
            bb = r["best_baseline"]
            best = f"{bb['ref']}: {_d(bb)}" if bb else ""
            lines.append(f"| {m} | {r['loss']:.4f} | {r['rank']} of {r['n_selectors']} | {best} | {_d(r['tsds'])} | {_d(r['embedding'])} |")
        lines.append("")
    methods = sorted({m for rows in per.values() for m in rows}, key=lambda m: (np.mean([rows[m]["rank"] for rows in per.values() if m in rows]), m))
    lines += [
        "#### Across domains",
        "",
        f"Wins and losses: domains where the method's loss is lower (higher) than the reference's with paired p < {ALPHA}. "
        "Cost: the method's selection tokens over the reference's, mean over the domains it ran (tokens, not seconds: "
        "the records' seconds were taken while other jobs ran). The bar (issue 25): lower loss than both TSDS and embedding with p < 0.05 on at "
        "least two of three domains, and never significantly worse than either on the third.",
        "",
        "| method | domains | mean rank | vs TSDS win / level / loss | vs embedding win / level / loss | tokens ÷ TSDS's | tokens ÷ embedding's | the bar |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in methods:
        rows = [(d, per[d][m]) for d in per if m in per[d]]
        cells = []
        for ref in REFS:
            o = [_outcome(r[ref]) for _, r in rows]
            cells.append(f"{o.count('win')} / {o.count('level')} / {o.count('loss')}" if any(x != "n/a" for x in o) else "")
        ratios = []
        for ref in REFS:
            rr = [
                r["cost"]["selection_tokens"] / per[d][ref]["cost"]["selection_tokens"]
                for d, r in rows
                if per[d].get(ref, {}).get("cost", {}).get("selection_tokens")
            ]
            ratios.append(f"{np.mean(rr):.2f}" if rr and m != ref else "")
        why, ok = bar(per, m)
        lines.append(
            f"| {m} | {len(rows)} | {np.mean([r['rank'] for _, r in rows]):.1f} | {cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} | "
            f"{'**cleared**' if ok else 'not cleared'}: {why} |"
        )
    cleared = [m for m in methods if bar(per, m)[1]]
    lines += ["", f"Cleared the bar: {', '.join(cleared)}." if cleared else "No method of ntkselect's clears the bar on these records.", ""]
    return "\n".join(lines)


def render(records: Path, plots: Path, doc: Path, write_plots: bool = True) -> str:
    """The document with the records' block replaced (or appended)."""
    sets = sorted(p.parent for p in records.glob(f"*/*/{SETUP}"))
    body = [render_set(s.parent.name, s, plots, doc.parent, write_plots) for s in sets] or ["No benchmark records yet.\n"]
    by_label: dict[str, dict] = {}
    for s in sets:
        _, _, cells = read_set(s)
        methods, seeds, _ = choose(cells)
        by_label.setdefault(s.name, {})[s.parent.name] = (methods, seeds, cells)
    body += [render_verdict(label, doms) for label, doms in sorted(by_label.items())]
    block = "\n".join([BEGIN, "", *body, END])
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        return text[:a] + block + text[b:]
    return text.rstrip("\n") + "\n\n## The quality benchmark, from its records (issue 22)\n\n" + block + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=Path, default=ROOT / "benchmarks" / "quality" / "records", help="the records folder (default: %(default)s)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "RESULTS.md", help="the document to render into (default: %(default)s)")
    ap.add_argument("--plots", type=Path, default=None, help="where the plots go (default: the document's folder)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the document differs from its rendering")
    args = ap.parse_args(argv)
    plots = args.plots or args.doc.parent
    try:
        new = render(args.records, plots, args.doc, write_plots=not args.check)
    except NtkSelectError as err:
        print(f"render: {err}", file=sys.stderr)
        return 2
    old = args.doc.read_text() if args.doc.exists() else ""
    if args.check:
        if new != old:
            print(f"{args.doc} is not what the records render: run benchmarks/quality/render.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.doc.write_text(new)
    print(f"rendered {args.records} into {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
