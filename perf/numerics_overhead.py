"""What the numerics diagnostics cost: `evalsuite run` with and without them, same model, same tokens.

Reproduces the numerics overhead in docs/performance.md. On a CUDA machine:

    python perf/numerics_overhead.py --text ../shared/data/peoples-daily-1998/199801.txt --out bench-out

It builds (once, cached under --work) the random-init model with Qwen2-0.5B's config that
perf/core_gpu.py uses, then runs the evalsuite run loop `--repeats` times each way, with
and without `NumericsObserver`, alternating the order so drift (clocks, caches) cancels. Per dtype
it reports the forward-pass time (`timing.pass_s`, hooks included) and separately the observer's
own time outside the passes (weight conversion statistics before the reference pass, the host
sync and comparison after each pass, the results at the end), the run's wall time, and peak GPU
memory. Numbers are the minimum over repeats. `--small` swaps in a 4-layer, 128-wide model so the
script can be checked on a CPU in a minute (with e.g. --max-tokens 2048 --seq-len 256).
Writes <out>/numerics_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_gpu  # noqa: E402  (perf/core_gpu.py: the shared model builder)

SMALL = dict(core_gpu.QWEN2_05B, vocab_size=32000, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)  # 32000: the size of core_gpu's tokenizer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedObserver:
    """Wraps the observer and adds up the seconds each callback takes (device synced around it)."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, {}

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name not in ("pass_started", "pass_finished", "finish"):
            return fn

        def timed(*args):
            _sync()
            t0 = time.perf_counter()
            out = fn(*args)
            _sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out
        return timed


def one_run(path: Path, text: Path, args, numerics: bool) -> dict:
    from evalsuite.cli_config import config_from_args
    from evalsuite.cli_parser import build_parser
    from evalsuite.numerics.observer import NumericsObserver
    from evalsuite.passes.runner import run

    argv = ["run", "--model", str(path), "--corpus", str(text), "--seq-len", str(args.seq_len), "--max-tokens",
            str(args.max_tokens), "--device", args.device, "--out", str(args.work / "scratch"), "--no-progress",
            "--tasks", "none", *(["--no-numerics"] if not numerics else [])]
    cfg = config_from_args(build_parser().parse_args(argv))
    observers = (TimedObserver(NumericsObserver(cfg, str(path))),) if numerics else ()
    _sync()
    t0 = time.perf_counter()
    results = run(cfg, str(path), observers=observers).results
    wall = time.perf_counter() - t0
    out = {"numerics": numerics, "wall_s": wall,
           "pass_s": {n: d.timing.get("pass_s") for n, d in results.dtypes.items()},
           "peak_memory_gib": {n: d.timing.get("peak_memory_gib") for n, d in results.dtypes.items()},
           "observer_s": observers[0].seconds if observers else {}}
    if numerics:
        out["metrics"] = {n: {k: d.metrics.get(k) for k in ("verdict", "first_nonfinite_module", "min_headroom_bits",
                                                             "modules_near_overflow", "weights_underflow_frac")}
                          for n, d in results.dtypes.items()}
    return out


def summarize(runs: list[dict]) -> dict:
    best = {flag: {} for flag in (False, True)}
    for r in runs:
        b = best[r["numerics"]]
        b["wall_s"] = min(b.get("wall_s", float("inf")), r["wall_s"])
        for n, s in r["pass_s"].items():
            if s is not None:
                b.setdefault("pass_s", {})[n] = min(b.get("pass_s", {}).get(n, float("inf")), s)
        for k, s in r["observer_s"].items():
            b.setdefault("observer_s", {})[k] = min(b.get("observer_s", {}).get(k, float("inf")), s)
        for n, gib in r["peak_memory_gib"].items():
            if gib is not None:
                b.setdefault("peak_gib", {})[n] = max(b.get("peak_gib", {}).get(n, 0.0), gib)
    base, num = best[False], best[True]
    per_dtype = {n: {"pass_s": base["pass_s"][n], "pass_s_numerics": num["pass_s"][n],
                     "overhead_pct": 100 * (num["pass_s"][n] / base["pass_s"][n] - 1),
                     "peak_memory_gib": base.get("peak_gib", {}).get(n),
                     "peak_memory_gib_numerics": num.get("peak_gib", {}).get(n)} for n in base["pass_s"]}
    return {"per_dtype_pass": per_dtype, "observer_outside_passes_s": num.get("observer_s", {}),
            "wall_s": base["wall_s"], "wall_s_numerics": num["wall_s"],
            "wall_overhead_pct": 100 * (num["wall_s"] / base["wall_s"] - 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True, help="corpus, e.g. ../shared/data/peoples-daily-1998/199801.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/evalsuite-bench"))
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--small", action="store_true", help="a 4-layer, 128-wide model (checks the script on a CPU)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.small:
        core_gpu.QWEN2_05B = SMALL  # build() reads the config at call time
        args.work = args.work / "small"
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = core_gpu.build(args.text, args.work)
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu",
              "torch": torch.__version__, "build_s": time.perf_counter() - t0, "small": args.small,
              "max_tokens": args.max_tokens, "seq_len": args.seq_len, "repeats": args.repeats, "runs": []}
    one_run(path, args.text, args, numerics=False)  # warm-up: caches, kernels, tokenizer
    for i in range(args.repeats):
        for numerics in ((False, True) if i % 2 == 0 else (True, False)):
            report["runs"].append(one_run(path, args.text, args, numerics))
    report["summary"] = summarize(report["runs"])
    (args.out / "numerics_overhead.json").write_text(json.dumps(report, indent=2))
    s = report["summary"]
    print(f"device: {report['device']}  torch {report['torch']}  {args.max_tokens} tokens, seq {args.seq_len}, "
          f"min of {args.repeats}")
    for n, d in s["per_dtype_pass"].items():
        peak = (f", peak {d['peak_memory_gib']:.2f} -> {d['peak_memory_gib_numerics']:.2f} GiB"
                if d["peak_memory_gib"] is not None and d["peak_memory_gib_numerics"] is not None else "")
        print(f"  {n}: pass {d['pass_s']:.3f} s -> {d['pass_s_numerics']:.3f} s with numerics "
              f"({d['overhead_pct']:+.1f} %){peak}")
    print("  observer outside the passes: " + ", ".join(f"{k} {v:.3f} s" for k, v in s["observer_outside_passes_s"].items()))
    print(f"  wall: {s['wall_s']:.2f} s -> {s['wall_s_numerics']:.2f} s ({s['wall_overhead_pct']:+.1f} %)")


if __name__ == "__main__":
    main()
