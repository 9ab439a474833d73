"""`time evalsuite run` in a fresh process against `time python perf/plain_loop.py` in a fresh process.

    python perf/fresh_process.py --shape llama2-7b --tokenizer .gem/tok49953 --text .gem/199801.txt \
        --max-tokens 65536 --batch 4 --out $OUT
    python perf/fresh_process.py --model /tmp/gemma --text .gem/199801.txt --max-tokens 131072 --batch 8 --out $OUT

What a user and a CI job measure: each command is a new Python process, timed from outside
(`subprocess` wall clock, imports and loads included), on the same card, same tokens and batch
size, baselines in the same call. Order (`--only` picks some): the plain loop (the machine's first
timed process: `plain_first`), evalsuite with an empty kernel cache and no reference cache
(`evalsuite_cold_no_cache`, not in the default set), evalsuite with that run's compiled kernel but
an empty reference cache (`evalsuite_writer_only`, not in the default set: the background cache
write without the cold compile), evalsuite with empty caches (a fresh
EVALSUITE_CACHE, so no reference cache and no compiled Triton kernel, and a fresh inductor cache),
the plain loop, evalsuite again (warm: kernel cached, the reference read from the cache), the plain
loop of the test dtypes alone (`plain_tests`: what a cached reference should be compared with),
evalsuite warm without the reference cache (every pass computed), the plain loop again. A
random-init checkpoint of the shape is built first (perf/baselines.py), saved in BF16 and synced
to disk, so every load reads the same files from the page cache. Each step records the GPU's
clocks, power and temperature before it. Writes fresh_<name>.json under --out and prints one line
per command.

`--cold-pairs N` measures only the cold case, N times: before each pair the page cache is dropped
(where this process may: the device's root can) and evalsuite gets a new EVALSUITE_CACHE and
inductor cache, so each pair is a fresh machine's first two processes; the order alternates (pair
0 runs the plain loop first). One pair is one ratio; the host's start-up varies by seconds from
process to process (docs/performance.md, round 11), so the median of the pairs is the figure.
Writes fresh_<name>_cold_pairs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def timed(cmd: list[str], env: dict) -> tuple[float, str, int]:
    """(wall seconds, stdout, return code); stderr (progress bars, messages) kept apart, its tail on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    return wall, proc.stdout if proc.returncode == 0 else proc.stdout + proc.stderr[-3000:], proc.returncode


def evalsuite_run(model: str, args, env: dict, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "evalsuite", "run", "--model", model, "--corpus", args.text,
           "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch), "--tasks", "none",
           "--no-progress", "--fresh", "--out", str(out), *extra]
    wall, text, rc = timed(cmd, env)
    entry = {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(wall, 3)}
    try:
        res = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        entry["tail"] = text[-3000:]
        return entry
    prov = res["provenance"]
    entry["run_timing"] = prov.get("run_timing")
    entry["reference_cache"] = prov.get("reference_cache", {}).get("status")
    entry["reference_kept"] = prov.get("reference_kept")
    entry["reference_stored"] = prov.get("reference_stored")
    entry["dtypes"] = {k: {"tokens_per_s": d["metrics"].get("tokens_per_s"), **(d.get("timing") or {})}
                       for k, d in res["dtypes"].items()}
    return entry


def plain(model: str, args, env: dict, dtypes: str | None = None) -> dict:
    cmd = [sys.executable, str(HERE / "plain_loop.py"), "--model", model, "--text", args.text,
           "--max-tokens", str(args.max_tokens), "--batch", str(args.batch), *(["--dtypes", dtypes] if dtypes else [])]
    wall, text, rc = timed(cmd, env)
    entry = {"cmd": " ".join(cmd[1:]), "rc": rc}
    try:
        entry.update(json.loads(text.strip().splitlines()[-1]))
        entry["own_wall_s"] = entry.pop("wall_s")  # the script's age when it printed: no exit in it
    except (ValueError, IndexError, KeyError):
        entry["tail"] = text[-3000:]
    entry["wall_s"] = round(wall, 3)  # as `time` measures it, the interpreter's exit included (as evalsuite's)
    return entry


