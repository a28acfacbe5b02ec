"""The run report: one self-contained HTML page for a selection run folder.

:func:`build_report` reads ``manifest.json``, ``scores.jsonl`` and ``selected.jsonl`` (and the
domain file named in the manifest, for the nearest domain examples) and writes
``RUN_DIR/report.html`` with

* the score distribution of the stage-2 candidates with the cut-off,
* the stage-1 vote distribution (NTK runs),
* the composition of the selected set by subject/source against the pool's,
* the top and bottom selected examples, each with its nearest domain examples,
* the timings and the configuration.

Plots are PNGs embedded as ``data:`` URIs and the styles are inline; the page loads no script,
font or stylesheet and its Content-Security-Policy forbids any network request, so it opens
from disk with no server. The plotting helpers here (:func:`new_figure`, :func:`png_bytes`)
also serve :mod:`ntkselect.diagnostics.diagnose`.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntkselect.data.records import load_records, record_text
from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_open
from ntkselect.runs.folder import SELECT, check_paths, open_run
from ntkselect.runs.manifest import check_outputs, input_changed, read_manifest

__all__ = ["build_report", "load_run", "nearest_domain", "require_matplotlib", "new_figure", "png_bytes", "write_png", "score_of", "rank_of"]


logger = logging.getLogger(__name__)

# -- plotting helpers (matplotlib's object API: no global state, no display backend) -----------


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NtkSelectError("plots need matplotlib: run `pip install 'ntkselect[report]'` (or `pip install matplotlib`)") from None


def new_figure(width: float = 6.0, height: float = 3.6, ncols: int = 1):
    """(figure, axes) without pyplot, so nothing depends on a display or a global backend."""
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_png(fig, path: str | Path) -> None:
    with atomic_open(path, "wb") as f:
        f.write(png_bytes(fig))


def _img(fig, alt: str) -> str:
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# -- reading a run ----------------------------------------------------------------------------

_SCORE_KEYS = ("score", "selection_score", "ntk_score")
_RANK_KEYS = ("rank", "selection_rank", "ntk_rank")
_ADDED_KEYS = (*_SCORE_KEYS, *_RANK_KEYS, "selection_method")  # what a run adds to the user's record


def score_of(row: dict) -> float | None:
    """The score of a scores.jsonl / selected.jsonl row: ``score`` or ``selection_score``, else
    ``ntk_score`` (older runs)."""
    for key in _SCORE_KEYS:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def rank_of(row: dict, default: int) -> int:
    for key in _RANK_KEYS:
        v = row.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return default


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise NtkSelectError(f"{path}:{n}: not valid JSON ({err.msg}); the run folder is damaged, rerun the selection") from None
    return rows


def load_run(run_dir: str | Path) -> dict:
    """{manifest, scores, selected, domain (records or None), domain_note} of a finished run
    folder. Every file read is checked against the manifest (runs/manifest.py): a damaged run is
    refused in one line; a domain file changed since the run is not shown, with a note."""
    run = Path(run_dir)
    manifest = read_manifest(run)
    check_outputs(run, manifest, ("scores.jsonl", "selected.jsonl"))
    domain, note = None, None
    cfg = manifest.get("config") or {}
    dpath = cfg.get("domain") or ((manifest.get("inputs") or {}).get("domain") or {}).get("path")
    if dpath and not Path(dpath).is_absolute() and not Path(dpath).exists() and (run / dpath).exists():
        dpath = str(run / dpath)
    if not dpath:
        note = "the manifest names no domain file"
    elif (why := input_changed(manifest, "domain", dpath)) is not None:
        note = f"the domain file is not the one the run read: {why}"
        logger.warning(f"ntkselect: warning: report: {note}; the nearest domain examples are not shown")
    else:
        try:
            domain = load_records(dpath)
        except NtkSelectError as err:
            note = f"the domain file could not be read ({err})"
    return {
        "dir": run,
        "manifest": manifest,
        "scores": _read_jsonl(run / "scores.jsonl"),
        "selected": _read_jsonl(run / "selected.jsonl"),
        "domain": domain,
        "domain_note": note,
    }


# -- nearest domain examples by TF-IDF ------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


_STOP = frozenset(
    """a an and are as at be been but by can could did do does for from had has have he her his how i if in into is it its
