"""`python tests/faultrun.py kill-after:NAME evalsuite-args...`: the CLI, killed (SIGKILL; term-after: SIGTERM)
once pass NAME is saved.

The interruption tests' seam lives here, not in production code: this launcher replaces the pass
loop's no-op `after_pass` before calling the same `main` a user runs.
"""

from __future__ import annotations

import os
import signal
import sys

from evalsuite.cli import main
from evalsuite.passes import loop

SIGNALS = {"kill-after": signal.SIGKILL, "term-after": signal.SIGTERM}


def _signal_after(name: str, sig: int):
    def after_pass(current, finished: str) -> None:
        if finished == name:
            current.writer.join()  # the pass's background writes are complete, as after a real crash point
            os.kill(os.getpid(), sig)

    return after_pass


if __name__ == "__main__":
    fault, *argv = sys.argv[1:]
    kind, _, name = fault.partition(":")
    if kind not in SIGNALS:
        raise SystemExit(f"unknown fault {fault!r}: use kill-after:<pass name> or term-after:<pass name>")
    loop.after_pass = _signal_after(name, SIGNALS[kind])
    sys.exit(main(argv))