def versions() -> dict:
    """The software and host every command of this call ran on (from a child: nothing imported here)."""
    code = ("import json, platform, sys, torch, transformers; print(json.dumps({'python': platform.python_version(), "
            "'torch': torch.__version__, 'cuda': torch.version.cuda, 'transformers': transformers.__version__, "
            "'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'cpus': __import__('os').cpu_count()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}


def gpu_state() -> str:
    """SM and memory clocks, power and temperature now (nvidia-smi), to tell a slow machine from slow code."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", help="a perf/baselines.py shape to build (random init, BF16)")
    ap.add_argument("--model", help="an existing checkpoint instead of --shape")
    ap.add_argument("--tokenizer", help="tokenizer directory for --shape")
    ap.add_argument("--vocab", type=int, default=49953)
    ap.add_argument("--text", required=True)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", help="comma-separated steps to run (default: all)")
    ap.add_argument("--cold-pairs", type=int, default=0, help="only N cold pairs (plain loop, evalsuite cold)")
    args = ap.parse_args()
    args.text = str(Path(args.text).resolve())
    sys.path.insert(0, str(HERE))
    model, name = args.model, Path(args.model or "").name
    if args.shape:
        import baselines

        model, name = f"/tmp/fresh-{args.shape}", args.shape
        if not (Path(model) / "config.json").exists():
            baselines.build_random_model(args.shape, args.vocab, model, tokenizer_dir=args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="fresh-"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
           "EVALSUITE_CACHE": str(work / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    env.pop("TRITON_CACHE_DIR", None)  # evalsuite keeps its kernel under EVALSUITE_CACHE/triton
    result = {"shape": name, "tokens": args.max_tokens, "batch": args.batch, "versions": versions(), "runs": {}}
    cold_env = {**env, "EVALSUITE_CACHE": str(work / "cache-nocache")}  # its own empty kernel cache
    subprocess.run(["sync"], check=False)  # the checkpoint just written is on disk before anything is timed
    if args.cold_pairs:
        return cold_pairs(model, name, args, env, work, result)
    steps = [("plain_first", lambda: plain(model, args, env)),
             ("evalsuite_cold_no_cache",
              lambda: evalsuite_run(model, args, cold_env, work / "o0", ["--no-reference-cache"])),
             ("evalsuite_writer_only",  # cold_no_cache's kernels (now compiled), an empty reference cache
              lambda: evalsuite_run(model, args, cold_env, work / "o4", ["--reference-cache", str(work / "ref-w")])),
             ("evalsuite_cold", lambda: evalsuite_run(model, args, env, work / "o1", [])),
             ("plain", lambda: plain(model, args, env)),
             ("evalsuite_warm_cached", lambda: evalsuite_run(model, args, env, work / "o2", [])),
             ("plain_tests", lambda: plain(model, args, env, "float16,bfloat16")),
             ("evalsuite_warm_no_cache", lambda: evalsuite_run(model, args, env, work / "o3", ["--no-reference-cache"])),
             ("plain_again", lambda: plain(model, args, env))]
    for key, step in steps:
        if (args.only and key not in args.only.split(",")) or (not args.only and key in ("evalsuite_cold_no_cache", "evalsuite_writer_only")):
            continue
        gpu = gpu_state()
        result["runs"][key] = entry = step()
        entry["gpu_before"] = gpu
        print(f"{name} {key}: rc {entry['rc']}, {entry['wall_s']:.1f} s wall (GPU before: {gpu})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fresh_{name}.json").write_text(json.dumps(result, indent=1))
    runs = result["runs"]
    base = runs.get("plain", {}).get("wall_s")
    for key in ("evalsuite_cold_no_cache", "evalsuite_writer_only", "evalsuite_cold", "evalsuite_warm_cached", "evalsuite_warm_no_cache"):
        if base and key in runs:
            print(f"{name} {key} / plain: {runs[key]['wall_s'] / base:.2f}x", flush=True)
    tests = runs.get("plain_tests", {}).get("wall_s")
    if tests and "evalsuite_warm_cached" in runs:
        print(f"{name} evalsuite_warm_cached / plain_tests (fp16+bf16 only): "
              f"{runs['evalsuite_warm_cached']['wall_s'] / tests:.2f}x", flush=True)
    return 0


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so the next process reads every file from disk."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cold_pairs(model: str, name: str, args, env: dict, work: Path, result: dict) -> int:
    """`--cold-pairs`: N (plain loop, evalsuite cold) pairs, each from a dropped page cache and empty caches."""
    pairs = result["pairs"] = []
    for i in range(args.cold_pairs):
        cold = {**env, "EVALSUITE_CACHE": str(work / f"cache-pair{i}"), "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-pair{i}")}
        dropped = drop_page_cache()
        steps = [("plain", lambda: plain(model, args, env)),
                 ("evalsuite_cold", lambda c=cold, o=work / f"pair{i}": evalsuite_run(model, args, c, o, []))]
        pair = {"page_cache_dropped": dropped, "order": [k for k, _ in steps[:: 1 if i % 2 == 0 else -1]]}
        for key, step in steps[:: 1 if i % 2 == 0 else -1]:
            pair["gpu_before_" + key] = gpu_state()
            pair[key] = step()
        pair["ratio"] = round(pair["evalsuite_cold"]["wall_s"] / pair["plain"]["wall_s"], 3)
        pairs.append(pair)
        print(f"{name} pair {i} ({' then '.join(pair['order'])}, page cache dropped: {dropped}): plain "
              f"{pair['plain']['wall_s']:.1f} s, evalsuite cold {pair['evalsuite_cold']['wall_s']:.1f} s: "
              f"{pair['ratio']:.2f}x", flush=True)
    ratios = sorted(p["ratio"] for p in pairs)
    result["median_ratio"] = statistics.median(ratios)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fresh_{name}_cold_pairs.json").write_text(json.dumps(result, indent=1))
    print(f"{name} cold pairs: ratios {ratios}, median {result['median_ratio']:.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