may more most no not of on or our she should so such than that the their them then there these they this those to was we were what
when where which who whom why will with would you your answer following""".split()
)


def _words(text: str) -> list[str]:
    """Lower-case words of two or more characters, without common English function words (and
    the option letters and 'Answer' of multiple-choice prompts)."""
    return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in _STOP]


def nearest_domain(queries: Sequence[str], domain: Sequence[str], k: int = 3) -> list[list[tuple[int, float]]]:
    """For every query its ``k`` nearest domain texts as (index, cosine) by TF-IDF over content
    words (idf from the domain texts), best first; an inverted index keeps it linear in the matches."""
    df: collections.Counter = collections.Counter()
    docs = [collections.Counter(_words(t)) for t in domain]
    for c in docs:
        df.update(c.keys())
    n = len(docs)
    idf = {w: math.log((1 + n) / (1 + m)) + 1 for w, m in df.items()}
    index: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for i, c in enumerate(docs):
        vec = {w: (1 + math.log(v)) * idf[w] for w, v in c.items()}
        norm = math.sqrt(sum(x * x for x in vec.values())) or 1.0
        for w, x in vec.items():
            index[w].append((i, x / norm))
    out = []
    for q in queries:
        c = collections.Counter(_words(q))
        vec = {w: (1 + math.log(v)) * idf.get(w, math.log(1 + n) + 1) for w, v in c.items()}
        norm = math.sqrt(sum(x * x for x in vec.values())) or 1.0
        sims: dict[int, float] = collections.defaultdict(float)
        for w, x in vec.items():
            for i, y in index.get(w, ()):
                sims[i] += x / norm * y
        out.append(sorted(sims.items(), key=lambda kv: (-kv[1], kv[0]))[:k])
    return out


# -- the page --------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#222;line-height:1.4}
h1{font-size:1.6rem} h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.88rem} th,td{border:1px solid #ddd;padding:.25rem .5rem;vertical-align:top;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
img.plot{max-width:100%;border:1px solid #eee} .meta{color:#555;font-size:.9rem} .note{color:#8a5a00}
.text{white-space:pre-wrap;max-width:38rem;margin-bottom:.4rem;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8rem}
nav a{margin-right:1rem}
"""

_SECTIONS = (
    ("summary", "Summary"),
    ("scores", "Score distribution"),
    ("votes", "Stage-1 votes"),
    ("composition", "Composition"),
    ("examples", "Top and bottom selected examples"),
    ("timings", "Timings"),
    ("configuration", "Configuration"),
)


