"""Which first call of a forward pays the CUDA driver's JIT (a kernel shipped as PTX only)?

    CUDA_CACHE_DISABLE=1 python perf/jit_probe.py --model /tmp/fresh-qwen2-0.5b [--prewarm tiny|exact|thread]

Why: on a fresh H200 machine the first processes' FP16/BF16 passes took 0.7-0.9 s longer than
later ones, and ~/.nv/ComputeCache (the driver's cache of PTX compiled to the card) grew from
nothing to 692 KB in the first process that kept it (round 9, docs/performance.md). With the cache
disabled every process paid it again. This loads the model at each dtype, times its first and
second forward of one (batch, 2048) batch (synchronised), and prints the aten ops whose first call
took the most CPU time (a lazily loaded module is JIT-compiled inside the launch). `--prewarm`
first runs scaled_dot_product_attention in the model's head layout (see `prewarm`), to see
whether warming that one op removes the cost, and from which thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from evalsuite.model.attention_warm import recording, replay


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def prewarm_sdpa(config, dtype, batch: int, seq: int) -> float:
    """SDPA with the model's heads, KV heads and head size, causal, laid out as HF's projections
    leave them ((B, S, H, D) viewed as (B, H, S, D)): the pass's kernel at (batch, seq)."""
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q = torch.zeros(batch, seq, heads, dim, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.zeros(batch, seq, kv, dim, device="cuda", dtype=dtype).transpose(1, 2)
    return sync_time(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=kv != heads))


def prewarm(mode: str, config, dtype, batch: int, calls: dict) -> float | None:
    """none; tiny (16 tokens, this thread); exact (the pass's shape, this thread); thread (the pass's
    shape in another thread, joined: does the warm-up carry over to the main thread's own call?);
    replay / replay-thread (the FP32 forward's recorded calls, model/attention_warm.py)."""
    if mode == "none":
        return None
    if mode.startswith("replay"):
        fn = partial(replay, list(calls), [dtype], torch.device("cuda"))
        if mode == "replay":
            return sync_time(fn)
        t = threading.Thread(target=lambda: (fn(), torch.cuda.synchronize()))
        t0 = time.perf_counter()
        t.start()
        t.join()
        return time.perf_counter() - t0
    if mode == "tiny":
        return prewarm_sdpa(config, dtype, 1, 16)
    if mode == "exact":
        return prewarm_sdpa(config, dtype, batch, 2048)
    box = {}
    t = threading.Thread(target=lambda: box.update(s=prewarm_sdpa(config, dtype, batch, 2048)))
    t.start()
    t.join()
    return box["s"]


def measure(model, ids: torch.Tensor, mode: str, batch: int, calls: dict) -> dict:
    """The first forward (profiled) and the second, after the chosen SDPA warm-up; an FP32 model's
    first forward records its attention calls into `calls`."""
    entry = {
        "prewarm_s": prewarm(mode, model.config, model.dtype, batch, calls)
        if model.dtype != torch.float32
        else None
    }
    rec = recording(calls) if model.dtype == torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), rec, profile(activities=[ProfilerActivity.CPU]) as prof:
        entry["first_s"] = sync_time(lambda: model(ids))
    with torch.no_grad():
        entry["second_s"] = sync_time(lambda: model(ids))
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    entry["top_self_cpu_ms"] = {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in ops}
    return entry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument(
        "--prewarm", choices=["none", "tiny", "exact", "thread", "replay", "replay-thread"], default="none"
    )
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ids = torch.randint(0, 1000, (args.batch, 2048), device="cuda")
    out, calls = {}, {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map="cuda").eval()
        out[name] = measure(model, ids, args.prewarm, args.batch, calls)
        out[name]["recorded_calls"] = len(calls)
        del model
        torch.cuda.empty_cache()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
