"""A one-line progress report for long data jobs: lines, MB/s, share done, ETA (to stderr).

Why "only when useful": a run that ends within `quiet_s` prints nothing, so small jobs and
tests stay silent; on a terminal the line is rewritten in place every `tty_interval_s`, in a
log file a new line is written every `log_interval_s`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Reports input consumed against `total_bytes` (bytes on disk, gzip files compressed)."""

    def __init__(
        self,
        total_bytes: int,
        *,
        label: str,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        quiet_s: float = 1.0,
        tty_interval_s: float = 0.5,
        log_interval_s: float = 30.0,
    ) -> None:
        """`enabled` None: report when `stream` is a terminal."""
        self.stream = sys.stderr if stream is None else stream
        self.total_bytes = total_bytes
        self.label = label
        self.is_tty = self.stream.isatty()
        self.enabled = self.is_tty if enabled is None else enabled
        self.quiet_s = quiet_s
        self.interval_s = tty_interval_s if self.is_tty else log_interval_s
        self.lines = 0
        self.input_bytes = 0
        self._start = time.monotonic()
        self._last_report = self._start
        self._reported = False

    def update(self, *, lines: int, input_bytes: int) -> None:
        """Count a finished piece of work."""
        self.lines += lines
        self.input_bytes += input_bytes
        now = time.monotonic()
        if self.enabled and now - self._start >= self.quiet_s:
            if not self._reported or now - self._last_report >= self.interval_s:
                self._report(now)

    def close(self) -> None:
        """A final line (only if a report was printed before)."""
        if self._reported:
            self._report(time.monotonic())
            if self.is_tty:
                self.stream.write("\n")
                self.stream.flush()

    def line(self, now: float) -> str:
        elapsed_s = max(now - self._start, 1e-9)
        rate = self.input_bytes / elapsed_s
        share = self.input_bytes / self.total_bytes if self.total_bytes else 1.0
        eta_s = (self.total_bytes - self.input_bytes) / rate if rate > 0 else float("inf")
        eta = "?" if eta_s == float("inf") else _clock(eta_s)
        return (
            f"{self.label}: {self.lines:,} lines, {rate / 1e6:.1f} MB/s, {share:.0%} of "
            f"{self.total_bytes / 1e6:,.1f} MB, {self.lines / elapsed_s:,.0f} lines/s, ETA {eta}"
        )

    def _report(self, now: float) -> None:
        self._reported = True
        self._last_report = now
        text = self.line(now)
        self.stream.write(f"\r{text}\x1b[K" if self.is_tty else text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
