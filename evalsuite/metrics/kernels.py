"""One fused GPU pass over two logit rows: the divergence statistics without float64 temporaries.

Why: computed with torch ops in float64, the per-token KL of a 152k vocabulary streams about
150 bytes per logit through memory (two upcasts, two log-softmaxes, exp, products, sums) and
made the FP16/BF16 passes 5-7x slower than the forward pass itself (docs/performance.md). This kernel
reads each reference (float32) and test (any float) logit once and keeps every accumulator in
float64 registers (one set per lane, merged at the end of the row), using the online-softmax
recurrence:

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

BLOCK, NUM_WARPS = 512, 8  # lanes per row and warps per program: measured by perf/perf_gpu.py (stage kernel)
# The kernel's output columns, in the order its stores write them (the `tl.store(out + i, ...)` lines
# below); callers read a column by name through COL, never by a bare index.
COLUMNS = ("kl", "lse_ref", "lse_test", "max_abs_dlogit", "argmax_ref", "argmax_test", "nonfinite_test",
           "nonfinite_ref")
COL = {name: i for i, name in enumerate(COLUMNS)}
N_OUT = len(COLUMNS)

if triton is not None:

    @triton.jit
    def _lanes_kernel(ref_ptr, test_ptr, out_ptr, V: tl.constexpr, stride_ref, stride_test, BLOCK: tl.constexpr):
        """One program per row; each of the BLOCK lanes keeps its own online-softmax state.

        No cross-lane reduction inside the loop (a block reduction costs barriers; ~9 of them
        per step made the first version of this kernel 4x slower): the lanes are merged once at
        the end. Per logit and side, one float64 exp: with t = exp(-|x - m|), a new maximum
        rescales the sums (z = z*t + 1), anything else adds to them (z = z + t).
        """
        row = tl.program_id(0).to(tl.int64)
        ref_row = ref_ptr + row * stride_ref
        test_row = test_ptr + row * stride_test
        neg_inf = float("-inf")
        m_r = tl.full((BLOCK,), neg_inf, tl.float64)
        m_t = tl.full((BLOCK,), neg_inf, tl.float64)
        z_r = tl.zeros((BLOCK,), tl.float64)
        z_t = tl.zeros((BLOCK,), tl.float64)
        s = tl.zeros((BLOCK,), tl.float64)
        dmax = tl.zeros((BLOCK,), tl.float64)
        arg_r = tl.zeros((BLOCK,), tl.int32)
        arg_t = tl.zeros((BLOCK,), tl.int32)
        bad_r = tl.zeros((BLOCK,), tl.int32)
        bad_t = tl.zeros((BLOCK,), tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            xr = tl.load(ref_row + offs, mask=mask, other=neg_inf).to(tl.float64)
            xt = tl.load(test_row + offs, mask=mask, other=neg_inf).to(tl.float64)
            bad_r += (mask & ~(tl.abs(xr) < float("inf"))).to(tl.int32)
            bad_t += (mask & ~(tl.abs(xt) < float("inf"))).to(tl.int32)
            d = tl.where(mask, xr - xt, 0.0)
            dmax = tl.maximum(dmax, tl.abs(d))
            # reference: max, sum of exp, and sum of exp * (x_ref - x_test), relative to m_r
            gt = xr > m_r
            e = tl.where(gt, m_r - xr, xr - m_r)  # <= 0; NaN when both are -inf (weight 0)
            t = tl.exp(tl.where(e == e, e, neg_inf))
            z_r = tl.where(gt, z_r * t + 1.0, z_r + t)
            s = tl.where(gt, s * t + d, s + t * d)
            arg_r = tl.where(gt, offs, arg_r)
            m_r = tl.where(gt, xr, m_r)
            # test: max and sum of exp
            gt = xt > m_t
            e = tl.where(gt, m_t - xt, xt - m_t)
            t = tl.exp(tl.where(e == e, e, neg_inf))
            z_t = tl.where(gt, z_t * t + 1.0, z_t + t)
            arg_t = tl.where(gt, offs, arg_t)
            m_t = tl.where(gt, xt, m_t)
        # merge the lanes: rescale each lane's sums to the row maximum
        big_r = tl.max(m_r, axis=0)
        w = m_r - big_r
        w = tl.exp(tl.where(w == w, w, neg_inf))  # (BLOCK,)
        zr = tl.sum(z_r * w, axis=0)
        sr = tl.sum(s * w, axis=0)
        big_t = tl.max(m_t, axis=0)
        w = m_t - big_t
        w = tl.exp(tl.where(w == w, w, neg_inf))
        zt = tl.sum(z_t * w, axis=0)
        # argmax: the lowest index among the lanes that hold the maximum (ties keep the first)
        first_r = tl.min(tl.where(m_r == big_r, arg_r, V), axis=0)
        first_t = tl.min(tl.where(m_t == big_t, arg_t, V), axis=0)
        lse_r = big_r + tl.log(zr)
        lse_t = big_t + tl.log(zt)
        out = out_ptr + row * 8  # N_OUT columns, in COLUMNS order
        tl.store(out + 0, sr / zr - lse_r + lse_t)
        tl.store(out + 1, lse_r)
        tl.store(out + 2, lse_t)
        tl.store(out + 3, tl.max(dmax, axis=0))
        tl.store(out + 4, first_r.to(tl.float64))
        tl.store(out + 5, first_t.to(tl.float64))
        tl.store(out + 6, tl.sum(bad_t, axis=0).to(tl.float64))
        tl.store(out + 7, tl.sum(bad_r, axis=0).to(tl.float64))


def available(device: torch.device) -> bool:
    """On CUDA with triton; on CPU only under TRITON_INTERPRET=1 (how the CPU tests run it)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def fused_rows(ref: torch.Tensor, test: torch.Tensor, block: int = BLOCK, num_warps: int = NUM_WARPS) -> torch.Tensor:
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
        _lanes_kernel[(c,)](ref, test, out, v, ref.stride(0), test.stride(0), BLOCK=block, num_warps=num_warps)
    return out
