"""Terminal output shared by the CLIs and pipelines (imports nothing of rayfp4)."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """One self-overwriting progress line on stderr (a full line per update when not a terminal)."""

    def __init__(self, label: str, stream=None, min_interval_s: float = 0.5):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.monotonic()
        self.last = 0.0
        self.min_interval_s = min_interval_s if self.tty else max(min_interval_s, 5.0)

    def update(self, **counts: int) -> None:
        now = time.monotonic()
        if now - self.last < self.min_interval_s:
            return
        self.last = now
        body = ", ".join(f"{v:,} {k}" for k, v in counts.items())
        self._emit(f"[{self.label}] {body} ({now - self.start:.1f} s)")

    def note(self, message: str) -> None:
        """A line that is kept (a phase starting), whatever the rate limit."""
        self._emit(f"[{self.label}] {message}", final=True)

    def done(self, message: str) -> None:
        self._emit(f"[{self.label}] {message} in {time.monotonic() - self.start:.1f} s", final=True)

    def _emit(self, text: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
