"""Content digests: what makes a reference-cache key (the checkpoint, the tokens, the code) and
what verifies its files (the kept hidden states, logits and head, hashed where they sit).

Split from store/refcache.py, which uses them; stores.digest_meanwhile hashes the checkpoint
with them while the tokenizer loads (a background thread that waits on a child process).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import torch

from evalsuite import startup
from evalsuite.store import filehash
from evalsuite.store.filehash import sha256_file
from evalsuite.store.results import atomic_write_text

_SKIP_SUFFIXES = (".md", ".lock")
_ROWS_PER_DIGEST_CHUNK = 256
# Threads that hash a checkpoint in the background (stores.digest_meanwhile) while the run starts
# up: all but one core, at most four (a 13 GB shard's hash stays shorter than the start-up it
# hides behind). They run in a child process (filehash.py says why); in-process threads had made
# the main thread's start-up slower than the hash itself (perf/profile_cold.sh, round 8: its 47k
# stat() calls took 5.9 s against the plain script's 0.8 s, waiting for the GIL behind 16 threads).
BACKGROUND_WORKERS = max(1, min(4, (os.cpu_count() or 1) - 1))


def _hash_in_child(paths: list[Path], workers: int | None) -> list[str]:
    """sha256_file of each path, computed by a child interpreter running filehash.py (standard
    library only: -I -S, no site-packages, nothing of this process's imports). Where the child
    cannot run or answers anything else, the same digests are computed here: only slower. Where
    startup.stop_children stopped it (the process is leaving), nothing is hashed again: CancelledError."""
    cmd = [sys.executable, "-I", "-S", filehash.__file__, *(["--workers", str(workers)] if workers else []),
           *map(str, paths)]
    try:
        out = _child_output(cmd)
    except OSError:
        out = None
    lines = out.split() if out is not None else []
    if len(lines) == len(paths) and all(len(x) == 64 for x in lines):
        return lines
    if startup.leaving():
        raise CancelledError("checkpoint hash stopped: the process is leaving")
    return [sha256_file(p, workers) for p in paths]


def _child_output(cmd: list[str]) -> str | None:
    """The child's standard output where it exits with status 0, else None; None at once (no child
    started) once the process is leaving. startup.spawn keeps the child where the exit handler
    (startup.stop_children) can stop it."""
    proc = startup.spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if proc is None:
        return None
    try:
        out, _ = proc.communicate()
    except BaseException:  # as subprocess.run does: no child left behind
        proc.kill()
        proc.wait()
        raise
    finally:
        startup.reap(proc)
    return out if proc.returncode == 0 else None


def checkpoint_files(source: str) -> Path | None:
    """The local directory of a checkpoint: the path itself, or a Hub id's cached snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=source, local_files_only=True))
    except Exception:  # not cached locally (or not a Hub id): no content hash, no cache
        return None


def checkpoint_digest(source: str, memo_file: Path | None = None, workers: int | None = None,
                      in_child: bool = False) -> str | None:
    """sha256 over the checkpoint's files (names and contents); None if they cannot be found.

    Per-file hashes are memoised in `memo_file` by (path, size, mtime_ns): an unchanged file is
    not read again, a rewritten one is. `in_child`: the files to read are hashed by a child
    process (_hash_in_child), for a caller that goes on working meanwhile.
    """
    root = checkpoint_files(source)
    if root is None:
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and not p.name.endswith(_SKIP_SUFFIXES))
    memo: dict = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except ValueError:
            memo = {}
    todo, digests = [], {}
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        known = memo.get(key)
        if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            digests[f] = known[2]
        else:
            todo.append((f, key, st))
    paths = [f for f, _, _ in todo]
    hashed = _hash_in_child(paths, workers) if in_child and paths else [sha256_file(f, workers) for f in paths]
    for (f, key, st), digest in zip(todo, hashed, strict=True):
        digests[f] = digest
        memo[key] = [st.st_size, st.st_mtime_ns, digest]
    if todo and memo_file is not None:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo_file, json.dumps(memo))
        except OSError:
            pass  # the memo is an optimisation only
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{digests[f]}\n".encode())
    return h.hexdigest()


def tokens_digest(windows: list[np.ndarray]) -> str:
    """sha256 of the scored windows: token ids, window boundaries and (lm-eval windowing, windows.py)
    the unscored leading targets of each window; a plain list's digest is what it always was."""
    h = hashlib.sha256()
    for w in windows:
        h.update(np.int64(len(w)).tobytes())
        h.update(np.ascontiguousarray(w, dtype=np.int64).tobytes())
    unscored = getattr(windows, "unscored", None)
    if unscored is not None:
        h.update(b"unscored\0" + np.ascontiguousarray(unscored, dtype=np.int64).tobytes())
    return h.hexdigest()


def logits_digest(buffer: torch.Tensor) -> str:
    """Order-sensitive digest of a float32 (N, V) tensor, computed where it lives (no host copy).

    Per-row sums of the int32 bit patterns (exact integer arithmetic: the same on any device),
    then sha256 of those N sums on the host.
    """
    bits = buffer.view(torch.int32)  # (N, V)
    sums = torch.cat([chunk.sum(dim=1, dtype=torch.int64) for chunk in bits.split(_ROWS_PER_DIGEST_CHUNK)])
    return hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest()


def code_digest() -> str:
    """sha256 of evalsuite's own source files: a changed computation (an edited checkout, a
    development install) is another key, even where the version string stayed the same."""
    root = Path(__file__).resolve().parents[1]  # the evalsuite package
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
