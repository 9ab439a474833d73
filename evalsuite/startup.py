"""What the process does around the heavy imports: keep compiled bytecode where there is none
before them, and skip tearing them down after.

Why: torch and transformers are about 2,600 Python modules. Where their site-packages is
read-only (a container image, a shared environment) and ships no compiled bytecode, every new
process compiles them all again: 8.4 s of `compile` in a cProfile of `evalsuite run` on the H200
host (perf/profile_cached.sh), paid again by each run. Python can keep that bytecode elsewhere
(`sys.pycache_prefix`, PYTHONPYCACHEPREFIX); evalsuite points it into its own cache directory,
only where the interpreter could not cache it next to the sources itself.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
import threading
from pathlib import Path

PROBE = "torch"  # the largest import; its site-packages stands for the others


def bytecode_cache(root: Path) -> Path | None:
    """Set sys.pycache_prefix to `root`/pycache where PROBE's bytecode is neither next to its
    sources nor writable there; return it (None where nothing needed doing or could be done)."""
    if sys.pycache_prefix is not None or sys.dont_write_bytecode:
        return None  # the user chose already
    try:
        spec = importlib.util.find_spec(PROBE)  # finds the package without importing it
        origin = spec.origin if spec is not None else None
        if not origin or not origin.endswith(".py"):
            return None
        if os.path.exists(importlib.util.cache_from_source(origin)) or os.access(os.path.dirname(origin), os.W_OK):
            return None  # compiled once already, or Python will write it there itself
        prefix = root / "pycache"
        prefix.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError, ImportError, NotImplementedError):
        return None  # only a speed-up: never a reason not to run
    sys.pycache_prefix = str(prefix)
    return prefix


def leave(code: int) -> None:
    """End the process with exit status `code` without the interpreter's own teardown.

    Why: once the CLI has returned, every output is closed and written, and what is left is
    Python freeing the objects of torch, transformers and the run one by one: 0.6 s after
    `import torch` alone and 1.4 s after loading and running a 270M model on this project's
    2-core CPU (os._exit: 0.02-0.06 s), seconds that `time evalsuite run` counts and no phase can.
    The exit handlers still run (logging's flush, coverage, whatever a plugin registered); only
    where a thread that is not a daemon is still running does this fall back to a normal exit,
    which waits for it.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if any(t.is_alive() for t in others):
        sys.exit(code)
    atexit._run_exitfuncs()  # what sys.exit would run; registered functions run once
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(code)
