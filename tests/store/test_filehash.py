"""store/filehash.py and digests' child process: the checkpoint's hash, checked against hashlib."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest
from helpers import process_gone, sleeping_child, wait_for_pid

from evalsuite import startup
from evalsuite.store import digests, filehash


def _expected(data: bytes, piece: int) -> str:
    """The digest's definition, computed here without filehash: sha256 over the pieces' sha256s and the size."""
    pieces = b"".join(hashlib.sha256(data[i:i + piece]).digest() for i in range(0, max(len(data), 1), piece))
    return hashlib.sha256(pieces + str(len(data)).encode()).hexdigest()


def test_piecewise_file_hash_matches_an_independent_computation(tmp_path, monkeypatch):
    monkeypatch.setattr(filehash, "PIECE", 1000)
    data = np.random.default_rng(3).bytes(4500)  # 5 pieces, the last one short
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    assert filehash.sha256_file(f) == _expected(data, 1000)
    monkeypatch.setattr(filehash, "READ", 300)  # several reads into one buffer per piece, the last one short
    assert filehash.sha256_file(f, workers=1) == _expected(data, 1000)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of the last byte
    assert filehash.sha256_file(f) != _expected(data, 1000)
    (tmp_path / "empty").write_bytes(b"")
    assert filehash.sha256_file(tmp_path / "empty") == _expected(b"", 1000)


def test_the_child_process_gives_the_independent_digests(tmp_path, monkeypatch):
    """Two files across the real 256 MB piece boundary are cheap to make sparse; the child hashes
    them with the standard library only and answers a line each, in order."""
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    with open(big, "wb") as fh:
        fh.seek(filehash.PIECE + 10)
        fh.write(b"tail")
    small.write_bytes(b"config")
    seen = []
    monkeypatch.setattr(digests, "sha256_file", lambda *a: seen.append(a) or "in-process")
    got = digests._hash_in_child([big, small], workers=2)
    assert seen == []  # answered by the child, not by the fallback
    assert got == [_expected(big.read_bytes(), filehash.PIECE), _expected(b"config", filehash.PIECE)]


def test_a_child_that_cannot_answer_falls_back_to_this_process(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"abc")
    for broken in (str(tmp_path / "no-such-python"), shutil.which("false")):
        monkeypatch.setattr(sys, "executable", broken)
        assert digests._hash_in_child([tmp_path / "a"], None) == [_expected(b"abc", filehash.PIECE)]


def test_a_checkpoint_hashed_in_the_child_has_the_in_process_digest(tiny_llama, tmp_path):
    in_child = digests.checkpoint_digest(str(tiny_llama), tmp_path / "memo.json", 2, in_child=True)
    assert in_child == digests.checkpoint_digest(str(tiny_llama))  # no memo: every file read here


def test_a_child_stopped_as_the_process_leaves_is_not_hashed_again_here(tmp_path, monkeypatch):
    """startup.stop_children (atexit) stops the child still hashing; the thread waiting on it gives up
    (CancelledError) instead of falling back to a hash in this process, and no child starts after."""
    (tmp_path / "a").write_bytes(b"abc")
    exe, pid_file = sleeping_child(tmp_path)
    monkeypatch.setattr(sys, "executable", str(exe))
    monkeypatch.setattr(startup, "_leaving", threading.Event())  # (this test's process goes on after it)
    seen = []
    monkeypatch.setattr(digests, "sha256_file", lambda *a: seen.append(a) or "in-process")
    with ThreadPoolExecutor(1) as pool:
        hashing = pool.submit(digests._hash_in_child, [tmp_path / "a"], None)
        pid = wait_for_pid(pid_file)
        try:
            startup.stop_children()
            with pytest.raises(CancelledError):
                hashing.result(timeout=10)
            assert process_gone(pid)
        finally:
            if not process_gone(pid, 0):
                os.kill(pid, signal.SIGKILL)
    pid_file.unlink()
    with pytest.raises(CancelledError):
        digests._hash_in_child([tmp_path / "a"], None)
    assert not pid_file.exists() and seen == []  # no child started, nothing hashed here
