"""Two things that make a CPU run 3-5x faster without changing what is computed.

1. Half-precision GEMMs as FP32 GEMMs of the same operands (`fp32_accumulating_linears`).
   On a CPU without AVX512-FP16/AMX (this project's 2-core CI box has AVX2 only), PyTorch runs an
   FP16 or BF16 `nn.Linear` through its generic kernel at 17-20 GFLOP/s against 94-111 for FP32
   (measured, docs/performance.md). That kernel multiplies the half operands exactly (an
   FP16 x FP16 product has 22 significant bits, BF16 x BF16 16: both exact in FP32), adds them up in
   FP32 and rounds the sum plus the bias to the half format once. An FP32 GEMM of the same operands
   rounded once to the half format is the same arithmetic (and what a GPU's tensor cores do with
   FP32 accumulation); only the order of the FP32 additions differs, as between any two correct
   GEMMs: on random (256, 640) x (640, 2048) products 99.8 % of FP16 outputs (99.99 % of BF16) are
   bit-identical to the generic kernel's, the rest one half-format unit apart, and both stay
   within the same error bound of the exact product (tests/model/test_cpu.py). An overflow is
   the same inf. `--cpu-half-gemm native` keeps PyTorch's kernel.

2. The allocator (`tune_allocator`). glibc serves every allocation above its mmap threshold
   (32 MiB at most) with a fresh mmap, so each (C, V) float64 temporary of the divergence
   statistics page-faults in anew: 11.4 ms a token for Gemma 3's 262,144-entry vocabulary, 3.8 ms
   with the threshold raised (perf/cpu_divergence.py). PyTorch's CPU tuning guide recommends
   jemalloc/tcmalloc for this reason; raising glibc's thresholds is the in-process equivalent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap and are reused
_TRIM_THRESHOLD = 2 << 30  # the heap keeps up to 2 GiB of freed memory for the next chunk


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix instructions for `dtype` that PyTorch's oneDNN path uses
    (AMX or AVX512-BF16 for BF16, AMX-FP16 for FP16): there the native kernel is the fast one."""
    cpu = torch.cpu
    probes = {torch.bfloat16: ("_is_amx_tile_supported", "_is_avx512_bf16_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}.get(dtype, ())
    return any(getattr(cpu, name, lambda: False)() for name in probes)


def fp32_accumulating_linears(model: torch.nn.Module, mode: str = "auto") -> int:
    """Route each CPU nn.Linear with FP16/BF16 weights through an FP32 GEMM; returns how many.

    Each such module keeps an FP32 copy of its weight (the half values, exactly), so the cost is
    4 bytes a parameter beside the model's 2: fine for the models one scores on a CPU. A Linear
    whose input is not in its weight's dtype is left to PyTorch (it would raise there). mode
    "auto" leaves the dtypes this CPU has instructions for (native_half_gemm) to PyTorch, "fp32"
    routes every half Linear, "native" none.
    """
    if mode == "native":
        return 0
    done = 0
    copies: dict[int, torch.Tensor] = {}  # id(weight) -> FP32 copy: tied weights share one
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.device.type != "cpu":
            continue
        if module.weight.dtype not in _HALF or (mode == "auto" and native_half_gemm(module.weight.dtype)):
            continue
        w = module.weight
        if id(w) not in copies:
            copies[id(w)] = w.detach().float()
        w32 = copies[id(w)]
        b32 = None if module.bias is None else module.bias.detach().float()
        module.forward = _forward(module, w32, b32)
        done += 1
    return done


def _forward(module: torch.nn.Linear, w32: torch.Tensor, b32: torch.Tensor | None):
    original = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != module.weight.dtype:
            return original(x)
        return F.linear(x.float(), w32, b32).to(x.dtype)  # (..., out): rounded once, like the half kernel

    return forward
