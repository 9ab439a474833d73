"""The run loop end to end on tiny models, checked against an all-in-memory float64 computation."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import fp32_gemm_linears, process_gone, run_config, run_pair, sleeping_child
from tiny import build_model
from transformers import AutoModelForCausalLM

from evalsuite.config import RunConfig
from evalsuite.model.loading import load_tokenizer
from evalsuite.model.precision import DTYPES
from evalsuite.store import corpus


def _config(tmp_path, **kw) -> RunConfig:
    return run_config(tmp_path, **kw)


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _all_in_memory(path, cfg, dtype, device="cpu"):
    """Both models resident, full logits, statistics in float64 numpy: the independent check."""
    from evalsuite.model.precision import exact_fp32

    tok = load_tokenizer(str(path))
    texts, _ = corpus.load_texts(cfg.corpus)
    windows = corpus.tokenize(texts, tok, cfg.seq_len, cfg.max_tokens)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    test_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)
    if device == "cpu" and cfg.cpu_half_gemm == "fp32":
        fp32_gemm_linears(test_model)
    kl, nll_ref, nll_test, agree = [], [], [], []
    with torch.no_grad():
        for w in windows.windows:
            ids = torch.from_numpy(w)[None].to(device)
            with exact_fp32():
                r = ref_model(ids[:, :-1]).logits[0].double().cpu().numpy()
            t = test_model(ids[:, :-1]).logits[0].double().cpu().numpy()
            lr, lt = _log_softmax64(r), _log_softmax64(t)
            tg = w[1:]
            rows = np.arange(len(tg))
            kl.append((np.exp(lr) * (lr - lt)).sum(-1))
            nll_ref.append(-lr[rows, tg])
            nll_test.append(-lt[rows, tg])
            agree.append(r.argmax(-1) == t.argmax(-1))
    return {k: np.concatenate(v) for k, v in dict(kl=kl, nll_ref=nll_ref, nll_test=nll_test, agree=agree).items()}


@pytest.mark.parametrize("fixture,gemm", [("tiny_llama", "fp32"), ("tiny_qwen_no_bos", "fp32"),
                                          ("tiny_llama", "native")])
def test_metrics_match_all_in_memory_float64(fixture, gemm, request, tmp_path):
    path = request.getfixturevalue(fixture)
    cfg = _config(tmp_path, dtypes=(DTYPES["fp16"],), cpu_half_gemm=gemm)
    results, per_token = run_pair(cfg, str(path))
    expect = _all_in_memory(path, cfg, torch.float16)
    m = results.dtypes["fp16"].metrics
    # The documented target for the stored-reference comparison: <= 1e-6 nats on the KL mean.
    assert abs(m["kl_mean"] - expect["kl"].mean()) <= 1e-6
    np.testing.assert_allclose(per_token["fp16/kl"], expect["kl"], rtol=1e-6, atol=1e-9)
    assert m["kl_max"] == pytest.approx(expect["kl"].max(), rel=1e-6)
    assert m["top1_agreement"] == pytest.approx(expect["agree"].mean())
    ref_ppl = results.dtypes["fp32"].metrics["ppl"]
    assert ref_ppl == pytest.approx(math.exp(expect["nll_ref"].mean()), rel=1e-9)
    assert m["ppl_ratio"] == pytest.approx(math.exp((expect["nll_test"] - expect["nll_ref"]).mean()), rel=1e-9)
    assert m["n_tokens"] == len(expect["kl"])


def test_context_rules(tiny_llama, tiny_qwen_no_bos):
    texts = ["第一段文字。", "第二段，更多的文字。"]
    with_bos = corpus.tokenize(texts, load_tokenizer(str(tiny_llama)), seq_len=5)
    assert with_bos.context == "bos" and all(w[0] == with_bos.windows[0][0] for w in with_bos.windows)
    stream = np.concatenate([w[1:] for w in with_bos.windows])
    no_bos = corpus.tokenize(texts, load_tokenizer(str(tiny_qwen_no_bos)), seq_len=5)
    assert no_bos.context == "previous-token"
    # every window after the first starts with the token the previous window ended on
    for a, b in zip(no_bos.windows, no_bos.windows[1:], strict=False):
        assert b[0] == a[-1]
    assert len(stream) == with_bos.n_tokens
    # bits per byte must see every byte of the text exactly once (with BOS every token is scored)
    assert with_bos.target_bytes.sum() == sum(len((t + "\n").encode()) for t in texts)


@pytest.mark.parametrize("kept", ["logits", "hidden-states"])
def test_segmented_reference_equals_single_segment(tiny_llama, tmp_path, monkeypatch, kept):
    from evalsuite.passes import reference

    one, _ = run_pair(_config(tmp_path / "a"), str(tiny_llama))
    monkeypatch.setattr(reference, "FORCE", kept)  # 200 tokens of hidden states (width 64), 28 of logits
    many, _ = run_pair(_config(tmp_path / "b", buffer_gib=200 * 64 * 4 / 2**30), str(tiny_llama))
    assert many.provenance["n_segments"] > 1 and one.provenance["n_segments"] == 1
    assert many.provenance["reference_kept"] == kept
    for name in ("fp16", "bf16"):
        a, b = one.dtypes[name].metrics, many.dtypes[name].metrics
        for key in ("kl_mean", "kl_p99", "kl_max", "top1_agreement", "ppl", "ppl_ratio"):
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15), key


def test_noise_floor_is_reported(tiny_llama, tmp_path):
    results, _ = run_pair(_config(tmp_path), str(tiny_llama))
    nf = results.noise_floor
    assert nf["n_tokens"] == 512 == results.config["noise_tokens"]  # the CPU default: the first 512 tokens
    assert nf["batch_size"] != nf["reference_batch_size"]
    assert nf["kl_mean"] >= 0 and nf["top1_agreement"] <= 1
    assert results.dtypes["fp16"].metrics["noise_kl_mean"] == nf["kl_mean"]
    assert results.provenance["reference_flags"]["cuda_matmul_allow_tf32"] is False


def test_noise_budget_is_a_small_share_of_a_large_run():
    from evalsuite.passes.runner import noise_budget

    assert noise_budget(32768, 700) == 700  # small runs: all of it
    assert noise_budget(32768, 131072) == 16384  # an eighth of a large run
    assert noise_budget(32768, 10**7) == 32768  # never more than asked
    assert noise_budget(32768, 65536, world=2) == 8192  # per rank: an eighth of its share
    assert noise_budget(0, 5000) == 0


def test_fp16_overflow_is_a_finding_not_a_crash(tmp_path):
    # LM head scaled so that some FP16 logits exceed 65504 -> inf (on 130 of 700 tokens with this
    # seed); FP32 and BF16 stay finite.
    path = build_model(tmp_path / "hot", "llama", seed=3, scale_lm_head=16000.0)
    results, per_token = run_pair(_config(tmp_path / "out"), str(path))
    fp16, bf16 = results.dtypes["fp16"], results.dtypes["bf16"]
    assert fp16.status == "broken" and "non-finite" in fp16.message
    assert fp16.metrics["nonfinite_logits"] > 0 and fp16.metrics["nonfinite_tokens"] > 0
    assert 0 < fp16.metrics["nonfinite_tokens"] < fp16.metrics["n_tokens"]
    # the other statistics are computed over the finite tokens, and marked so
    assert fp16.metrics["finite_only"] is True
    assert fp16.metrics["n_scored_tokens"] == fp16.metrics["n_tokens"] - fp16.metrics["nonfinite_tokens"]
    assert math.isfinite(fp16.metrics["kl_mean"]) and fp16.metrics["kl_mean"] > 0
    assert bf16.status == "ok" and bf16.metrics["nonfinite_logits"] == 0
    assert results.dtypes["fp32"].status == "ok"
    # counts agree with the per-token record
    assert int(per_token["fp16/nonfinite"].sum()) == fp16.metrics["nonfinite_logits"]


class _Recorder:
    """An observer that records what it is shown, to test the runner's extension points."""

    def __init__(self):
        self.events, self.offsets = [], {}

    def pass_started(self, ctx):
        self.events.append(("start", ctx.precision.name, ctx.role, ctx.segment, str(next(ctx.model.parameters()).dtype)))
        self.current = ctx.precision.name
        self.offsets[self.current] = []

    def batch_started(self, offset, ids):
        self.offsets[self.current].append((offset, ids.shape[0] * (ids.shape[1] - 1)))

    def pass_finished(self, ctx):
        self.events.append(("end", ctx.precision.name))

    def finish(self, metrics):
        return {"fp16": {"recorded/kl_mean": metrics["fp16"]["kl_mean"]}}, {"recorder": {"n": len(self.events)}}


