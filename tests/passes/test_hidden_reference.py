"""The reference kept as hidden states: re-applied logits are the reference pass's own, bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_config, run_pair

from evalsuite.model.forward import Scorer
from evalsuite.model.loading import load_model, load_tokenizer
from evalsuite.model.precision import DTYPES, exact_fp32
from evalsuite.passes import reference
from evalsuite.store import corpus

TIMINGS = {"tokens_per_s"}


def _plain(values: dict) -> dict:
    """Values without timings, NaN as a string (NaN != NaN would fail an equality of identical runs)."""
    return {m: "nan" if isinstance(v, float) and v != v else v for m, v in values.items() if m not in TIMINGS}


def _metrics(results) -> dict:
    return {k: _plain(d.metrics) for k, d in results.dtypes.items()} | {"noise": _plain(results.noise_floor)}


def _run_forced(monkeypatch, model, out, mode, **kw):
    """A run with the reference kept as `mode`; returns (results, per-token arrays, the segments' KeptReferences)."""
    monkeypatch.setattr(reference, "FORCE", mode)
    kept = []
    real = reference.allocate
    monkeypatch.setattr(reference, "allocate", lambda *a, **k: kept.append(real(*a, **k)) or kept[-1])
    results, per_token = run_pair(run_config(out, **kw), str(model))
    return results, per_token, kept


def _old_path_logits(model, cfg, windows) -> torch.Tensor:
    """The reference's logits (N, V) as the Scorer computes them without a frozen head (the module's own weight)."""
    device = torch.device(cfg.device)
    with exact_fp32():
        scorer = Scorer(load_model(str(model), DTYPES["fp32"], device), device)
        out, i = [], 0
        while i < len(windows):  # batches as run_pass makes them: consecutive windows of one length
            j = i
            while j < len(windows) and j - i < cfg.batch_size and len(windows[j]) == len(windows[i]):
                j += 1
            ids = torch.from_numpy(np.stack(windows[i:j]).astype(np.int64)).to(device)
            out += [logits.clone() for _, logits, _ in scorer.chunks(ids)]
            i = j
    return torch.cat(out)


def _check_identity(monkeypatch, model, tmp_path, **kw):
    a, tok_a, kept_a = _run_forced(monkeypatch, model, tmp_path / "logits", reference.LOGITS, **kw)
    b, tok_b, kept_b = _run_forced(monkeypatch, model, tmp_path / "hidden", reference.HIDDEN, **kw)
    assert a.provenance["reference_kept"] == "logits" and b.provenance["reference_kept"] == "hidden-states"
    assert b.provenance["reference_stored"] == "hidden-states" and b.provenance["reference_head_us"] > 0
    assert _metrics(a) == _metrics(b)
    for k in tok_a:
        np.testing.assert_array_equal(tok_a[k], tok_b[k], err_msg=k)  # bitwise (NaN where NaN)
    logits, hidden = kept_a[0].logits, kept_b[0]
    assert hidden.logits is None and hidden.hidden.shape[1] < logits.shape[1]
    assert torch.equal(hidden[0:len(hidden)], logits)  # every chunk re-applied
    assert torch.equal(hidden.materialize(), logits)
    for lo, hi in [(0, 1), (5, 130), (100, 101), (250, len(hidden))]:  # ranges across chunk bounds
        assert torch.equal(hidden[lo:hi], logits[lo:hi])
    return logits


def _identity_on(device: str, arch, tiny_llama, tiny_qwen_no_bos, tmp_path, monkeypatch):
    """Small chunks (several per batch): the noise floor's half batches read across chunk bounds."""
    from evalsuite.model import forward

    model = tiny_llama if arch == "llama" else tiny_qwen_no_bos
    monkeypatch.setitem(forward.CHUNK_BYTES, device, 4 * 384 * 96)  # 96 tokens a chunk: not a divisor of a batch
    logits = _check_identity(monkeypatch, model, tmp_path, device=device)
    cfg = run_config(tmp_path, device=device)
    texts, _ = corpus.load_texts(cfg.corpus)
    windows = corpus.tokenize(texts, load_tokenizer(str(model)), cfg.seq_len, cfg.max_tokens).windows
    assert torch.equal(_old_path_logits(model, cfg, windows), logits)  # = the module head's own logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reapplied_logits_are_the_reference_pass_own(arch, tiny_llama, tiny_qwen_no_bos, tmp_path, monkeypatch):
    _identity_on("cpu", arch, tiny_llama, tiny_qwen_no_bos, tmp_path, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reapplied_logits_are_the_reference_pass_own_on_cuda(arch, tiny_llama, tiny_qwen_no_bos, tmp_path,
                                                             monkeypatch):
    """The same on the card: cuBLAS's FP32 GEMM (TF32 off) over the same chunks and weights."""
    _identity_on("cuda", arch, tiny_llama, tiny_qwen_no_bos, tmp_path, monkeypatch)


def test_the_rule_keeps_logits_that_fit_and_hidden_states_otherwise(tiny_llama, tmp_path, monkeypatch):
    fits, _ = run_pair(run_config(tmp_path / "a"), str(tiny_llama))
    assert fits.provenance["reference_kept"] == "logits" and fits.provenance["n_segments"] == 1
    assert "fit" in fits.provenance["reference_kept_reason"]
    small = 200 * 384 * 4 / 2**30  # 200 tokens of logits, 1,200 of hidden states (width 64)
    monkeypatch.setattr(reference, "head_seconds_per_token", lambda head, rows: 0.0)  # re-applying is free
    tight, tok = run_pair(run_config(tmp_path / "b", buffer_gib=small), str(tiny_llama))
    assert tight.provenance["reference_kept"] == "hidden-states" and tight.provenance["n_segments"] == 1
    monkeypatch.setattr(reference, "head_seconds_per_token", lambda head, rows: 1.0)  # a second a token
    slow, tok2 = run_pair(run_config(tmp_path / "c", buffer_gib=small), str(tiny_llama))
    assert slow.provenance["reference_kept"] == "logits" and slow.provenance["n_segments"] > 1
    assert "re-applying the head" in slow.provenance["reference_kept_reason"]
    np.testing.assert_array_equal(tok["fp16/kl"], tok2["fp16/kl"])


def test_a_full_forward_keeps_logits(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(Scorer, "_verified_split", lambda self: False)
    results, _ = run_pair(run_config(tmp_path, reference_cache=tmp_path / "cache"), str(tiny_llama))
    prov = results.provenance
    assert prov["logits_path"] == "full-forward" and prov["reference_kept"] == prov["reference_stored"] == "logits"
    assert list((tmp_path / "cache").rglob("seg0-logits.npy")) and not list((tmp_path / "cache").rglob("*hidden*"))


FAULTRUN = str(Path(__file__).resolve().parents[1] / "faultrun.py")
FAST = ["--device", "cpu", "--seq-len", "64", "--max-tokens", "400", "--no-progress", "--no-numerics",
        "--tasks", "none", "--no-reference-cache", "--buffer-gib", str(150 * 384 * 4 / 2**30)]


def _cli(args, fault=None):
    launcher = [FAULTRUN, fault] if fault else ["-m", "evalsuite"]
    return subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=600)


def test_sigkill_after_a_hidden_state_reference_resumes_with_identical_metrics(tiny_llama, tmp_path):
    """The buffer holds 150 tokens of logits and 900 of hidden states: the run keeps hidden states
    (or, were re-applying slower than reloads, logits in segments: then the test says so)."""
    whole = tmp_path / "whole"
    assert _cli(["run", "--model", str(tiny_llama), "--out", str(whole), *FAST]).returncode == 0
    args = ["run", "--model", str(tiny_llama), "--out", str(tmp_path / "out"), *FAST]
    killed = _cli(args, "kill-after:fp32")
    assert killed.returncode == -signal.SIGKILL
    state = tmp_path / "out" / ".state"
    assert (state / "seg0-reference-hidden.npy").is_file() and (state / "reference-head.json").is_file()
    assert not list(state.glob("*-logits.npy"))
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["provenance"]["resumed_passes"] == ["fp32"] and data["provenance"]["reference_stored"] == "hidden-states"
    first = json.loads((whole / "results.json").read_text())
    strip = lambda d: {k: {m: v for m, v in e["metrics"].items() if m not in TIMINGS} for k, e in d["dtypes"].items()}  # noqa: E731
    assert strip(data) == strip(first)
