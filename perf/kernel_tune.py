"""Time the fused divergence kernel (evalsuite/metrics/kernels.py) against what it replaces, on a GPU.

    python perf/kernel_tune.py        # prints a table; docs/performance.md records it

Shapes: C tokens x V = 151,936 (Qwen2's vocabulary), reference float32, test bfloat16.
Baselines: the torch float64 path (divergence.py on CUDA without triton) and the cost the plain
loop pays for its loss: `cross_entropy` on the same bf16 logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evalsuite.metrics import kernels  # noqa: E402
from evalsuite.metrics.divergence import token_divergence  # noqa: E402


def main() -> None:
    c, v = 1766, 151_936
    torch.manual_seed(0)
    ref = torch.randn(c, v, device="cuda") * 3
    test = (ref + torch.randn(c, v, device="cuda") * 0.05).to(torch.bfloat16)
    tg = torch.randint(0, v, (c,), device="cuda")
    bytes_moved = c * v * (4 + 2)
    rows = []
    for block in (1024, 2048, 4096):
        for warps in (4, 8, 16):
            ms = triton.testing.do_bench(lambda b=block, w=warps: kernels.fused_rows(ref, test, b, w),
                                         warmup=50, rep=300, return_mode="median")
            rows.append((f"fused BLOCK={block} warps={warps}", ms))
    ms = triton.testing.do_bench(lambda: token_divergence(ref, test, tg), warmup=50, rep=300, return_mode="median")
    rows.append(("token_divergence (fused default + gathers)", ms))
    saved = kernels.triton
    kernels.triton = None  # force the torch float64 path
    try:
        ms = triton.testing.do_bench(lambda: token_divergence(ref, test, tg), warmup=20, rep=200, return_mode="median")
        rows.append(("torch float64 path", ms))
    finally:
        kernels.triton = saved
    ms = triton.testing.do_bench(lambda: torch.nn.functional.cross_entropy(test.float(), tg), warmup=50, rep=300,
                                 return_mode="median")
    rows.append(("plain loop's loss: cross_entropy(bf16->fp32)", ms))
    print(f"{torch.cuda.get_device_name(0)}; C={c} tokens, V={v}")
    for name, ms in rows:
        print(f"{name:48s} {ms:8.3f} ms  {c / ms * 1e3:12.0f} tok/s  {bytes_moved / ms / 1e6:8.1f} GB/s (ref+test read once)")


if __name__ == "__main__":
    main()
