"""Where a run's wall time went: every second in exactly one phase, so the phases sum to the wall.

Why a clock of its own: per-pass timings (`load_s`, `pass_s`) leave out what a user pays for
between them (imports, hashing, weight statistics, benchmarks, writing) and a run's figures did
not add up to `time evalsuite run`. Entering a phase pauses the phase around it; a phase entered
inside another is recorded under both names ("repair/load"), so a reader can sum by prefix and
no second is counted twice. The clock starts at the process's start (Linux: /proc), so imports
count too.

The active clock is found through a context variable the run sets (like log.only_rank0's
filter), so the passes, observers and stores mark phases without a clock passed through every
signature; with no clock active, `phase` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Iterator
from pathlib import Path

_ACTIVE: contextvars.ContextVar[Phases | None] = contextvars.ContextVar("evalsuite_phases", default=None)


def process_started() -> float:
    """The `time.perf_counter()` reading at which this process started (where unknown: now)."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = float(Path("/proc/uptime").read_text().split()[0]) - int(stat[19]) / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - max(age, 0.0)  # stat[19]: field 22, starttime in clock ticks
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


class Phases:
    """Exclusive wall-clock seconds by phase name, from `start` (a perf_counter reading)."""

    def __init__(self, start: float | None = None, first: str = "startup"):
        self.start = time.perf_counter() if start is None else start
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = [[first, self.start]]  # [name, running since]

    def _bank(self, now: float) -> None:
        name, since = self._stack[-1]
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        self._stack[-1][1] = now

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        self._bank(now)
        outer = self._stack[-1][0]
        nested = name if len(self._stack) == 1 or outer == name else f"{outer.split('/')[0]}/{name}"
        self._stack.append([nested, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self._bank(now)
            self._stack.pop()
            self._stack[-1][1] = now

    def enter(self, name: str) -> None:
        """Switch the outermost running phase to `name` (for a sequence of top-level steps)."""
        self._bank(time.perf_counter())
        self._stack[-1][0] = name

    def report(self) -> dict[str, float]:
        """{phase_s: seconds, ..., "wall_s": since start}; the phases sum to wall_s."""
        now = time.perf_counter()
        self._bank(now)  # only the innermost phase is running; the ones around it are paused
        out = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()}
        out["wall_s"] = round(now - self.start, 3)
        return out


@contextlib.contextmanager
def active(clock: Phases) -> Iterator[Phases]:
    """Make `clock` the one `phase` marks, for the block's duration."""
    token = _ACTIVE.set(clock)
    try:
        yield clock
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's wall time to `name` on the active clock (none: just run it)."""
    clock = _ACTIVE.get()
    if clock is None:
        yield
        return
    with clock(name):
        yield


def current_name() -> str | None:
    """The innermost running phase of the active clock ("test_pass", "repair/load"), or None."""
    clock = _ACTIVE.get()
    return clock._stack[-1][0] if clock is not None else None
