"""evalsuite's voice: one line per message on stderr, `evalsuite: ...`, and one voice per run.

Why stdlib logging and not a print: a data-parallel run has N processes saying the same
thing; `only_rank0` installs a filter for the run's duration (and removes it after), so no
module keeps a mutable "quiet" flag and tests that run several ranks in one process stay
independent. The handler looks `sys.stderr` up at each message so pytest's capture sees it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

_LOGGER = logging.getLogger("evalsuite")


class _Stderr(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"evalsuite: {record.getMessage()}", file=sys.stderr, flush=True)


if not _LOGGER.handlers:
    _LOGGER.addHandler(_Stderr())
    _LOGGER.setLevel(logging.INFO)
    _LOGGER.propagate = False


def say(message: str) -> None:
    """Tell the user something about the run (progress, a skipped dtype, where results went)."""
    _LOGGER.info(message)


@contextlib.contextmanager
def only_rank0(rank: int) -> Iterator[None]:
    """Silence `say` while the block runs, unless `rank` is 0."""
    if rank == 0:
        yield
        return
    muted = logging.Filter("evalsuite.never")  # matches no record of the "evalsuite" logger
    _LOGGER.addFilter(muted)
    try:
        yield
    finally:
        _LOGGER.removeFilter(muted)
