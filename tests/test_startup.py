"""evalsuite/startup.py: compiled bytecode kept under evalsuite's cache only where Python can't keep it itself."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from evalsuite import startup


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A stand-in for torch: a package file PROBE resolves to, with no bytecode beside it."""
    pkg = tmp_path / "site" / "probe"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(pkg / "__init__.py")))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    return pkg


def test_a_read_only_package_without_bytecode_gets_the_prefix(package, tmp_path, monkeypatch):
    monkeypatch.setattr(startup.os, "access", lambda path, mode: False)  # (as root, chmod would not stop a write)
    assert startup.bytecode_cache(tmp_path / "cache") == tmp_path / "cache" / "pycache"
    assert sys.pycache_prefix == str(tmp_path / "cache" / "pycache") and (tmp_path / "cache" / "pycache").is_dir()


def test_nothing_changes_where_python_caches_bytecode_itself(package, tmp_path, monkeypatch):
    assert startup.bytecode_cache(tmp_path / "cache") is None  # writable: Python writes __pycache__ there
    monkeypatch.setattr(startup.os, "access", lambda path, mode: False)
    pyc = importlib.util.cache_from_source(str(package / "__init__.py"))
    (package / "__pycache__").mkdir()
    open(pyc, "wb").close()
    assert startup.bytecode_cache(tmp_path / "cache") is None  # compiled already, next to the sources
    monkeypatch.setattr(sys, "pycache_prefix", "/elsewhere")
    assert startup.bytecode_cache(tmp_path / "cache") is None  # the user's own choice stays
    assert sys.pycache_prefix == "/elsewhere" and not (tmp_path / "cache").exists()
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # PYTHONDONTWRITEBYTECODE: no bytecode written anywhere
    (package / "__pycache__" / pyc.rsplit("/", 1)[1]).unlink()
    assert startup.bytecode_cache(tmp_path / "cache") is None and sys.pycache_prefix is None


def test_the_prefix_takes_the_compiled_modules_of_a_later_import(tmp_path, monkeypatch):
    """In a fresh interpreter: with the prefix set, importing a module writes its bytecode there."""
    (tmp_path / "mod_x.py").write_text("y = 2\n")
    code = ("import sys; sys.pycache_prefix = sys.argv[1]; sys.path.insert(0, sys.argv[2]); import mod_x; "
            "print(mod_x.y)")
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pc"), str(tmp_path)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "2"
    assert list((tmp_path / "pc").rglob("mod_x*.pyc")), "bytecode written under the prefix"


LEAVE = """
import atexit, sys, threading, time
from evalsuite.startup import leave
atexit.register(lambda: print("exit handler ran", flush=True))
print("buffered line, not flushed", end="")
if sys.argv[1] == "thread":  # a thread that is not a daemon must finish its work first
    threading.Thread(target=lambda: (time.sleep(0.3), print(" + thread done", end=""))).start()
leave(int(sys.argv[2]))
print("after leave: never reached")
"""


@pytest.mark.parametrize("code", [0, 3, 4])
def test_leave_keeps_the_exit_status_the_handlers_and_the_buffered_output(code):
    out = subprocess.run([sys.executable, "-c", LEAVE, "none", str(code)], capture_output=True, text=True)
    assert out.returncode == code
    assert out.stdout == "buffered line, not flushedexit handler ran\n"


def test_leave_waits_for_a_thread_that_is_not_a_daemon():
    out = subprocess.run([sys.executable, "-c", LEAVE, "thread", "4"], capture_output=True, text=True)
    assert out.returncode == 4
    assert out.stdout == "buffered line, not flushed + thread doneexit handler ran\n"


def test_leave_skips_the_interpreter_teardown():
    """An object's finaliser that runs only in the interpreter's own teardown does not run: the
    seconds leave() saves are those (its docstring has the figures, measured on the CPU)."""
    code = ("import sys; from evalsuite.startup import leave\n"
            "class Slow:\n    def __del__(self): print('finalised', flush=True)\n"
            "keep = Slow()\nleave(0) if sys.argv[1] == 'leave' else sys.exit(0)\n")
    normal = subprocess.run([sys.executable, "-c", code, "exit"], capture_output=True, text=True)
    fast = subprocess.run([sys.executable, "-c", code, "leave"], capture_output=True, text=True)
    assert normal.stdout == "finalised\n" and fast.stdout == "" and fast.returncode == 0


@pytest.fixture
def own_children(monkeypatch):
    """This test's own set of helper children and leaving flag (the process goes on after it)."""
    monkeypatch.setattr(startup, "_children", set())
    monkeypatch.setattr(startup, "_leaving", threading.Event())


def test_stop_children_ends_a_child_that_ignores_terminate_and_then_starts_none(own_children):
    """terminate, then kill after the grace: a helper that traps SIGTERM still goes; a child that
    was reaped (it ended by itself) is left alone; nothing is spawned once the process is leaving."""
    stubborn = startup.spawn([sys.executable, "-c", "import signal, time\n"
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"  # its handler is in place
    finished = startup.spawn([sys.executable, "-c", "pass"])
    finished.wait(30)
    startup.reap(finished)
    assert startup._children == {stubborn} and not startup.leaving()
    startup.stop_children(grace_s=0.2)
    assert stubborn.wait(5) == -9  # killed: SIGTERM was ignored
    stubborn.stdout.close()
    assert startup.leaving()
    assert startup.spawn([sys.executable, "-c", "pass"]) is None


def test_stop_children_ends_a_child_that_exits_on_terminate_at_once(own_children):
    child = startup.spawn([sys.executable, "-c", "import time; time.sleep(60)"])
    startup.stop_children(grace_s=5.0)
    assert child.poll() == -15  # SIGTERM sufficed: no kill needed
