"""A one-line progress report on stderr, shared by captioning, evaluation and conversion."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s`."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """`label done/total (rate, time left)` on stderr.

    On a terminal the line is redrawn in place; elsewhere a line is written every tenth of the
    way, or nothing with `terminal_only` (for long silent jobs whose logs should stay clean).
    `enabled=False` prints nothing at all (`--quiet`).

    Args:
        total: the amount of work (items or bytes).
        label: what is counted, e.g. "captioned".
        unit: the rate's unit ("images", "q") or "bytes" for sizes written as KB/MB/GB.
    """

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "items",
        stream: Optional[TextIO] = None,
        enabled: bool = True,
        terminal_only: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total, self.label, self.unit = total, label, unit
        self.stream = sys.stderr if stream is None else stream
        self.tty = enabled and self.stream.isatty()
        self.enabled = enabled and (self.tty or not terminal_only)
        self.every = max(1, total // 10)
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.extra = ""
        self._last_line = -1

    def _amount(self, n: float) -> str:
        return format_bytes(n) if self.unit == "bytes" else str(int(n))

    def update(self, done: int, extra: str = "") -> None:
        """Report `done` of `total`; `extra` is appended (e.g. ", 2 skipped")."""
        self.done, self.extra = done, extra
        if not self.enabled:
            return
        if not self.tty:
            bucket = done // self.every
            if (bucket == self._last_line or done % self.every) and done != self.total:
                return
            self._last_line = bucket
        elapsed = self.clock() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else 0.0
        speed = f"{format_bytes(rate)}/s" if self.unit == "bytes" else f"{rate:.2f} {self.unit}/s"
        line = (
            f"{self.label} {self._amount(done)}/{self._amount(self.total)}{extra} "
            f"({speed}, {format_duration(left)} left)"
        )
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line (a warning) without mangling the progress line."""
        if self.tty and self.done:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        if self.tty and self.done:
            self.update(self.done, self.extra)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()
