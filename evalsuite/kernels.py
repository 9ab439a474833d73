"""One fused GPU pass over two logit rows: the divergence statistics without float64 temporaries.

Why: computed with torch ops in float64, the per-token KL of a 152k vocabulary streams about
150 bytes per logit through memory (two upcasts, two log-softmaxes, exp, products, sums) and
made the FP16/BF16 passes 5-7x slower than the forward pass itself (BENCHMARKS.md). This kernel
reads each reference (float32) and test (any float) logit once and keeps every accumulator in
float64 registers, using the online-softmax recurrence:

    m, Z   running max and sum_v exp(x_v - m)           (rescaled by exp(m_old - m_new))
    S      sum_v exp(x_ref_v - m_ref) * (x_ref_v - x_test_v)
    KL(ref || test) = S / Z_ref - lse_ref + lse_test,   lse = m + log Z

All of it in float64, so the cancellation in the last line costs ~1e-14 absolute.
Triton is optional: without it (CPU, or no triton installed) `divergence.py` uses torch ops.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

N_OUT = 8  # kl, lse_ref, lse_test, max|dlogit|, argmax_ref, argmax_test, nonfinite_test, nonfinite_ref

if triton is not None:

    @triton.jit
    def _rows_kernel(ref_ptr, test_ptr, out_ptr, V: tl.constexpr, stride_ref, stride_test, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ref_row = ref_ptr + row * stride_ref
        test_row = test_ptr + row * stride_test
        neg_inf = float("-inf")
        m_r = tl.full((), neg_inf, tl.float64)
        m_t = tl.full((), neg_inf, tl.float64)
        z_r = tl.zeros((), tl.float64)
        z_t = tl.zeros((), tl.float64)
        s = tl.zeros((), tl.float64)
        dmax = tl.zeros((), tl.float64)
        best_r = tl.full((), neg_inf, tl.float64)
        best_t = tl.full((), neg_inf, tl.float64)
        arg_r = tl.zeros((), tl.int64)
        arg_t = tl.zeros((), tl.int64)
        bad_t = tl.zeros((), tl.int64)
        bad_r = tl.zeros((), tl.int64)
        for i in range(0, (V + BLOCK - 1) // BLOCK):
            start = i * BLOCK
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            xr = tl.load(ref_row + offs, mask=mask, other=neg_inf).to(tl.float64)
            xt = tl.load(test_row + offs, mask=mask, other=neg_inf).to(tl.float64)
            bad_t += tl.sum((mask & ~(tl.abs(xt) < float("inf"))).to(tl.int64), axis=0)
            bad_r += tl.sum((mask & ~(tl.abs(xr) < float("inf"))).to(tl.int64), axis=0)
            # argmax: a strictly larger block max moves it, so ties keep the first index
            blk_r = tl.max(xr, axis=0)
            idx_r = tl.argmax(xr, axis=0)
            arg_r = tl.where(blk_r > best_r, start + idx_r.to(tl.int64), arg_r)
            best_r = tl.maximum(best_r, blk_r)
            blk_t = tl.max(xt, axis=0)
            idx_t = tl.argmax(xt, axis=0)
            arg_t = tl.where(blk_t > best_t, start + idx_t.to(tl.int64), arg_t)
            best_t = tl.maximum(best_t, blk_t)
            # online softmax sums
            new_r = tl.maximum(m_r, blk_r)
            new_t = tl.maximum(m_t, blk_t)
            scale_r = tl.exp(m_r - new_r)
            e_r = tl.exp(xr - new_r)
            d = tl.where(mask, xr - xt, 0.0)
            z_r = z_r * scale_r + tl.sum(e_r, axis=0)
            s = s * scale_r + tl.sum(e_r * d, axis=0)
            z_t = z_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(xt - new_t), axis=0)
            dmax = tl.maximum(dmax, tl.max(tl.abs(d), axis=0))
            m_r = new_r
            m_t = new_t
        lse_r = m_r + tl.log(z_r)
        lse_t = m_t + tl.log(z_t)
        out = out_ptr + row * 8
        tl.store(out + 0, s / z_r - lse_r + lse_t)
        tl.store(out + 1, lse_r)
        tl.store(out + 2, lse_t)
        tl.store(out + 3, dmax)
        tl.store(out + 4, arg_r.to(tl.float64))
        tl.store(out + 5, arg_t.to(tl.float64))
        tl.store(out + 6, bad_t.to(tl.float64))
        tl.store(out + 7, bad_r.to(tl.float64))


def available(device: torch.device) -> bool:
    """On CUDA with triton; on CPU only under TRITON_INTERPRET=1 (how the CPU tests run it)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def fused_rows(ref: torch.Tensor, test: torch.Tensor, block: int = 2048, num_warps: int = 4) -> torch.Tensor:
    """ref (C, V) float32, test (C, V) any float, unit stride along V -> (C, 8) float64.

    Columns: KL(ref||test), lse_ref, lse_test, max |test - ref|, argmax_ref, argmax_test,
    non-finite count in test, non-finite count in ref. Rows with non-finite inputs give
    NaN statistics; the caller masks them by the counts.
    """
    if ref.stride(-1) != 1:
        ref = ref.contiguous()
    if test.stride(-1) != 1:
        test = test.contiguous()
    c, v = ref.shape
    out = torch.empty((c, N_OUT), dtype=torch.float64, device=ref.device)
    if c:
        _rows_kernel[(c,)](ref, test, out, v, ref.stride(0), test.stride(0), BLOCK=block, num_warps=num_warps)
    return out
