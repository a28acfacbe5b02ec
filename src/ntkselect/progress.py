"""Progress bars with examples/s, tokens/s and ETA, drawn by tqdm.

On a terminal tqdm redraws one bar in place. Anywhere else (a log file, CI) each redraw becomes
one plain line, at most every ``interval`` seconds and once at the end, so long runs stay
readable in a file::

    stage 1: embeddings:  40% 400/1000 [01:02<01:33, 6.42ex/s, 1843 tok/s]

``enabled=False`` prints nothing. tqdm's own ``TQDM_*`` environment variables set what these
calls leave open (``TQDM_DISABLE=1`` turns every bar off, for example).
"""

from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm

__all__ = ["Progress"]


class _Bar(tqdm):
    """tqdm without its monitor thread, and without a last redraw when a bar is dropped unclosed
    (its stage raised): the one-line error stays the last line on stderr."""

    monitor_interval = 0

    def __del__(self) -> None:
        self.disable = True


class _Lines:
    """A file for tqdm on a stream that is not a terminal: each redraw (``"\\r" + bar``) becomes one
    line; tqdm's erasing writes (blanks, a bare newline or carriage return) are dropped."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, s: str) -> None:
        line = s.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """``update(examples, tokens)`` after each batch, ``close()`` at the end (returns the seconds)."""

    def __init__(self, desc: str, total: int | None, stream=None, interval: float = 10.0, enabled: bool = True, show_end: bool = True):
        self.desc, self.total = desc, (None if total is None else max(int(total), 0))
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else interval
        self.enabled = enabled
        self.show_end = show_end  # False: a pass shorter than the interval leaves no line (reading a small file)
        self.done = self.tokens = 0
        self.start = time.perf_counter()
        # miniters=1: redraw whenever `interval` has passed (tqdm's adaptive skipping is for tight loops)
        common = dict(desc=desc, total=self.total, unit="ex", mininterval=self.interval, miniters=1)
        if not enabled:  # else left to tqdm, so that TQDM_DISABLE=1 still turns it off
            common["disable"] = True
        if self.tty:
            self._bar = _Bar(file=self.stream, dynamic_ncols=True, **common)
        else:  # no bar (ncols=0), the rate over the whole run (smoothing=0), no line before the first interval (delay)
            self._bar = _Bar(file=_Lines(self.stream), ncols=0, smoothing=0, delay=self.interval, position=0, **common)

    def update(self, examples: int, tokens: int = 0) -> None:
        self.done += examples
        self.tokens += tokens
        if self.enabled:
            self._bar.set_postfix_str(self._tok_rate(), refresh=False)
            self._bar.update(examples)

    def set_total(self, total: int) -> None:
        """A new (estimated) total, e.g. from the share of a file read so far; gives the ETA."""
        self.total = max(int(total), self.done)
        if self.enabled:
            self._bar.total = self.total

    def _tok_rate(self) -> str:
        return f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.0f} tok/s"

    def line(self) -> str:
        """The current state as one line, as written to a log."""
        return tqdm.format_meter(self.done, self.total, time.perf_counter() - self.start, ncols=0, prefix=self.desc, unit="ex", postfix=self._tok_rate())

    def close(self) -> float:
        """Draw the final state (once: not again when the last update already showed it); returns the elapsed seconds."""
        if self.enabled and not self._bar.disable:
            bar = self._bar
            bar.set_postfix_str(self._tok_rate(), refresh=False)
            if not self.tty:
                if bar.last_print_t < bar.start_t + bar.delay:  # never shown (a short stage): show the end once
                    if self.show_end:
                        bar.refresh()
                elif bar.last_print_n == bar.n:  # the last line shown is already the end
                    bar.leave = False
            bar.close()
        return time.perf_counter() - self.start
