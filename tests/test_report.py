"""The run report: every section from a real (tiny-model) run folder, robustness to older and
other-method runs, one-line errors, and a render in headless Chromium when one is installed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ntkselect.cli.main import main
from ntkselect.report.html import build_report, nearest_domain, rank_of, score_of

SECTIONS = ("summary", "scores", "votes", "composition", "examples", "timings", "configuration")


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    assert (
        main(
            [
                "demo",
                "--model",
                tiny_model_dir,
                "--domain-size",
                "8",
                "--pool-mmlu",
                "24",
                "--pool-reasoning",
                "4",
                "--n",
                "6",
                "--out",
                str(out),
                "--warmup-epochs",
                "0",
                "--knn-k",
                "4",
                "--precision",
                "float32",
            ]
        )
        == 0
    )
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("adapter", "report.html"))
    return dst


def _count(page: str, tag: str) -> int:
    return len(re.findall(rf"<{tag}[\s>]", page))


def _no_network(page: str) -> None:
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)  # every src/href is a data: URI or a #fragment
    assert "url(" not in page
    assert "default-src 'none'" in page  # and the CSP forbids any request that might slip through


def test_report_has_every_section_plot_and_table(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    path = run_dir / "report.html"
    assert str(path) in capsys.readouterr().out
    page = path.read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert _count(page, "img") == 3  # scores, votes, composition
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)) == 3
    assert _count(page, "table") >= 8
    _no_network(page)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert "cut-off (lowest selected score)" in page
    assert f"{m['summary']['score_range_selected'][0]:.4g}" in page
    for group in m["summary"]["composition"]:  # the composition table lists every group
        assert f"<td>{group}</td>" in page
    ex = page.split('<section id="examples">')[1].split("</section>")[0]
    assert ex.count("<tr>") == 1 + 6  # header + the 6 selected (5 best and the 1 lowest-ranked)
    assert "sim " in ex and "[" in ex  # nearest domain examples, with their ids
    for stage in m["timings"]:
        assert f"<td>{stage}</td>" in page
    assert "knn_k" in page and "torch" in page  # configuration and versions


def test_report_reads_renamed_fields_and_other_methods(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    m = json.loads((run / "manifest.json").read_text())
    m["method"] = "random"
    for key in ("timings", "stage1", "stage2", "warmup", "config", "versions", "inputs", "outputs"):  # as an older run's (no checksums of its files)
        m.pop(key)
    m["summary"].pop("by_source")
    (run / "manifest.json").write_text(json.dumps(m))
    rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    # the older field names (ntk_score, ntk_rank), no votes
    (run / "scores.jsonl").write_text("".join(json.dumps({"id": r["id"], "ntk_score": score_of(r), "selected": r["selected"]}) + "\n" for r in rows))
    sel = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
    renamed = [
        {
            **{k: v for k, v in r.items() if k not in ("score", "rank", "selection_score", "selection_rank", "selection_method")},
            "ntk_score": score_of(r),
            "ntk_rank": rank_of(r, 0),
        }
        for r in sel
    ]
    (run / "selected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))
    page = build_report(run).read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert "No stage-1 votes in this run (method random)" in page
    assert "No timings in the manifest" in page and "No configuration in the manifest" in page
    assert "nearest domain examples unavailable" in page.lower()  # the manifest names no domain file any more
    assert _count(page, "img") == 2
    assert f"{score_of(sel[0]):.4g}" in page and "cut-off" in page
    _no_network(page)


def test_score_and_rank_fall_back_to_the_ntk_fields():
    assert score_of({"score": 1.5, "ntk_score": 2.0}) == 1.5 and score_of({"ntk_score": 2.0}) == 2.0 and score_of({"score": None}) is None
    assert score_of({"selection_score": 0.5}) == 0.5 and rank_of({"selection_rank": 4}, 9) == 4
    assert rank_of({"ntk_rank": 3}, 9) == 3 and rank_of({"rank": 1, "ntk_rank": 3}, 9) == 1 and rank_of({}, 9) == 9


def test_nearest_domain_by_tfidf():
    domain = ["the heart pumps blood", "kidneys filter blood", "a contract binds two parties", "the heart has four chambers"]
    near = nearest_domain(["what does the heart do", "contract law parties", "zebra"], domain, k=2)
    assert [i for i, _ in near[0]] == [0, 3] or [i for i, _ in near[0]] == [3, 0]
    assert near[1][0][0] == 2 and 0 < near[1][0][1] <= 1
    assert near[2] == []  # no shared word
    assert nearest_domain(["the heart pumps blood"], domain, k=1)[0][0] == (0, pytest.approx(1.0))


def test_report_on_a_folder_without_a_manifest_is_one_line(tmp_path):
    (tmp_path / "selected.jsonl").write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "ntkselect", "report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("ntkselect: error:")]
    assert len(err) == 1 and "manifest.json" in err[0]
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "report.html").exists()


def test_report_with_a_damaged_scores_file_names_the_line(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    m = json.loads((run / "manifest.json").read_text())
    m.pop("outputs")  # an older run's manifest: its files are not checked by hash, so the parse names the line
    (run / "manifest.json").write_text(json.dumps(m))
    (run / "scores.jsonl").write_text('{"id": "1", "ntk_score": 1.0, "selected": true}\n{broken\n')
    assert main(["report", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = [x for x in lines if x.startswith("ntkselect: error:")]
    assert len(err) == 1 and "scores.jsonl:2" in err[0]
    assert len(lines) == 2 and "has no checksums of the run's files (written by an older ntkselect)" in lines[0]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browse(args: list[str], tmp_path: Path, timeout: float) -> tuple[int | None, str, str]:
    """Run headless Chromium in its own session with its output in files, never pipes: its
    helper processes outlive a killed browser and would hold a pipe open, so that waiting for
    the output hangs forever (a CI run stopped at this test for 90 minutes). On a timeout the
    whole session is killed and the return code is None."""
    out, err = tmp_path / "browser.out", tmp_path / "browser.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=o, stderr=e, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # the browser's helpers too, whichever way it ended
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, out.read_text(errors="replace"), err.read_text(errors="replace")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (install Debian's `chromium` package to render the report)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    path = build_report(run_dir, out=tmp_path / "report.html")
    base = [
        str(_chromium()),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        # no network here: without these Chromium keeps trying to reach its services
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ]
    # the browser itself first: one that cannot show a one-line page is this machine's problem, not the report's
    probe = tmp_path / "probe.html"
    probe.write_text("<p id=probe>ok</p>")
    code, html, err = _browse([*base, "--dump-dom", probe.as_uri()], tmp_path, timeout=90)
    if code != 0 or 'id="probe"' not in html:
        pytest.skip(f"this machine's chromium does not render a one-line page (exit {code}): {err.strip()[-300:]}")
    code, html, err = _browse([*base, "--dump-dom", path.as_uri()], tmp_path, timeout=120)
    assert code == 0, err[-2000:]
    assert html.count("<img") == 3 and html.count("<table") >= 8
    for sid in SECTIONS:
        assert f'id="{sid}"' in html
    shot = tmp_path / "shot.png"
    code, _, err = _browse([*base, f"--screenshot={shot}", "--window-size=1200,3000", path.as_uri()], tmp_path, timeout=120)
    assert code == 0, err[-2000:]
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
