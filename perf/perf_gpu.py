"""The performance benchmark behind docs/performance.md (issue: performance and scale), baselines included.

    python perf/perf_gpu.py --text .bench/199801.txt --tokenizer .bench/tok49953 \
        --out $OUT --stages kernel,small,large,huge[,dp]

Everything on one card, same tokens, baselines in the same process:
- kernel: the fused divergence kernel's lane/warp variants on (C, V) chunks, against HF's loss path;
- small / large: random-init Qwen2-0.5B and Llama-2-7B shapes (vocabulary 49,953, sequence 2048):
  the plain `model(ids, labels=ids)` loop at FP32 (TF32 off) / FP16 / BF16 with its model loads,
  lm-eval's `loglikelihood_rolling` at BF16, and `evalsuite run` cold (reference computed and
  cached), from the cache, and without the cache, plus one run with the zh_mc benchmark;
- huge: Llama-2-13B shape, FP32 reference + FP16 + BF16 in 80 GB (the rest of the card is taken
  by a placeholder allocation before the run, so free memory is what an 80 GB card has);
- dp: the small/large runs again under `torchrun --nproc-per-node 2` (needs 2 GPUs).
Each stage writes `<stage>.json` under --out and prints a summary line per number.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402

SHAPES = {"small": ("qwen2-0.5b", 262144, 8), "large": ("llama2-7b", 65536, 4), "huge": ("llama2-13b", 32768, 4)}
H100_80GB_GIB = 79.6  # usable memory of an 80 GB card (81,559 MiB)


def log(*parts) -> None:
    print(*parts, flush=True)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the --smoke check of this script's plumbing


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_cuda() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def matmul_peak() -> float:
    """Dense BF16 matmul rate of this card (TFLOP/s), the MFU denominator measured, not quoted."""
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=200, rep=1000, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def _kernel_rows(v: int) -> list[dict]:
    """Every lane/warp variant on one (C, V) chunk (reference float32, test bf16), checked vs float64."""
    import triton.testing

    from evalsuite.metrics import kernels
    from evalsuite.metrics.divergence import token_divergence

    rows = []
    c = (1 << 30) // (4 * v)
    gen = torch.Generator(device="cuda").manual_seed(v)
    ref = torch.randn(c, v, device="cuda", generator=gen) * 3
    test = (ref + 0.01 * torch.randn(c, v, device="cuda", generator=gen)).bfloat16()
    tg = torch.randint(0, v, (c,), device="cuda", generator=gen)
    lr, lt = torch.log_softmax(ref[:64].double(), -1), torch.log_softmax(test[:64].double(), -1)
    kl64 = (lr.exp() * (lr - lt)).sum(-1)
    for block in (256, 512, 1024):
        for warps in (2, 4, 8):
            got = kernels.fused_rows(ref[:64], test[:64], block, warps)[:, 0]
            err = float(((got - kl64).abs() / kl64.abs()).max())
            ms = triton.testing.do_bench(lambda b=block, w=warps: kernels.fused_rows(ref, test, b, w),
                                         warmup=50, rep=300, return_mode="median")
            rows.append({"V": v, "C": c, "block": block, "warps": warps, "ms": ms, "tok_per_s": c / ms * 1e3,
                         "GB_per_s": c * v * 6 / ms / 1e6, "max_rel_err_vs_float64": err})
            log(f"kernel V={v} C={c} BLOCK={block} warps={warps}: {ms:.3f} ms, {c / ms * 1e3:,.0f} tok/s, "
                f"{c * v * 6 / ms / 1e6:.0f} GB/s, rel err {err:.1e}")
    ms_td = triton.testing.do_bench(lambda: token_divergence(ref, test, tg), warmup=50, rep=300, return_mode="median")
    ms_ce = triton.testing.do_bench(lambda: torch.nn.functional.cross_entropy(test.float(), tg), warmup=50, rep=300,
                                    return_mode="median")
    rows.append({"V": v, "C": c, "token_divergence_ms": ms_td, "cross_entropy_bf16_to_fp32_ms": ms_ce})
    log(f"kernel V={v}: token_divergence (default variant + gathers) {ms_td:.3f} ms; "
        f"plain loop's loss cross_entropy(bf16->fp32) {ms_ce:.3f} ms")
    return rows


def stage_kernel(out: dict) -> None:
    rows = []
    for v in (49953, 151936):
        rows += _kernel_rows(v)
        free_cuda()
    out["kernel"] = rows


def windows_for(tok_dir: Path, text: Path, n_tokens: int):
    from transformers import AutoTokenizer

    from evalsuite.store import corpus

    tok = AutoTokenizer.from_pretrained(tok_dir)
    texts, _ = corpus.load_texts(corpus.CorpusSpec(source=str(text)))
    w = corpus.tokenize(texts, tok, 2048, n_tokens).windows
    return tok, torch.from_numpy(np.stack(w))  # (N, 2049): BOS + 2048 scored tokens, as evalsuite scores them


def plain_loops(path: Path, ids: torch.Tensor, batch: int) -> dict:
    from evalsuite.model.precision import exact_fp32

    res = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model, load_s = baselines.load_for_plain_loop(path, dtype, DEVICE)
        if name == "fp32":
            with exact_fp32():
                r = baselines.plain_loop(model, ids, batch)
        else:
            r = baselines.plain_loop(model, ids, batch)
        r["load_s"] = load_s
        res[name] = r
        log(f"plain loop {name}: {r['tokens_per_s']:,.0f} tok/s ({r['seconds']:.2f} s), load {load_s:.2f} s, "
            f"peak {r['peak_memory_gib'] or 0:.1f} GiB")
        del model
        free_cuda()
    return res


def evalsuite_run(path: Path, text: Path, n_tokens: int, out_dir: Path, extra: list[str]) -> dict:
    from evalsuite.cli import main

    sync()
    t0 = time.perf_counter()
    code = main(["run", "--model", str(path), "--corpus", str(text), "--seq-len", "2048", "--max-tokens",
                 str(n_tokens), "--out", str(out_dir), "--no-progress", *extra])
    wall = time.perf_counter() - t0
    res = json.loads((out_dir / "results.json").read_text())
    prov = res["provenance"]
    entry = {"exit": code, "wall_s": wall, "args": extra, "run_timing": prov.get("run_timing"),
             "reference_cache": {k: v for k, v in prov.get("reference_cache", {}).items() if k in ("status",)},
             "batch_size": prov.get("batch_size"), "n_segments": prov.get("n_segments"),
             "buffer_tokens": prov.get("buffer_tokens"), "data_parallel": prov.get("data_parallel"),
             "noise_floor": {k: res["noise_floor"].get(k) for k in ("n_tokens", "kl_mean", "kl_max")},
             "dtypes": {k: {"timing": v["timing"], "tokens_per_s": v["metrics"].get("tokens_per_s"),
                            "kl_mean": v["metrics"].get("kl_mean"),
                            "bench_questions_per_s": v["metrics"].get("bench_questions_per_s")}
                        for k, v in res["dtypes"].items()}}
    if "benchmarks" in res:
        entry["bench_timing"] = res["benchmarks"].get("timing")
    log(f"evalsuite {' '.join(extra) or '(defaults)'}: exit {code}, wall {wall:.1f} s; " + "; ".join(
        f"{k} {d['tokens_per_s'] or 0:,.0f} tok/s pass {d['timing'].get('pass_s', 0):.2f} s load "
        f"{d['timing'].get('load_s', 0):.2f} s peak {d['timing'].get('peak_memory_gib', 0):.1f} GiB"
        + (f" compile {d['timing']['compile_s']:.1f} s" if "compile_s" in d["timing"] else "")
        for k, d in entry["dtypes"].items()) + f"; run_timing {entry['run_timing']}")
    return entry


def stage_model(name: str, args, out: dict, reserve_to_gib: float | None = None) -> Path:
    shape, n_tokens, plain_batch = SHAPES[name]
    n_tokens = args.tokens.get(name, n_tokens)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    t0 = time.perf_counter()
    if args.smoke:
        shape = "tiny-qwen2"
    path = baselines.build_random_model(shape, vocab, args.work / shape, tokenizer_dir=args.tokenizer, device=DEVICE)
    n_params = 0  # from the safetensors headers
    from safetensors import safe_open

    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            n_params += sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
    res: dict = {"shape": shape, "n_params": n_params, "vocab": vocab, "tokens": n_tokens, "build_s":
                 time.perf_counter() - t0}
    out[name] = res
    _tok, ids = windows_for(args.tokenizer, args.text, n_tokens)
    runs_root = args.work / f"runs-{name}"
    cache = args.work / f"cache-{name}"
    os.environ["EVALSUITE_REFERENCE_CACHE"] = str(cache)
    placeholder = None
    if reserve_to_gib is not None and DEVICE == "cuda":  # an 80 GB card: take the rest of this one first
        free, total = torch.cuda.mem_get_info()
        take = total - reserve_to_gib * 2**30
        placeholder = torch.empty(int(take), dtype=torch.uint8, device="cuda")
        res["simulated_card_gib"] = reserve_to_gib
        log(f"{name}: placeholder {take / 2**30:.1f} GiB: free now {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB")
    else:
        res["plain_loop"] = plain_loops(path, ids, plain_batch)
        if args.lmeval:
            try:
                r = baselines.lmeval_rolling(path, ids, "bfloat16", batch_size=plain_batch, device=DEVICE)
                r.pop("per_doc_loglikelihood", None)
                res["lmeval_rolling_bf16"] = r
                log(f"lm-eval rolling bf16: {r['tokens_per_s']:,.0f} tok/s ({r['seconds']:.2f} s), load "
                    f"{r['load_s']:.2f} s")
            except Exception as exc:  # noqa: BLE001 - recorded
                res["lmeval_rolling_bf16"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                log("lm-eval rolling failed:", res["lmeval_rolling_bf16"])
            free_cuda()
    runs = {}
    base = ["--tasks", "none"]
    plan = [("cold", base), ("cached", base)] if reserve_to_gib is None else []
    plan += [("no_cache", base + ["--no-reference-cache", "--no-resume"])]
    if reserve_to_gib is None:  # the pass at the plain loop's batch size, beside the automatic one
        plan.append((f"no_cache_batch{plain_batch}", base + ["--no-reference-cache", "--no-resume", "--batch-size",
                                                           str(plain_batch)]))
    if reserve_to_gib is None:  # --compile (compiled.py), compared token by token with no_cache below
        plan.append(("no_cache_compile", base + ["--no-reference-cache", "--no-resume", "--compile"]))
    if reserve_to_gib is None and args.bench:
        plan.append(("with_zh_mc", ["--no-reference-cache", "--no-resume", "--tasks", "zh_mc"]))
    if args.runs is not None:  # in the order given; a label given twice runs twice (order effects)
        defs = dict(plan)
        plan = [(f"{label}#{args.runs[:i].count(label) + 1}" if args.runs[:i].count(label) else label, defs[label])
                for i, label in enumerate(args.runs) if label in defs]
    for label, extra in plan:
        try:
            runs[label] = evalsuite_run(path, args.text, n_tokens, runs_root / label, extra)
        except Exception as exc:  # noqa: BLE001 - recorded
            runs[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log(f"evalsuite {label} failed:", runs[label])
        free_cuda()
    res["evalsuite"] = runs
    if "no_cache" in runs and "no_cache_compile" in runs:
        res["compiled_vs_eager"] = compare_runs(runs_root / "no_cache", runs_root / "no_cache_compile")
        log(f"compiled vs eager: {res['compiled_vs_eager']}")
    del placeholder
    free_cuda()
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(runs_root, ignore_errors=True)
    return path


def compare_runs(eager: Path, compiled: Path) -> dict:
    """Per test dtype: how a --compile run's per-token numbers differ from the eager run's."""
    a, b = np.load(eager / "per_token.npz"), np.load(compiled / "per_token.npz")
    out = {}
    for name in sorted({k.split("/")[0] for k in a.files if k.endswith("/kl")}):
        ka, kb = a[f"{name}/kl"], b[f"{name}/kl"]
        out[name] = {"tokens": int(len(ka)), "nll_identical": float(np.mean(a[f"{name}/nll"] == b[f"{name}/nll"])),
                     "argmax_identical": float(np.mean(a[f"{name}/argmax"] == b[f"{name}/argmax"])),
                     "kl_mean_eager": float(ka.mean()), "kl_mean_compiled": float(kb.mean()),
                     "kl_mean_rel_diff": float((kb.mean() - ka.mean()) / ka.mean()) if ka.mean() else None,
                     "kl_max_abs_diff": float(np.abs(kb - ka).max())}
    return out


def stage_dp(args, out: dict, path: Path, name: str, nprocs=(1, 2)) -> None:
    n_tokens = args.tokens.get(name, SHAPES[name][1])
    res = {}
    for nproc in nprocs:
        out_dir = args.work / f"dp-{name}-{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
               "evalsuite", "run", "--model", str(path), "--corpus", str(args.text), "--seq-len", "2048",
               "--max-tokens", str(n_tokens), "--out", str(out_dir), "--no-progress", "--tasks", "none",
               "--no-reference-cache", "--no-resume"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "8"})
        wall = time.perf_counter() - t0
        entry = {"exit": proc.returncode, "wall_s": wall}
        if proc.returncode == 0:
            data = json.loads((out_dir / "results.json").read_text())
            entry["dtypes"] = {k: {"tokens_per_s": v["metrics"].get("tokens_per_s"), "timing": v["timing"]}
                               for k, v in data["dtypes"].items()}
            entry["kl_mean"] = {k: v["metrics"].get("kl_mean") for k, v in data["dtypes"].items()}
            entry["data_parallel"] = data["provenance"].get("data_parallel")
        else:
            entry["stderr"] = proc.stderr[-1500:]
        res[str(nproc)] = entry
        log(f"dp {name} nproc={nproc}: exit {proc.returncode}, wall {wall:.1f} s; "
            + "; ".join(f"{k} {d['tokens_per_s'] or 0:,.0f} tok/s" for k, d in entry.get("dtypes", {}).items()))
        shutil.rmtree(out_dir, ignore_errors=True)
    out[f"dp_{name}"] = res


def main() -> None:
    ap = baselines.script_args("/tmp/evalsuite-perf")
    ap.add_argument("--stages", default="kernel,small,large,huge")
    ap.add_argument("--tokens", default="", help="e.g. small=131072,large=65536")
    ap.add_argument("--no-lmeval", dest="lmeval", action="store_false")
    ap.add_argument("--no-bench", dest="bench", action="store_false")
    ap.add_argument("--runs", default=None, help="evalsuite runs to make, in this order (default all): cold,cached,no_cache,no_cache_batchN,"
                    "no_cache_compile,with_zh_mc")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU allowed: checks this script, measures nothing")
    args = ap.parse_args()
    args.tokens = {k: int(v) for k, v in (p.split("=") for p in args.tokens.split(",") if p)}
    args.runs = args.runs.split(",") if args.runs else None
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    out: dict = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
                 "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda}
    import transformers

    out["transformers"] = transformers.__version__
    out["bf16_matmul_tflops"] = matmul_peak() if DEVICE == "cuda" else 0.0
    log(f"{out['device']} x{out['gpus']}, torch {out['torch']}, transformers {out['transformers']}, "
        f"bf16 matmul {out['bf16_matmul_tflops']:.0f} TFLOP/s")
    # first use compiles the Triton kernel per dtype: a tiny run here keeps that out of the timed runs
    warm = args.work / "warm"
    if "kernel" in stages and DEVICE == "cuda":
        stage_kernel(out)
    for name in ("small", "large", "huge"):
        if name not in stages:
            continue
        t0 = time.perf_counter()
        if name == "small" or not (args.work / "warmed").exists():
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
            wpath = baselines.build_random_model("tiny-qwen2" if args.smoke else "qwen2-0.5b", vocab, warm,
                                                 tokenizer_dir=args.tokenizer, device=DEVICE)
            evalsuite_run(wpath, args.text, 8192, args.work / "warm-run", ["--tasks", "none", "--no-reference-cache"])
            (args.work / "warmed").touch()
            out["warmup_s"] = time.perf_counter() - t0
        path = stage_model(name, args, out, reserve_to_gib=H100_80GB_GIB if name == "huge" else None)
        if "dp" in stages and torch.cuda.device_count() >= 2 and name != "huge":
            stage_dp(args, out, path, name, (1, 2) if name == "small" else (2,))
        shutil.rmtree(path, ignore_errors=True)
        out[f"{name}_stage_s"] = time.perf_counter() - t0
        (args.out / "perf_gpu.json").write_text(json.dumps(out, indent=1, default=str))
    (args.out / "perf_gpu.json").write_text(json.dumps(out, indent=1, default=str))
    log("done")


if __name__ == "__main__":
    main()
