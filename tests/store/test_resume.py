"""Interruption: a run killed with SIGKILL resumes without redoing finished passes, with identical metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

FAST = ["--device", "cpu", "--seq-len", "64", "--max-tokens", "400", "--no-progress"]


FAULTRUN = str(Path(__file__).resolve().parents[1] / "faultrun.py")


def _cli(args, fault=None):
    launcher = [FAULTRUN, fault] if fault else ["-m", "evalsuite"]
    return subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=600)


def _metrics(out):
    data = json.loads((out / "results.json").read_text())
    # tokens_per_s is a timing, not a measurement of the model: the one documented exception
    return {k: {m: v for m, v in d["metrics"].items() if m != "tokens_per_s"} for k, d in data["dtypes"].items()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    proc = _cli(["run", "--model", str(tiny_llama), "--out", str(out), *FAST, *EXTRA])
    assert proc.returncode == 0, proc.stderr
    return out


EXTRA = ["--no-numerics", "--tasks", "none"]


@pytest.mark.parametrize("kill_after", ["fp32", "fp16"])
def test_sigkill_then_resume(tiny_llama, tmp_path, uninterrupted, kill_after):
    # without the reference cache the reference's pass is kept in the resume state
    args = ["run", "--model", str(tiny_llama), "--out", str(tmp_path), *FAST, *EXTRA, "--no-reference-cache"]
    killed = _cli(args, f"kill-after:{kill_after}")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "results.json").exists()  # nothing half-written
    assert (tmp_path / ".state" / "seg0-reference.npz").is_file()

    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    done = ["fp16", "fp32"] if kill_after == "fp16" else ["fp32"]
    assert data["provenance"]["resumed_passes"] == done  # the reference was not recomputed
    assert _metrics(tmp_path) == _metrics(uninterrupted)
    assert not (tmp_path / ".state").exists()  # removed once the results are written


def test_sigkill_after_the_reference_with_the_cache(tiny_llama, tmp_path, uninterrupted):
    """With the reference cache on, the reference survives the kill in the cache, not in .state."""
    cache = tmp_path / "cache"
    args = ["run", "--model", str(tiny_llama), "--out", str(tmp_path / "out"), *FAST, *EXTRA,
            "--reference-cache", str(cache)]
    killed = _cli(args, "kill-after:fp32")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / ".state" / "seg0-reference.npz").exists()
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["provenance"]["reference_cache"]["status"] == "hit"  # not recomputed
    assert _metrics(tmp_path / "out") == _metrics(uninterrupted)


def test_other_settings_in_the_same_out_dir(tiny_llama, tmp_path, capsys):
    from evalsuite.cli import main

    args = ["run", "--model", str(tiny_llama), "--out", str(tmp_path), *FAST, *EXTRA]
    assert _cli(args, "kill-after:fp32").returncode == -signal.SIGKILL
    rc = main([*args[:-len(EXTRA)], "--seq-len", "32", *EXTRA])
    err = capsys.readouterr().err
    assert rc == 2 and "--fresh" in err and "Traceback" not in err
    assert main([*args, "--fresh"]) == 0
    assert not (tmp_path / ".state").exists()


def test_same_command_twice_gives_identical_metrics(tiny_llama, tmp_path, uninterrupted):
    proc = _cli(["run", "--model", str(tiny_llama), "--out", str(tmp_path), *FAST, *EXTRA])
    assert proc.returncode == 0, proc.stderr
    assert _metrics(tmp_path) == _metrics(uninterrupted)


def test_kill_during_recipes_and_generation_then_resume(tiny_llama, tmp_path):
    """This round's passes resume too: a recipe's pass is kept, the generation step (never saved) is
    recomputed, and every metric equals an uninterrupted run's."""
    extra = [*EXTRA, "--no-reference-cache", "--dtypes", "fp16,fp16+res32,bf16@fp16", "--generate",
             "--gen-count", "3", "--gen-tokens", "4"]
    whole = tmp_path / "whole"
    assert _cli(["run", "--model", str(tiny_llama), "--out", str(whole), *FAST, *extra]).returncode == 0
    args = ["run", "--model", str(tiny_llama), "--out", str(tmp_path / "r"), *FAST, *extra]
    killed = _cli(args, "kill-after:fp16+res32")
    assert killed.returncode == -signal.SIGKILL
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(data["provenance"]["resumed_passes"]) >= {"fp32", "fp16", "fp16+res32"}
    got, want = _metrics(tmp_path / "r"), _metrics(whole)
    strip = lambda m: {d: {k: v for k, v in x.items() if "tokens_per_s" not in k} for d, x in m.items()}  # noqa: E731
    assert strip(got) == strip(want) and "gen_identical" in got["bf16@fp16"]
    assert (tmp_path / "r" / "generations.jsonl").read_text() == (whole / "generations.jsonl").read_text()
