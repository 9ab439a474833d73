"""Where a test dtype's pass spends its time (0.5B shape, BF16): decomposition and profiler table.

    python perf/profile_pass.py --text .bench/199801.txt --tokenizer .bench/tok49953 --out $OUT

Same windows, same card, same process: the decoder body alone; body + chunked LM head (chunks
consumed, nothing computed on them); the whole test pass (`run_pass` with `passes.compare`
against a float32 reference buffer); and the plain `model(ids, labels=ids)` loop. Differences
give the head's and the statistics' shares. Then one torch.profiler trace of the whole pass,
its top CUDA kernels written to $OUT/profile_pass.txt.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
import perf_gpu  # noqa: E402


def timed(fn) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    ap = baselines.script_args("/tmp/evalsuite-profile")
    ap.add_argument("--shape", default="qwen2-0.5b")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--more-batches", default="16,32", help="the whole pass again at these batch sizes")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--numerics", action="store_true",
                    help="the test pass's numerics hooks attached (absmax per watched module), as a run has them")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from evalsuite.model.batching import run_pass
    from evalsuite.model.forward import Scorer
    from evalsuite.model.loading import load_model
    from evalsuite.model.modules import find_modules
    from evalsuite.model.precision import DTYPES
    from evalsuite.numerics.hooks import Recorder
    from evalsuite.passes.scoring import compare, staging

    vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    path = baselines.build_random_model(args.shape, vocab, args.work / args.shape, tokenizer_dir=args.tokenizer)
    _tok, ids = perf_gpu.windows_for(args.tokenizer, args.text, args.tokens)
    windows = [w for w in ids.numpy()]
    n = ids.shape[0] * (ids.shape[1] - 1)
    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
                 "vocab": vocab, "tokens": n, "batch": args.batch, "dtype": args.dtype, "numerics": args.numerics}
    tdtype = DTYPES[args.dtype].dtype

    model, _ = baselines.load_for_plain_loop(path, tdtype)
    res["plain_loop_tok_s"] = baselines.plain_loop(model, ids, args.batch)["tokens_per_s"]
    del model
    torch.cuda.empty_cache()

    model = load_model(str(path), DTYPES[args.dtype], dev)
    scorer = Scorer(model, dev)
    def attach_recorder(model) -> Recorder | None:
        """The test pass's numerics hooks (absmax per watched module), with --numerics."""
        if not args.numerics:
            return None
        rec = Recorder(find_modules(model), dev, histogram=False)
        rec.attach()
        return rec

    recorder = attach_recorder(model)

    def on_batch(offset, ids):
        if recorder is not None:
            recorder.start_batch(offset)

    res["chunk_tokens"] = scorer.chunk_tokens
    ids_dev = ids.to(dev)
    dec = model.get_decoder()

    def body():
        with torch.inference_mode():
            for i in range(0, len(ids_dev), args.batch):
                dec(input_ids=ids_dev[i:i + args.batch, :-1], use_cache=False)

    def chunks_only():
        for i in range(0, len(ids_dev), args.batch):
            for _ in scorer.chunks(ids_dev[i:i + args.batch]):
                pass

    buffer = torch.randn(n, scorer.vocab_size, device=dev) * 2  # (N, V) float32 "reference" logits
    staged = staging(n, dev, divergence=True)

    def whole_pass():
        run_pass(scorer, windows, args.batch, partial(compare, buffer, staged), "pass", progress=False,
                 on_batch=on_batch)

    for name, fn in (("body", body), ("body_head", chunks_only), ("pass", whole_pass)):
        s = min(timed(fn) for _ in range(2))
        res[f"{name}_s"] = s
        res[f"{name}_us_per_tok"] = s / n * 1e6
        res[f"{name}_tok_s"] = n / s
    res["head_us_per_tok"] = res["body_head_us_per_tok"] - res["body_us_per_tok"]
    res["stats_us_per_tok"] = res["pass_us_per_tok"] - res["body_head_us_per_tok"]
    res["pass_vs_plain"] = res["pass_tok_s"] / res["plain_loop_tok_s"]
    res["padded_head"] = scorer.padded_head is not None
    for b in (int(x) for x in args.more_batches.split(",") if x):
        def at_batch(b=b):
            run_pass(scorer, windows, b, partial(compare, buffer, staged), "pass", progress=False, on_batch=on_batch)
        s = min(timed(at_batch) for _ in range(2))
        res[f"pass_batch{b}_tok_s"] = n / s
        res[f"pass_batch{b}_vs_plain"] = n / s / res["plain_loop_tok_s"]
    del scorer, model, buffer, staged
    recorder = None  # (on_batch reads it)
    torch.cuda.empty_cache()
    model, _ = baselines.load_for_plain_loop(path, tdtype)
    for b in (int(x) for x in args.more_batches.split(",") if x):  # the plain loop at the same batch sizes
        res[f"plain_loop_batch{b}_tok_s"] = baselines.plain_loop(model, ids, b)["tokens_per_s"]
    del model
    torch.cuda.empty_cache()
    model = load_model(str(path), DTYPES[args.dtype], dev)
    scorer = Scorer(model, dev)
    recorder = attach_recorder(model)
    buffer = torch.randn(n, scorer.vocab_size, device=dev) * 2
    staged = staging(n, dev, divergence=True)
    for k, v in res.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}", flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        whole_pass()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_pass_{args.shape}_{args.dtype}{'_numerics' if args.numerics else ''}"
    (args.out / f"{stem}.txt").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    print(table[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