def _e(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], num: Sequence[bool] | None = None, raw: bool = False) -> str:
    num = num or [False] * len(header)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for v, isnum in zip(r, num):
            content = v if raw and isinstance(v, _Raw) else _e(_fmt(v))
            cells.append(f'<td class="num">{content}</td>' if isnum else f"<td>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _snippet(text: str, limit: int = 400) -> str:
    text = " ".join(text.split()) if len(text) > limit else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _record_text(raw: dict) -> str:
    core = {k: v for k, v in raw.items() if k not in _ADDED_KEYS}
    try:
        return record_text(core)
    except Exception:
        return json.dumps(core, ensure_ascii=False, default=str)


def _group(raw: dict) -> str:
    return str(raw.get("subject") or raw.get("source") or raw.get("category") or "")


def _score_plot(scores: list[dict]) -> tuple[str, str]:
    vals = [(score_of(r), bool(r.get("selected"))) for r in scores]
    vals = [(s, sel) for s, sel in vals if s is not None]
    if not vals:
        return "", '<p class="note">No scores in scores.jsonl (this method does not score candidates).</p>'
    s = np.array([v for v, _ in vals])
    sel = np.array([b for _, b in vals])
    fig, ax = new_figure(7, 3.4)
    bins = np.histogram_bin_edges(s, bins=min(40, max(5, len(s) // 5)))
    ax.hist(
        [s[~sel], s[sel]], bins=bins, stacked=True, color=["#9aa7b8", "#dd8452"], label=[f"not selected ({int((~sel).sum())})", f"selected ({int(sel.sum())})"]
    )
    text = f"{len(s)} scored candidates; "
    if sel.any():
        cut = float(s[sel].min())
        ax.axvline(cut, color="black", ls="--", lw=1, label=f"cut-off {cut:.4g}")
        text += f"cut-off (lowest selected score) {cut:.4g}; selected {s[sel].min():.4g} .. {s[sel].max():.4g}; "
    text += f"all {s.min():.4g} .. {s.max():.4g}, median {np.median(s):.4g}."
    ax.set_xlabel("score")
    ax.set_ylabel("candidates")
    ax.set_title("scores of the candidates that reached scoring")
    ax.legend(fontsize=8)
    return _img(fig, "score distribution with the cut-off"), f"<p>{_e(text)}</p>"


def _votes_plot(scores: list[dict], manifest: dict) -> tuple[str, str]:
    vals = [(r.get("votes"), bool(r.get("selected"))) for r in scores if isinstance(r.get("votes"), int)]
    if not vals:
        return "", f'<p class="note">No stage-1 votes in this run (method {_e(manifest.get("method", "ntk"))}).</p>'
    v = np.array([a for a, _ in vals])
    sel = np.array([b for _, b in vals])
    fig, ax = new_figure(7, 3.4)
    bins = np.arange(v.min(), v.max() + 2) - 0.5 if v.max() - v.min() <= 60 else 40
    ax.hist([v[~sel], v[sel]], bins=bins, stacked=True, color=["#9aa7b8", "#dd8452"], label=["not selected", "selected"])
    ax.set_xlabel("stage-1 votes (domain examples that have the candidate among their K nearest)")
    ax.set_ylabel("candidates")
    ax.set_title("stage-1 votes of the candidates passed to stage 2")
    ax.legend(fontsize=8)
    s1 = manifest.get("stage1") or {}
    extra = f" K used {s1['k_used']}, {s1.get('voted_candidates', '?')} pool examples got a vote." if "k_used" in s1 else ""
    text = (
        f"{len(v)} candidates; votes {v.min()} .. {v.max()}, median {np.median(v):g} "
        f"(selected: median {np.median(v[sel]) if sel.any() else float('nan'):g}).{extra}"
    )
    return _img(fig, "stage-1 vote distribution"), f"<p>{_e(text)}</p>"


def _composition(manifest: dict, selected: list[dict]) -> str:
    summ = manifest.get("summary") or {}
    comp = summ.get("composition")
    if not comp:  # older or other runs: count what was selected
        comp = {k: [v, None] for k, v in collections.Counter(_group(r) or "(none)" for r in selected).most_common()}
    items = [(k, int(v[0]), v[1]) for k, v in comp.items()]
    n_sel = sum(s for _, s, _ in items) or 1
    n_pool = sum(p for _, _, p in items if p) or None
    parts = []
    top = sorted(items, key=lambda t: (-t[1], -(t[2] or 0), t[0]))[:20]
    fig, ax = new_figure(8, max(2.5, 0.28 * len(top) + 1))
    y = np.arange(len(top))[::-1]
    ax.barh(y + 0.2, [100 * s / n_sel for _, s, _ in top], height=0.4, color="#dd8452", label="share of the selected set")
    if n_pool:
        ax.barh(y - 0.2, [100 * (p or 0) / n_pool for _, _, p in top], height=0.4, color="#9aa7b8", label="share of the pool")
    ax.set_yticks(y, [k[:40] for k, _, _ in top], fontsize=7)
    ax.set_xlabel("%")
    ax.set_title(f"composition by subject/source (the {len(top)} largest in the selection)")
    ax.legend(fontsize=8)
    parts.append(_img(fig, "composition of the selected set against the pool"))
    rows = [
        (k, s, p if p is not None else "", f"{100 * s / n_sel:.1f}", f"{100 * p / n_pool:.1f}" if (p and n_pool) else "", f"{100 * s / p:.1f}" if p else "")
        for k, s, p in sorted(items, key=lambda t: (-t[1], t[0]))
    ]
    parts.append(
        "<h3>By subject or source</h3>"
        + _table(["group", "selected", "in pool", "% of selected", "% of pool", "% of group selected"], rows, [False, True, True, True, True, True])
    )
    src = summ.get("by_source")
    if src:
        parts.append("<h3>By source</h3>" + _table(["source", "selected", "in pool"], [(k, v[0], v[1]) for k, v in src.items()], [False, True, True]))
    return "\n".join(parts)


def _examples(run: dict, top: int, neighbours: int) -> str:
    selected, scores, domain = run["selected"], run["scores"], run["domain"]
    if not selected:
        return '<p class="note">selected.jsonl is empty or missing.</p>'
    ranked = sorted(((rank_of(r, i + 1), r) for i, r in enumerate(selected)), key=lambda t: t[0])
    sel_rows = [s for s in scores if s.get("selected")]
    votes_by_id = {str(s.get("id")): s.get("votes") for s in scores}
    picks = ranked[:top] + [t for t in ranked[-top:] if t[0] > ranked[min(top, len(ranked)) - 1][0]]
    texts = [_record_text(r) for _, r in picks]
    near = nearest_domain(texts, [_record_text(d.raw) for d in domain], neighbours) if domain else [[] for _ in picks]
    rows = []
    for (rank, r), text, nn in zip(picks, texts, near):
        votes = votes_by_id.get(str(r["id"])) if "id" in r else (sel_rows[rank - 1].get("votes") if 0 < rank <= len(sel_rows) else None)
        nn_html = "".join(f'<div class="text">[{_e(domain[i].id)}] sim {sim:.2f}: {_e(_snippet(_record_text(domain[i].raw), 240))}</div>' for i, sim in nn)
        rows.append(
            (
                rank,
                score_of(r),
                votes if votes is not None else "",
                _group(r),
                _Raw(f'<div class="text">{_e(_snippet(text))}</div>'),
                _Raw(nn_html or '<span class="note">(no domain examples)</span>'),
            )
        )
    note = "" if domain else f'<p class="note">Nearest domain examples unavailable: {_e(run["domain_note"])}.</p>'
    return (
        f"<p>The {min(top, len(ranked))} best and {len(picks) - min(top, len(ranked))} lowest-ranked selected examples; next to each, its "
        f"{neighbours} nearest domain examples by TF-IDF cosine over content words (a lexical view, independent of the model).</p>{note}"
        + _table(
            ["rank", "score", "votes", "subject/source", "selected example", "nearest domain examples"], rows, [True, True, True, False, False, False], raw=True
        )
    )


def _kv_table(d: dict) -> str:
    return _table(["key", "value"], [(k, v) for k, v in d.items()])


def render_report(run: dict, top: int = 5, neighbours: int = 3) -> str:
    """The HTML page for a loaded run (see :func:`load_run`). Text in the plots is literal: a
    subject or source named ``$x$`` is shown as written, never parsed as mathtext."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        return _render(run, top, neighbours)


def _render(run: dict, top: int, neighbours: int) -> str:
    m = run["manifest"]
    summ = m.get("summary") or {}
    method = m.get("method", "ntk")
    title = f"ntkselect report: {run['dir'].name}"
    score_img, score_text = _score_plot(run["scores"])
    votes_img, votes_text = _votes_plot(run["scores"], m)
    summary_rows = [
        ("method", method),
        ("domain examples", summ.get("n_domain", "")),
        ("pool examples", summ.get("n_pool", "")),
        ("selected", summ.get("n_selected", len(run["selected"]))),
        ("scored candidates", len(run["scores"])),
    ]
    for key in ("score_range_selected", "score_range_all"):
        if summ.get(key):
            summary_rows.append((key.replace("_", " "), " .. ".join(f"{v:.4g}" for v in summ[key])))
    if m.get("command"):
        summary_rows.append(("command", m["command"]))
    inputs = m.get("inputs") or {}
    for name in ("domain", "pool"):
        if isinstance(inputs.get(name), dict):
            summary_rows.append((f"{name} file", f"{inputs[name].get('path', '')} (sha256 {str(inputs[name].get('sha256', ''))[:12]}…)"))
    timings = m.get("timings") or {}
    timing_html = (
        _table(["stage", "seconds"], [(k, f"{v:.1f}" if isinstance(v, (int, float)) else v) for k, v in timings.items()], [False, True])
        if timings
        else '<p class="note">No timings in the manifest.</p>'
    )
    s2 = m.get("stage2") or {}
    if isinstance(s2.get("seconds"), dict):
        timing_html += "<h3>Stage 2 in detail</h3>" + _table(["part", "seconds"], [(k, f"{v:.1f}") for k, v in s2["seconds"].items()], [False, True])
    cfg_html = _kv_table(m.get("config") or {}) if m.get("config") else '<p class="note">No configuration in the manifest.</p>'
    for key, label in (("warmup", "Warm-up"), ("stage1", "Stage 1"), ("stage2", "Stage 2"), ("runtime", "Runtime"), ("versions", "Versions")):
        if isinstance(m.get(key), dict):
            cfg_html += f"<h3>{label}</h3>" + _kv_table({k: v for k, v in m[key].items() if not (key == "stage2" and k == "seconds")})
    sections = {
        "summary": _table(["", ""], summary_rows),
        "scores": score_img + score_text,
        "votes": votes_img + votes_text,
        "composition": _composition(m, run["selected"]),
        "examples": _examples(run, top, neighbours),
        "timings": timing_html,
        "configuration": cfg_html,
    }
    nav = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name in _SECTIONS)
    body = "\n".join(f'<section id="{sid}"><h2>{_e(name)}</h2>\n{sections[sid]}\n</section>' for sid, name in _SECTIONS)
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{_e(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n'
        f'<h1>{_e(title)}</h1>\n<p class="meta">{_e(run["dir"])} · written {_e(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>\n'
        f"<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )


def build_report(run_dir: str | Path, out: str | Path | None = None, top: int = 5, neighbours: int = 3) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) for a finished selection run; returns its path."""
    if top <= 0 or neighbours <= 0:
        raise NtkSelectError(f"--{'top' if top <= 0 else 'neighbours'} must be a positive integer")
    require_matplotlib()
    if out:
        page = render_report(load_run(run_dir), top, neighbours)
        path = Path(out)
        try:
            with atomic_open(path) as f:
                f.write(page)
        except OSError as err:
            raise NtkSelectError(f"cannot write {path}: {err.strerror or err}") from None
        return path
    # into the run folder: its lock first (a run being written or replaced is not read), and only
    # over a report.html that ntkselect wrote (runfolder.py)
    if not Path(run_dir).is_dir():
        raise NtkSelectError(f"{run_dir} is not a folder; pass the --out folder of a selection run")
    check_paths(run_dir, SELECT, {}, flag="run folder")
    with open_run(run_dir, SELECT, flag="run folder", log=lambda _: None, only=("report.html",)) as rf:
        page = render_report(load_run(run_dir), top, neighbours)
        rf.in_place(clear=False)
        with atomic_open(rf.out / "report.html") as f:
            f.write(page)
        rf.commit()
    return rf.out / "report.html"
