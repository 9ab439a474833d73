"""`python tests/faultrun.py kill-after:NAME evalsuite-args...`: the CLI, killed with SIGKILL once pass NAME is saved.

The interruption tests' seam lives here, not in production code: this launcher replaces the pass
loop's no-op `after_pass` before calling the same `main` a user runs.
"""

from __future__ import annotations

import os
import signal
import sys

from evalsuite.cli import main
from evalsuite.passes import loop


def _kill_after(name: str):
    def after_pass(current, finished: str) -> None:
        if finished == name:
            current.writer.join()  # the pass's background writes are complete, as after a real crash point
            os.kill(os.getpid(), signal.SIGKILL)

    return after_pass


if __name__ == "__main__":
    fault, *argv = sys.argv[1:]
    kind, _, name = fault.partition(":")
    if kind != "kill-after":
        raise SystemExit(f"unknown fault {fault!r}: use kill-after:<pass name>")
    loop.after_pass = _kill_after(name)
    sys.exit(main(argv))
