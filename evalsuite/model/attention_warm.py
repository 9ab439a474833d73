"""Record the attention calls of a pass, and replay them in another dtype before that dtype's pass.

Why: on an H200 with torch 2.11, FP16 and BF16 attention runs on cuDNN, which builds (and
runtime-compiles) a kernel for each exact call: shapes, strides, mask and flags. In a machine's
first processes that took 0.5-1.0 s per dtype inside the first batch of the timed pass
(`aten::_cudnn_attention_forward`, perf/jit_probe.py, docs/performance.md "Round 9"); a later
process finds the compiled code in the driver's cache. A warm-up must be exact: SDPA on tensors
shaped like the model's but laid out by guess left the cost in the pass.

So the reference pass records what its model hands `scaled_dot_product_attention` (the test
models run the same code on the same windows, in another dtype), and `replay` makes those calls
in a test dtype on zero tensors of the same shapes and strides. What is replayed never reaches a
result: a wrong or missing signature costs time, never a number.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_SIGNATURES = 16  # distinct calls kept (a decoder has one or two: full and sliding-window layers)


@dataclass(frozen=True)
class Operand:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    floating: bool  # replayed in the test dtype (a bool mask stays bool)

    @classmethod
    def of(cls, t: torch.Tensor) -> Operand:
        return cls(tuple(t.shape), tuple(t.stride()), t.is_floating_point())

    def zeros(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = torch.empty_strided(
            self.shape, self.stride, dtype=dtype if self.floating else torch.bool, device=device
        )
        return out.zero_()


@dataclass(frozen=True)
class Call:
    """One distinct scaled_dot_product_attention call, without its values."""

    q: Operand
    k: Operand
    v: Operand
    mask: Operand | None
    options: tuple[tuple[str, object], ...]  # dropout_p, is_causal, scale, enable_gqa as passed

    def replay(self, dtype: torch.dtype, device: torch.device) -> None:
        mask = self.mask.zeros(dtype, device) if self.mask is not None else None
        F.scaled_dot_product_attention(
            self.q.zeros(dtype, device),
            self.k.zeros(dtype, device),
            self.v.zeros(dtype, device),
            attn_mask=mask,
            **dict(self.options),
        )


def _call_of(args: tuple, kwargs: dict) -> Call | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args, strict=False)) | kwargs
    q, k, v, mask = (bound.get(n) for n in ("query", "key", "value", "attn_mask"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not (
        mask is None or isinstance(mask, torch.Tensor)
    ):
        return None
    options = tuple(
        sorted((n, bound[n]) for n in ("dropout_p", "is_causal", "scale", "enable_gqa") if n in bound)
    )
    return Call(
        Operand.of(q), Operand.of(k), Operand.of(v), Operand.of(mask) if mask is not None else None, options
    )


@contextlib.contextmanager
def recording(calls: dict[Call, None]):
    """Within: every distinct scaled_dot_product_attention call's signature is added to `calls`.

    The wrapper replaces `torch.nn.functional.scaled_dot_product_attention`, which transformers
    looks up at each call; it only reads shapes and strides (no device work, no sync)."""
    original = F.scaled_dot_product_attention

    def wrapper(*args, **kwargs):
        if len(calls) < MAX_SIGNATURES:
            call = _call_of(args, kwargs)
            if call is not None:
                calls.setdefault(call, None)
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = wrapper
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def warmed(dtypes) -> tuple[torch.dtype, ...]:
    """The dtypes a replay is for, each once: the 2-byte ones (FP32 attention is not cuDNN's)."""
    return tuple(d for d in dict.fromkeys(dtypes) if d.itemsize == 2)


def replay(calls, dtypes, device: torch.device) -> int:
    """Make each recorded call in each of the `warmed` dtypes; returns how many ran. A call that
    fails is skipped: the pass itself will say what is wrong."""
    done = 0
    with torch.no_grad():
        for dtype in warmed(dtypes):
            for call in calls:
                try:
                    call.replay(dtype, device)
                    done += 1
                except (RuntimeError, ValueError, TypeError):
                    continue
    return done
