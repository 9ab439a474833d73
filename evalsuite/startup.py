"""What the process does around the heavy imports: keep compiled bytecode where there is none
before them, skip tearing them down after, and stop the helper children it started (the
checkpoint's hash, the kernel's compile) when it leaves before they are done.

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
import subprocess
import sys
import threading
from pathlib import Path

PROBE = "torch"  # the largest import; its site-packages stands for the others
_children: set[subprocess.Popen] = set()  # helper children still running (spawn), stopped by stop_children
_children_lock = threading.Lock()  # makes starting one and stopping them all exclusive
_leaving = threading.Event()  # stop_children has run: no helper child starts any more


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


def spawn(cmd: list[str], **popen) -> subprocess.Popen | None:
    """subprocess.Popen(cmd, **popen) for a helper child that must not outlive the process: it is
    stopped by stop_children unless `reap`ed first. None once the process is leaving."""
    with _children_lock:
        if _leaving.is_set():
            return None
        proc = subprocess.Popen(cmd, **popen)
        _children.add(proc)
    return proc


def reap(proc: subprocess.Popen) -> None:
    """`proc` (from spawn) has ended: nothing to stop any more."""
    with _children_lock:
        _children.discard(proc)


def leaving() -> bool:
    """Whether stop_children has run: a helper child that ended now was stopped, not broken."""
    return _leaving.is_set()


@atexit.register
def stop_children(grace_s: float = 0.5) -> None:
    """Stop every helper child still running (terminate, `grace_s` to go, then kill) and start none
    from now on. An exit handler: a run that fails after setup (leave, sys.exit) while a first
    run still hashes a 13 GB checkpoint or compiles its kernel neither waits for that child nor
    leaves it running; the thread following it then gives up instead of doing the work itself."""
    with _children_lock:
        _leaving.set()
        procs = list(_children)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass  # unkillable (uninterruptible I/O): nothing more to do from here
