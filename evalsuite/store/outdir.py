"""One writer per output directory, and no silent mix of two runs' files.

Why a lock: two identical runs started at once into one --out both ran to the end and both
wrote, the last writer winning. An OS lock (flock) dies with its process, so a killed run never
leaves a stale lock that blocks its own resume. Why the settings check: a finished --out rerun
with other options used to be overwritten without a word; now that needs --overwrite (or
--fresh), so a directory's results.json always belongs to the command that last ran there.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from evalsuite.errors import UsageError

IGNORED = {"out_dir", "progress"}  # options that differ between reruns of "the same command" harmlessly


@contextlib.contextmanager
def claim(out_dir: Path, config: dict, rank: int | None = None, overwrite: bool = False) -> Iterator[None]:
    """Hold `out_dir` for this run (per data-parallel rank); refuse another run's finished results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not overwrite and (rank or 0) == 0:
        _check_finished(out_dir, config)
    lock = out_dir / (f".lock-rank{rank}" if rank is not None else ".lock")
    with open(lock, "a+") as fh:
        if not _try_lock(fh):
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise UsageError(f"another evalsuite run (pid {holder}) is writing to {out_dir}: wait for it to finish, "
                             "or pass another --out")
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            _unlock(fh)


def _try_lock(fh) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return True
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fh) -> None:
    with contextlib.suppress(ImportError):
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_finished(out_dir: Path, config: dict) -> None:
    path = out_dir / "results.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("config") or {}
    except (OSError, ValueError, AttributeError):
        old = None
    if old is None:
        raise UsageError(f"{out_dir} holds a results.json that is not an evalsuite run's: pass --overwrite to "
                         "replace it, or another --out")
    differ = [k for k in sorted(set(old) | set(config)) if k not in IGNORED and old.get(k) != config.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} then, {config.get(k)!r} now" for k in differ[:3])
        raise UsageError(f"{out_dir} holds the finished results of a run with other options ({shown}): pass "
                         "--overwrite to replace them, or another --out")
