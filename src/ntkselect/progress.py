"""Progress lines with examples/s, tokens/s and ETA.

On a terminal one line is redrawn in place; otherwise (logs, CI) a plain line is printed at
most every ``interval`` seconds, so long runs stay readable in a file.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, desc: str, total: int, stream=None, interval: float = 10.0, enabled: bool = True):
        self.desc, self.total = desc, max(int(total), 0)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else interval
        self.enabled = enabled
        self.done = self.tokens = 0
        self.start = self._last = time.perf_counter()

    def update(self, examples: int, tokens: int = 0) -> None:
        self.done += examples
        self.tokens += tokens
        now = time.perf_counter()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            self._emit(final=False)

    def line(self) -> str:
        el = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (f"{self.desc}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%) "
                f"{rate:.1f} ex/s {self.tokens / el:.0f} tok/s elapsed {_fmt_time(el)} ETA {_fmt_time(eta)}")

    def _emit(self, final: bool) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> float:
        """Print the final line; returns the elapsed seconds."""
        if self.tty or self.done < self.total:
            self._emit(final=True)
        return time.perf_counter() - self.start
