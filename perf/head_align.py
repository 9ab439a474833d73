"""Is the LM head slow because its output rows are misaligned? (H200 exploration behind docs/performance.md)

    python perf/head_align.py --out $OUT

A 49,953-token vocabulary gives (C, V) logits whose rows start at odd element offsets: a bf16
row is 99,906 bytes, not a multiple of 16, so cuBLAS cannot use its aligned tensor-core kernels
for the output and Triton cannot use 16-byte loads when reading rows. This times, per token:
the head as `F.linear(h, W)` (what the model and the plain loop do), as `torch.mm` into a view of
a row-padded buffer (same (C, V) values, rows 128-element aligned), and with a zero-padded weight;
and the divergence kernel over packed vs padded rows. Values are checked equal up to the
dtype's rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench(fn) -> float:
    """Median milliseconds (events), after warm-up."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def pad_to(v: int, multiple: int = 128) -> int:
    return -(-v // multiple) * multiple


def head_rows(tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(tokens, hidden, device="cuda", dtype=dtype, generator=g)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=dtype, generator=g) * hidden**-0.5)
    vp = pad_to(vocab)
    buf = torch.empty(tokens, vp, device="cuda", dtype=dtype)
    view = buf[:, :vocab]
    wpad = torch.zeros(vp, hidden, device="cuda", dtype=dtype)
    wpad[:vocab] = w
    ptr = view.data_ptr()
    ref = F.linear(h, w)
    torch.mm(h, w.t(), out=view)
    same_ptr = view.data_ptr() == ptr
    err_out = float((view.float() - ref.float()).abs().max())
    err_pad = float((F.linear(h, wpad)[:, :vocab].float() - ref.float()).abs().max())
    del ref
    flops = 2.0 * tokens * hidden * vocab
    row = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": str(dtype).split(".")[-1],
           "out_view_in_place": same_ptr, "max_abs_diff_out_view": err_out, "max_abs_diff_padded_w": err_pad}
    for name, fn in {"linear": lambda: F.linear(h, w),
                     "mm_out_padded_rows": lambda: torch.mm(h, w.t(), out=view),
                     "linear_padded_weight": lambda: F.linear(h, wpad)}.items():
        ms = bench(fn)
        row[f"{name}_ms"] = ms
        row[f"{name}_us_per_tok"] = ms * 1e3 / tokens
        row[f"{name}_tflops"] = flops / ms / 1e9
    return row


def kernel_rows(tokens: int, vocab: int) -> dict:
    from evalsuite.metrics import kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    vp = pad_to(vocab)
    ref_p = torch.randn(tokens, vp, device="cuda", generator=g) * 3
    test_p = (ref_p + 0.01 * torch.randn(tokens, vp, device="cuda", generator=g)).bfloat16()
    ref = ref_p[:, :vocab].contiguous()
    test = test_p[:, :vocab].contiguous()
    a = kernels.fused_rows(ref, test)
    b = kernels.fused_rows(ref_p[:, :vocab], test_p[:, :vocab])
    out = {"tokens": tokens, "vocab": vocab, "equal": bool(torch.equal(a, b))}
    out["packed_ms"] = bench(lambda: kernels.fused_rows(ref, test))
    out["padded_rows_ms"] = bench(lambda: kernels.fused_rows(ref_p[:, :vocab], test_p[:, :vocab]))
    out["bytes_gb"] = tokens * vocab * 6 / 1e9
    for k in ("packed", "padded_rows"):
        out[f"{k}_gb_s"] = out["bytes_gb"] / out[f"{k}_ms"] * 1e3
        out[f"{k}_us_per_tok"] = out[f"{k}_ms"] * 1e3 / tokens
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "head": [], "kernel": []}
    for tokens, hidden in [(5374, 896), (16384, 896), (5374, 4096), (8192, 4096)]:
        for vocab in (49953, 151936):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                if vocab == 151936 and dtype == torch.float32 and tokens > 5374:
                    continue
                r = head_rows(tokens, hidden, vocab, dtype)
                res["head"].append(r)
                print(f"head T={tokens:6d} H={hidden:5d} V={vocab:6d} {r['dtype']:9s} "
                      f"linear {r['linear_us_per_tok']:.3f} us/tok ({r['linear_tflops']:.0f} TF/s)  "
                      f"mm->padded rows {r['mm_out_padded_rows_us_per_tok']:.3f} ({r['mm_out_padded_rows_tflops']:.0f})  "
                      f"padded W {r['linear_padded_weight_us_per_tok']:.3f} ({r['linear_padded_weight_tflops']:.0f})  "
                      f"in place {r['out_view_in_place']} diff {r['max_abs_diff_out_view']:.2e}/{r['max_abs_diff_padded_w']:.2e}",
                      flush=True)
    for tokens, vocab in [(5374, 49953), (1766, 151936)]:
        r = kernel_rows(tokens, vocab)
        res["kernel"].append(r)
        print(f"kernel C={tokens} V={vocab}: packed {r['packed_ms']:.3f} ms ({r['packed_gb_s']:.0f} GB/s) "
              f"padded rows {r['padded_rows_ms']:.3f} ms ({r['padded_rows_gb_s']:.0f} GB/s) equal {r['equal']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "head_align.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
