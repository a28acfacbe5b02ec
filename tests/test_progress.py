"""Progress bars (ntkselect.progress, on tqdm): plain lines at most every interval in a log, the
rates and ETA in them, nothing when disabled, and nothing more from a bar its stage abandoned."""

from __future__ import annotations

import gc
import io
import re
import time

from ntkselect.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_at_most_every_interval_and_the_end_once():
    s = io.StringIO()
    p = Progress("stage 1: embeddings", 40, stream=s, interval=0.1)
    t = time.perf_counter()
    for _ in range(40):
        time.sleep(0.01)
        p.update(1, 25)
    elapsed = p.close()
    assert elapsed >= time.perf_counter() - t - 0.05
    lines = s.getvalue().splitlines()
    assert "\r" not in s.getvalue() and all(ln.startswith("stage 1: embeddings:") for ln in lines)
    assert 2 <= len(lines) <= (time.perf_counter() - t) / 0.1 + 1
    last = lines[-1]
    assert "100% 40/40" in last and re.search(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+ex/s, \d+ tok/s\]", last), last
    assert sum("40/40" in ln for ln in lines) == 1  # the end is not drawn twice


def test_a_short_stage_gets_one_final_line():
    s = io.StringIO()
    p = Progress("warm-up", 3, stream=s, interval=10.0)
    p.update(2, 10)
    p.update(1, 5)
    p.close()
    assert s.getvalue().count("\n") == 1 and "100% 3/3" in s.getvalue() and "tok/s" in s.getvalue()


def test_disabled_prints_nothing_and_still_counts():
    s = io.StringIO()
    p = Progress("stage 2", 5, stream=s, interval=0.0, enabled=False)
    p.update(5, 50)
    assert "5/5" in p.line()
    assert p.close() >= 0 and s.getvalue() == ""


def test_an_abandoned_bar_adds_no_line_after_the_error():
    s = io.StringIO()

    def stage():
        p = Progress("stage 1", 10, stream=s, interval=10.0)
        p.update(3, 30)
        raise ValueError("the stage failed")

    try:
        stage()
    except ValueError:
        s.write("ntkselect: error: the stage failed\n")
    gc.collect()
    assert s.getvalue() == "ntkselect: error: the stage failed\n"


def test_a_terminal_gets_one_bar_redrawn_in_place():
    s = _Terminal()
    p = Progress("stage 2", 4, stream=s)
    for _ in range(4):
        p.update(1, 8)
    p.close()
    out = s.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n") and "\r" in out and "4/4" in out.split("\r")[-1]
