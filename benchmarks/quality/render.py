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
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ntkselect.errors import NtkSelectError
from ntkselect.evaluation.harness import all_methods, plot_results, results_markdown
from ntkselect.evaluation.records import SETUP, read_set

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


def render(records: Path, plots: Path, doc: Path, write_plots: bool = True) -> str:
    """The document with the records' block replaced (or appended)."""
    sets = sorted(p.parent for p in records.glob(f"*/*/{SETUP}"))
    body = [render_set(s.parent.name, s, plots, doc.parent, write_plots) for s in sets] or ["No benchmark records yet.\n"]
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
