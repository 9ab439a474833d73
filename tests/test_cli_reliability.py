"""Issue 19's failures as a user hit them: each case gets one line and a documented exit code.

Every test here failed on the code before the fix (a traceback, exit 1 or 0, a silent overwrite,
a minute of Hub retries, a wrong cause named).
"""

from __future__ import annotations

import errno
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import one_line_error

from evalsuite.cli import main
from evalsuite.errors import EXIT_PARTIAL, EXIT_RUN_ERROR, EXIT_TERMINATED, EXIT_USAGE

BASE = ["--device", "cpu", "--seq-len", "64", "--max-tokens", "300", "--no-progress"]
FAST = [*BASE, "--tasks", "none", "--no-numerics", "--no-reference-cache"]
FAULTRUN = str(Path(__file__).resolve().parent / "faultrun.py")


def _run(model, out, *extra):
    return main(["run", "--model", str(model), "--out", str(out), *FAST, *extra])


def test_sigterm_exits_143_with_a_resume_hint_and_resumes(tiny_llama, tmp_path):
    args = ["run", "--model", str(tiny_llama), "--out", str(tmp_path / "o"), *FAST]
    killed = subprocess.run([sys.executable, FAULTRUN, "term-after:fp32", *args], capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == EXIT_TERMINATED, killed.stderr
    assert "interrupted (SIGTERM); rerun the same command to resume" in killed.stderr
    assert "Traceback" not in killed.stderr
    again = subprocess.run([sys.executable, "-m", "evalsuite", *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resumed" in again.stderr, again.stderr


def test_a_second_run_into_the_same_out_is_refused(tiny_llama, tmp_path, capsys):
    from evalsuite.store.outdir import claim

    out = tmp_path / "o"
    with claim(out, {}):  # the first run, still writing
        rc = _run(tiny_llama, out)
    assert "another evalsuite run" in one_line_error(capsys, rc, EXIT_USAGE)
    assert not (out / "results.json").exists()


def test_a_stale_lock_never_blocks(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".lock").write_text("999999")  # a killed run's lock file: no process holds the lock
    assert _run(tiny_llama, out) == 0, capsys.readouterr().err


def test_finished_out_with_other_options_needs_overwrite_and_leaves_no_stale_files(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "--model", str(tiny_llama), "--out", str(out), *BASE, "--tasks", "zh_mc", "--limit", "2",
                 "--no-numerics", "--no-reference-cache"]) == 0
    assert (out / "benchmarks.jsonl").is_file()
    capsys.readouterr()
    rc = _run(tiny_llama, out, "--dtypes", "bf16")
    line = one_line_error(capsys, rc, EXIT_USAGE)
    assert "--overwrite" in line and "dtypes" in line
    assert _run(tiny_llama, out, "--dtypes", "bf16", "--overwrite") == 0
    assert not (out / "benchmarks.jsonl").exists()  # the first run's records are not left beside the new results
    assert json.loads((out / "results.json").read_text())["config"]["dtypes"] == ["bf16"]
    assert _run(tiny_llama, out, "--dtypes", "bf16") == 0  # the same command again: no question asked


def test_disk_full_is_one_line_and_the_resume_state_survives(tiny_llama, tmp_path, capsys, monkeypatch):
    import evalsuite.store.per_token as per_token

    out = tmp_path / "o"
    real = per_token.write_per_token

    def full(path, arrays):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(per_token, "write_per_token", full)
    rc = main(["run", "--model", str(tiny_llama), "--out", str(out), *FAST[:-1]])  # resume state kept
    line = one_line_error(capsys, rc, EXIT_RUN_ERROR)
    assert "no space left on the device writing" in line and "per_token.npz" in line and "resume" in line
    monkeypatch.setattr(per_token, "write_per_token", real)
    assert main(["run", "--model", str(tiny_llama), "--out", str(out), *FAST[:-1]]) == 0
    assert "resumed" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_and_debug_shows_it(tiny_llama, tmp_path, capsys, monkeypatch):
    import evalsuite.passes.runner as runner

    def boom(*a, **k):
        raise TypeError("'None' is not an instance of 'Sequence'")

    monkeypatch.setattr(runner, "build_results", boom)
    rc = _run(tiny_llama, tmp_path / "o")
    assert "unexpected TypeError" in one_line_error(capsys, rc, EXIT_RUN_ERROR)
    with pytest.raises(TypeError):
        main(["--debug", "run", "--model", str(tiny_llama), "--out", str(tmp_path / "d"), *FAST])


def test_a_failed_dtype_is_a_non_zero_exit_unless_partial_is_allowed(tiny_llama, tmp_path, capsys, monkeypatch):
    import evalsuite.passes.loop as loop

    real = loop.load_model

    def no_bf16(source, precision, *a, **k):
        if precision.name == "bf16":
            raise RuntimeError("injected: bf16 weights unreadable")
        return real(source, precision, *a, **k)

    monkeypatch.setattr(loop, "load_model", no_bf16)
    assert _run(tiny_llama, tmp_path / "a") == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "dtype bf16 failed: injected" in err and f"exit {EXIT_PARTIAL}" in err
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert data["failures"][0]["part"] == "dtype bf16" and data["dtypes"]["bf16"]["status"] == "failed"
    assert _run(tiny_llama, tmp_path / "b", "--allow-partial") == 0


def test_invalid_config_json_is_named_not_the_tokenizer(tiny_llama, tmp_path, capsys):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    (model / "config.json").write_text('{"model_type": "llama",')
    line = one_line_error(capsys, _run(model, tmp_path / "o"), EXIT_RUN_ERROR)
    assert "config.json is not valid JSON" in line and "tokenizer" not in line


def test_an_unreachable_hub_is_said_at_once(tmp_path, capsys, monkeypatch):
    def refused(*a, **k):
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.perf_counter()
    rc = main(["run", "--model", "some-org/not-cached", "--out", str(tmp_path / "o"), *FAST])
    line = one_line_error(capsys, rc, EXIT_RUN_ERROR)
    assert "cannot reach the Hugging Face Hub" in line and "local checkpoint" in line
    assert time.perf_counter() - t0 < 10


def test_seq_len_beyond_the_model_positions_is_refused(tiny_llama, tmp_path, capsys):
    limit = json.loads((tiny_llama / "config.json").read_text())["max_position_embeddings"]
    rc = main(["run", "--model", str(tiny_llama), "--out", str(tmp_path / "o"), *FAST, "--seq-len", str(limit)])
    assert f"use --seq-len {limit - 1} or less" in one_line_error(capsys, rc, EXIT_USAGE)


def test_silently_accepted_options_are_now_said(tiny_llama, tmp_path, capsys):
    rc = _run(tiny_llama, tmp_path / "o", "--dtypes", "fp16,fp16,fp32", "--noise-tokens", "0", "--max-tokens", "20")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "fp16 is given twice: run once" in err and "fp32 is the reference: run once" in err
    assert "no noise floor is measured" in err and "only 20 tokens are scored" in err


def test_help_is_grouped_with_defaults_examples_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for heading in ("model:", "data:", "precision:", "benchmarks", "output and resume:", "performance:",
                    "examples:", "exit codes:"):
        assert heading in text, heading
    assert "(default: fp16,bf16)" in text and "(default: 2048)" in text
    rc = main(["run", "--bogus"])
    assert "see `evalsuite run --help`" in one_line_error(capsys, rc, EXIT_USAGE)


def test_tasks_lists_the_offline_tasks(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "zh_mc" in out and "cmmlu_local" in out and "evalsuite" in out


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_sigint_keeps_its_code(sig):
    from evalsuite.errors import EXIT_INTERRUPTED

    assert EXIT_INTERRUPTED == 128 + sig
