"""passes/attention.AttentionWarm: when the reference's attention calls are replayed, and that it changes no number."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_config, run_pair

from evalsuite.model import attention_warm
from evalsuite.model.precision import DTYPES
from evalsuite.passes import attention
from evalsuite.passes.attention import AttentionWarm

ORIGINAL = F.scaled_dot_product_attention


class _Ctx:  # the two PassContext fields AttentionWarm reads
    def __init__(self, role, name):
        self.role, self.precision = role, DTYPES[name]


def _attend(seq: int) -> None:
    x = torch.randn(2, 2, seq, 8)
    F.scaled_dot_product_attention(x, x, x, is_causal=True)


def _counting(monkeypatch) -> list:
    replays = []

    def counted(calls, dtypes, device):
        replays.append(([c.q.shape[2] for c in calls], list(dtypes)))
        return len(calls)

    monkeypatch.setattr(attention, "replay", counted)
    return replays


def test_nothing_is_recorded_or_replayed_off_cuda(monkeypatch):
    replays = _counting(monkeypatch)
    warm = AttentionWarm(torch.device("cpu"), [torch.float16, torch.bfloat16])
    with warm.recording():
        assert F.scaled_dot_product_attention is ORIGINAL
        _attend(4)
        for _ in range(3):
            warm.batch_started(0, None)
    warm.pass_started(_Ctx("test", "fp16"))
    assert not warm.calls and not replays and warm.provenance() is None


def test_replayed_at_the_second_reference_batch_then_only_what_is_new(monkeypatch):
    replays = _counting(monkeypatch)
    warm = AttentionWarm(torch.device("cpu"), [torch.float16, torch.float32, torch.bfloat16, torch.float16])
    warm.on = True  # as on CUDA
    warm.pass_started(_Ctx("reference", "fp32"))
    with warm.recording():
        warm.batch_started(0, None)
        _attend(4)  # batch 1's call
        warm.batch_started(4, None)  # batch 2: replay batch 1's calls in each 2-byte dtype
        _attend(4)
        warm.batch_started(8, None)
        _attend(3)  # a last, shorter batch: recorded, not yet replayed
    assert F.scaled_dot_product_attention is ORIGINAL
    assert replays == [([4], [torch.float16]), ([4], [torch.bfloat16])]
    warm.pass_started(_Ctx("test", "bf16"))
    warm.pass_started(_Ctx("test", "fp32"))  # no cuDNN attention in FP32: nothing to warm
    warm.pass_started(_Ctx("test", "fp16"))
    warm.pass_started(_Ctx("test", "fp16"))  # a second segment: all done
    assert replays[2:] == [([3], [torch.bfloat16]), ([3], [torch.float16])]
    prov = warm.provenance()
    assert prov["recorded_calls"] == 2 and set(prov["replay_s"]) == {"float16", "bfloat16"}


def test_a_run_with_the_warm_up_has_the_same_numbers(tiny_llama, tmp_path, monkeypatch):
    """Forced on (as on CUDA), on a CPU run: the replays happen and every per-token value is unchanged."""
    cfg = run_config(tmp_path / "off", model=str(tiny_llama), batch_size=2, max_tokens=400, reference_cache=None)
    results_off, arrays_off = run_pair(cfg, str(tiny_llama))
    made = []
    original_replay = attention_warm.replay

    def replay(calls, dtypes, device):
        made.append((len(calls), list(dtypes)))
        return original_replay(calls, dtypes, device)

    monkeypatch.setattr(attention, "replay", replay)
    monkeypatch.setattr(AttentionWarm, "__init__", _forced_on(AttentionWarm.__init__))
    results_on, arrays_on = run_pair(dataclasses.replace(cfg, out_dir=tmp_path / "on"), str(tiny_llama))
    assert made and {d for _, ds in made for d in ds} == {torch.float16, torch.bfloat16}
    assert results_on.provenance["attention_warm"]["recorded_calls"] >= 1
    assert "attention_warm" not in results_off.provenance
    assert arrays_off.keys() == arrays_on.keys()
    for k, v in arrays_off.items():
        np.testing.assert_array_equal(arrays_on[k], v, err_msg=k)


def _forced_on(init):
    def wrapped(self, device, dtypes):
        init(self, device, dtypes)
        self.on = True

    return wrapped


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_test_passes_make_no_new_call(tiny_llama, tmp_path, monkeypatch):
    """Every attention call a test pass makes was replayed before it, in its dtype."""
    made, original = set(), F.scaled_dot_product_attention
    cfg = run_config(tmp_path / "gpu", model=str(tiny_llama), device="cuda", batch_size=2, max_tokens=400)

    replayed = {}

    def record_replays(calls, dtypes, device):
        for d in dtypes:
            replayed.setdefault(d, set()).update(calls)
        return attention_warm.replay(calls, dtypes, device)

    monkeypatch.setattr(attention, "replay", record_replays)

    def spy(q, k, v, attn_mask=None, **kw):
        if q.dtype != torch.float32:
            made.add((q.dtype, attention_warm._call_of((q, k, v, attn_mask), kw)))
        return original(q, k, v, attn_mask=attn_mask, **kw)

    results, _ = run_pair(cfg, str(tiny_llama), observers=(_SpyDuringTests(spy),))
    assert made and all(call in replayed.get(dtype, ()) for dtype, call in made)
    assert results.provenance["attention_warm"]["recorded_calls"] >= 1


class _SpyDuringTests:
    """Installs `spy` as scaled_dot_product_attention during test passes only."""

    part = "spy"

    def __init__(self, spy):
        self.spy, self.saved = spy, None

    def pass_started(self, ctx):
        if ctx.role == "test":
            self.saved, F.scaled_dot_product_attention = F.scaled_dot_product_attention, self.spy

    def pass_finished(self, ctx):
        if self.saved is not None:
            F.scaled_dot_product_attention, self.saved = self.saved, None
