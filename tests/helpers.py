"""Small assertions and the run configuration shared by the tests."""

from __future__ import annotations

import os
import time

from evalsuite.config import RunConfig
from evalsuite.model.precision import DTYPES
from evalsuite.store.corpus import CorpusSpec


def run_config(out_dir, /, **kw) -> RunConfig:
    """A CPU run of the bundled corpus, FP32 reference vs FP16 and BF16, 64-token windows; `kw` overrides
    any field (out_dir too)."""
    base = dict(model=None, dtypes=(DTYPES["fp16"], DTYPES["bf16"]), reference=DTYPES["fp32"], device="cpu",
                corpus=CorpusSpec(), seq_len=64, max_tokens=700, batch_size=4, out_dir=out_dir, progress=False)
    return RunConfig(**{**base, **kw})


def one_line_error(capsys, rc: int, code: int) -> str:
    """Assert the command returned `code` with exactly one `evalsuite: error:` line and no traceback."""
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.startswith("evalsuite: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_pair(*args, **kwargs):
    """(results, per-token arrays) of `passes.runner.run`: what most tests look at."""
    from evalsuite.passes.runner import run

    out = run(*args, **kwargs)
    return out.results, out.per_token


def fp32_gemm_linears(model) -> None:
    """Every half nn.Linear of `model` as an FP32 GEMM of its half operands, rounded once to the
    half format: what a CPU run does by default (--cpu-half-gemm), written here from the
    definition, not through evalsuite.model.cpu, so tests compare against an independent path."""
    import torch

    def routed(mod):
        def forward(x):
            if x.dtype not in (torch.float16, torch.bfloat16) or mod.weight.dtype != x.dtype:
                return torch.nn.functional.linear(x, mod.weight, mod.bias)
            bias = None if mod.bias is None else mod.bias.float()
            return torch.nn.functional.linear(x.float(), mod.weight.float(), bias).to(x.dtype)
        return forward

    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.forward = routed(m)


def sleeping_child(tmp_path):
    """(an executable, its pid file): a stand-in for the interpreter digests starts to hash, which
    writes its pid (whole, then renamed) and sleeps a minute, whatever it is asked."""
    exe, pid = tmp_path / "slow-python", tmp_path / "child.pid"
    exe.write_text(f'#!/bin/sh\necho $$ > "{pid}.tmp" && mv "{pid}.tmp" "{pid}"\nexec sleep 60\n')
    exe.chmod(0o755)
    return exe, pid


def wait_for_pid(pid_file, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.01)
    return int(pid_file.read_text())


def process_gone(pid: int, timeout_s: float = 5.0) -> bool:
    """Whether `pid` has ended (a zombie counts: it no longer runs) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
