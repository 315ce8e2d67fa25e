"""Live progress from rank 0 to the driver, through a small Ray actor the driver polls.

``print`` inside Ray Train workers is duplicated on the driver and mixed with Ray's logs; the
driver owns the terminal, so rank 0 posts its numbers here and the driver prints one line.
"""

from __future__ import annotations

import sys
import threading
import time

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self):
        self.latest: dict = {}
        self.notices: list[str] = []

    def post(self, record: dict) -> None:
        self.latest = record

    def notice(self, message: str) -> None:
        """Something the user must read (a checkpoint that did not load), printed on its own line."""
        self.notices.append(message)

    def get(self) -> tuple[dict, list[str]]:
        return self.latest, self.notices


def format_progress(rec: dict, label: str) -> str:
    step, total = rec.get("step", 0), rec.get("total_steps", 0)
    eta = rec.get("eta_s")
    eta_s = f"{int(eta) // 60}m{int(eta) % 60:02d}s" if eta is not None else "?"
    parts = [f"[{label}]" if label else "", f"step {step}/{total}", f"loss {rec.get('train_loss', float('nan')):.4f}"]
    if rec.get("val_loss") is not None:
        parts.append(f"val {rec['val_loss']:.4f}")
    parts += [f"{rec.get('tokens_per_s', 0):,.0f} tok/s", f"ETA {eta_s}"]
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']}")
    return " ".join(p for p in parts if p)


class ProgressPrinter:
    """Polls a board in a thread and prints a progress line (in place on a terminal)."""

    def __init__(self, board, label: str, interval_s: float = 1.0, min_print_s: float = 5.0):
        self.board, self.label = board, label
        self.interval_s, self.min_print_s = interval_s, min_print_s
        self.tty = sys.stdout.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last_step, self._last_print = None, 0.0
        self._notices_seen = 0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll(final=True)
        if self.tty:
            print(flush=True)

    def _poll(self, final: bool = False) -> None:
        try:
            # The last poll waits longer: the notices it may still carry (a resume, a restart)
            # are printed nowhere else, and a loaded machine can be slow to answer.
            rec, notices = ray.get(self.board.get.remote(), timeout=30 if final else 5)
        except Exception:
            return
        for msg in notices[self._notices_seen:]:
            print(("\n" if self.tty else "") + f"[rayfp4] {self.label + ': ' if self.label else ''}{msg}", flush=True)
        self._notices_seen = len(notices)
        if not rec or rec.get("step") == self._last_step:
            return
        now = time.monotonic()
        if not self.tty and not final and now - self._last_print < self.min_print_s:
            return
        self._last_step, self._last_print = rec.get("step"), now
        line = format_progress(rec, self.label)
        if self.tty:
            print("\r" + line.ljust(100), end="", flush=True)
        else:
            print(line, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()