def test_observers_see_every_pass_and_batch(tiny_llama, tmp_path):
    rec = _Recorder()
    results, _ = run_pair(_config(tmp_path), str(tiny_llama), observers=(rec,))
    assert rec.events == [("start", "fp32", "reference", 0, "torch.float32"), ("end", "fp32"),
                          ("start", "fp16", "test", 0, "torch.float16"), ("end", "fp16"),
                          ("start", "bf16", "test", 0, "torch.bfloat16"), ("end", "bf16")]
    for name, batches in rec.offsets.items():  # the batches tile the corpus exactly, in order
        covered = 0
        for offset, n in batches:
            assert offset == covered, name
            covered += n
        assert covered == results.corpus["n_tokens"]
    assert results.dtypes["fp16"].metrics["recorded/kl_mean"] == results.dtypes["fp16"].metrics["kl_mean"]
    assert results.sections["recorder"] == {"n": 6}


def test_progress_label_names_the_segment_of_a_multi_segment_run():
    from evalsuite.passes.loop import pass_label

    assert pass_label("fp16", 0, [(0, 4, 0)]) == "fp16"
    assert pass_label("fp16", 1, [(0, 4, 0), (4, 8, 256), (8, 9, 512)]) == "fp16 segment 2/3"


def test_the_digest_hashed_meanwhile_is_the_one_open_cache_hashed_before(tiny_llama, tmp_path):
    """stores.digest_meanwhile hashes in a thread what open_cache hashed before the passes."""
    from evalsuite.passes import stores
    from evalsuite.store.digests import checkpoint_digest

    assert stores.digest_meanwhile(run_config(tmp_path / "o2", reference_cache=None), str(tiny_llama)) is None
    cfg = run_config(tmp_path / "out", reference_cache=tmp_path / "cache")
    future = stores.digest_meanwhile(cfg, str(tiny_llama))
    assert future.result() == checkpoint_digest(str(tiny_llama))
    assert (tmp_path / "cache" / "checkpoint-digests.json").is_file()  # memoised there, as before


