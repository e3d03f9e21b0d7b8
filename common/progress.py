"""Progress for long operations: a live line on a terminal, a line per step in the log."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Optional

from .log import get_logger


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """`p = Progress('restoring', total=12)`; `p.step('public.orders')` per item; `p.done()`."""

    def __init__(self, what: str, total: Optional[int] = None, unit: str = "tables"):
        self.what, self.total, self.unit = what, total, unit
        self.count = 0
        self.started = time.monotonic()
        self.live = sys.stdout.isatty()
        self._last_draw = 0.0
        self.log = get_logger()

    def step(self, item: str = "", extra: str = "") -> None:
        self.count += 1
        self.log.debug("%s: %s%s (%s)", self.what, item, f" {extra}" if extra else "", self._counter())
        self.draw(extra)

    def bytes(self, done: int, total: Optional[int] = None) -> None:
        total_text = f" of {human_size(total)}" if total else ""
        self.draw(f"{human_size(done)}{total_text}")

    def _counter(self) -> str:
        return f"{self.count}/{self.total} {self.unit}" if self.total else f"{self.count} {self.unit}"

    def draw(self, extra: str = "") -> None:
        now = time.monotonic()
        if not self.live or now - self._last_draw < 0.2:
            return
        self._last_draw = now
        text = f"  {self.what}: {self._counter()}" + (f", {extra}" if extra else "")
        sys.stdout.write("\r" + text[:100].ljust(100))
        sys.stdout.flush()

    def done(self) -> float:
        if self.live and self._last_draw:
            sys.stdout.write("\r" + " " * 100 + "\r")
            sys.stdout.flush()
        return time.monotonic() - self.started


@contextmanager
def timed(step: str):
    """Log a step's duration at DEBUG: the run log shows where the time went."""
    started = time.monotonic()
    try:
        yield
    finally:
        get_logger().debug("step %s: %.3f s", step, time.monotonic() - started)
