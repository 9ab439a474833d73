"""model/attention_warm.py: attention calls recorded without their values, replayed in another dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evalsuite.model import attention_warm
from evalsuite.model.attention_warm import recording, replay

ORIGINAL = F.scaled_dot_product_attention


def _bshd(b, s, h, d, dtype=torch.float32):
    """(B, S, H, D) viewed as (B, H, S, D): how HF's projections hand queries to attention."""
    return torch.randn(b, s, h, d, dtype=dtype).transpose(1, 2)


def test_each_distinct_call_is_recorded_once_with_its_layout():
    q, k = _bshd(2, 8, 4, 16), torch.randn(2, 2, 8, 16)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    calls = {}
    with recording(calls):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, k, is_causal=True, scale=0.25, enable_gqa=True)
        F.scaled_dot_product_attention(q, k, k, mask, enable_gqa=True)
    assert F.scaled_dot_product_attention is ORIGINAL
    assert len(calls) == 2
    causal, masked = list(calls)
    assert causal.q.shape == (2, 4, 8, 16) and causal.q.stride == (512, 16, 64, 1)  # 8*4*16, 16, 4*16, 1
    assert causal.k.shape == (2, 2, 8, 16) and causal.k.stride == (256, 128, 16, 1)
    assert causal.mask is None and dict(causal.options) == {
        "is_causal": True,
        "scale": 0.25,
        "enable_gqa": True,
    }
    assert masked.mask.shape == (2, 1, 8, 8) and not masked.mask.floating
    assert dict(masked.options) == {"enable_gqa": True}


def test_the_patch_is_removed_when_the_pass_fails():
    with pytest.raises(RuntimeError, match="boom"), recording({}):
        raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL


def test_at_most_max_signatures_are_kept(monkeypatch):
    monkeypatch.setattr(attention_warm, "MAX_SIGNATURES", 2)
    calls = {}
    with recording(calls):
        for s in (4, 5, 6, 7):
            x = torch.randn(1, 2, s, 8)
            F.scaled_dot_product_attention(x, x, x)
    assert [c.q.shape[2] for c in calls] == [4, 5]


def _spy(monkeypatch) -> list:
    seen = []

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(
            (
                q.dtype,
                tuple(q.shape),
                q.stride(),
                k.stride(),
                None if attn_mask is None else attn_mask.dtype,
                tuple(sorted(kw.items())),
            )
        )
        return ORIGINAL(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def test_replay_makes_the_recorded_calls_in_each_two_byte_dtype(monkeypatch):
    q, k = _bshd(1, 6, 4, 8), torch.randn(1, 2, 6, 8)
    float_mask = torch.zeros(1, 1, 6, 6)
    calls = {}
    with recording(calls):
        F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        F.scaled_dot_product_attention(q, k, k, attn_mask=float_mask, enable_gqa=True)
    seen = _spy(monkeypatch)
    assert (
        replay(
            list(calls), [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16], torch.device("cpu")
        )
        == 4
    )
    layout = ((1, 4, 6, 8), q.stride(), k.stride())
    assert seen == [
        (torch.bfloat16, *layout, None, (("enable_gqa", True), ("is_causal", True))),
        (torch.bfloat16, *layout, torch.bfloat16, (("enable_gqa", True),)),
        (torch.float16, *layout, None, (("enable_gqa", True), ("is_causal", True))),
        (torch.float16, *layout, torch.float16, (("enable_gqa", True),)),
    ]


def test_a_call_that_cannot_be_replayed_is_skipped(monkeypatch):
    calls = {}
    with recording(calls):
        x = torch.randn(1, 2, 4, 8)
        F.scaled_dot_product_attention(x, x, x)

    def failing(*a, **kw):
        raise RuntimeError("no kernel for this layout")

    monkeypatch.setattr(F, "scaled_dot_product_attention", failing)
    assert replay(list(calls), [torch.float16], torch.device("cpu")) == 0


def _gemma3(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_fp32_and_half_models_make_the_same_calls(arch, tmp_path, request):
    """The premise: a test model calls attention exactly as the FP32 reference did on the same batch
    (shapes, strides, mask, flags), so the reference's calls are the test pass's."""
    from transformers import AutoModelForCausalLM

    if arch == "gemma3":
        model = _gemma3(tmp_path)
    else:
        path = request.getfixturevalue("tiny_llama" if arch == "llama" else "tiny_qwen_no_bos")
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    ids = torch.randint(0, 60, (3, 12))
    by_dtype = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        calls = {}
        with torch.no_grad(), recording(calls):
            model.to(dtype)(ids)
        by_dtype[dtype] = list(calls)
    assert (
        by_dtype[torch.float32]
        and by_dtype[torch.bfloat16] == by_dtype[torch.float32] == by_dtype[torch.float16]
    )
    if arch == "gemma3":  # sliding and full layers: two masks
        assert len(by_dtype[torch.float32]) == 2