LEAVES_EARLY = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from evalsuite import startup
from evalsuite.passes import stores
checkpoint, cache, pid_file, how = sys.argv[1:5]
sys.executable = sys.argv[5]  # the hashing child: sleeps a minute
future = stores.digest_meanwhile(SimpleNamespace(reference_cache=Path(cache)), checkpoint)
deadline = time.monotonic() + 30
while not Path(pid_file).exists() and time.monotonic() < deadline:
    time.sleep(0.01)
print(time.time(), flush=True)
startup.leave(3) if how == "leave" else sys.exit(3)
"""


@pytest.mark.parametrize("how", ["leave", "sys.exit"])
def test_a_run_that_fails_while_the_checkpoint_hashes_ends_at_once_and_stops_the_child(tmp_path, how):
    """In a fresh interpreter: digest_meanwhile's thread (a daemon) does not hold the exit, and the
    exit handlers stop its child (a stand-in that sleeps a minute) rather than leave it running."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights")
    exe, pid_file = sleeping_child(tmp_path)
    args = [str(tmp_path / "ckpt"), str(tmp_path / "cache"), str(pid_file), how, str(exe)]
    out = subprocess.run([sys.executable, "-c", LEAVES_EARLY, *args], capture_output=True, text=True, timeout=120)
    ended = time.time()
    pid = int(pid_file.read_text())
    try:
        assert out.returncode == 3, out.stderr
        assert ended - float(out.stdout) < 10, "the exit waited for the hash"  # the child sleeps 60 s
        assert process_gone(pid), "the hashing child outlived the run"
        assert not (tmp_path / "cache" / "checkpoint-digests.json").exists()  # nothing hashed in-process
    finally:
        if not process_gone(pid, 0):
            os.kill(pid, signal.SIGKILL)
