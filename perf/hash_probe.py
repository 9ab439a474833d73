"""Does hashing the checkpoint during start-up slow the start-up? An A/B in fresh processes.

    python perf/hash_probe.py --model /tmp/fresh-llama2-7b --text .gem/199801.txt --reps 3

Each process imports torch, starts hashing the checkpoint in one of three ways, then times what
a run's `tokenizer` and `tokenize` phases do (transformers' import, AutoTokenizer.from_pretrained,
the corpus's tokenization), then waits for the hash:
  none    no hash (a cached rerun, or --no-reference-cache)
  thread  the checkpoint hashed by threads of this process (evalsuite before round 10)
  child   the same hash in a child process (digests._hash_in_child, round 10)
Modes alternate, so a drift of the host falls on all of them. Prints one JSON line per process
and the median per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ONE = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
t0 = time.perf_counter()
import torch
from evalsuite.store import digests
mode, model, text = sys.argv[1:4]
marks = {"import_torch_s": time.perf_counter() - t0}
files = sorted(p for p in __import__("pathlib").Path(model).iterdir() if p.is_file())
pool = ThreadPoolExecutor(1)
t1 = time.perf_counter()
if mode == "thread":
    fut = pool.submit(lambda: [digests.sha256_file(f, digests.BACKGROUND_WORKERS) for f in files])
elif mode == "child":
    fut = pool.submit(digests._hash_in_child, files, digests.BACKGROUND_WORKERS)
from evalsuite.model.loading import load_tokenizer
tok = load_tokenizer(model)
marks["tokenizer_s"] = time.perf_counter() - t1
t2 = time.perf_counter()
lines = [t + "\n" for t in open(text, encoding="utf-8").read().splitlines()[:4000] if t.strip()]
n = sum(len(x) for x in tok(lines, add_special_tokens=False)["input_ids"])
marks["tokenize_s"] = time.perf_counter() - t2
if mode != "none":
    fut.result()
marks["hash_done_s"] = time.perf_counter() - t1
print(json.dumps({"mode": mode, "tokens": n, **{k: round(v, 3) for k, v in marks.items()}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    by_mode: dict[str, list[dict]] = {}
    for _ in range(args.reps):
        for mode in ("none", "thread", "child"):
            out = subprocess.run([sys.executable, "-c", ONE, mode, args.model, args.text], capture_output=True,
                                 text=True, cwd=root)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else json.dumps(
                {"mode": mode, "error": out.stderr[-500:]})
            print(line, flush=True)
            by_mode.setdefault(mode, []).append(json.loads(line))
    for mode, rows in by_mode.items():
        ok = [r for r in rows if "error" not in r]
        if ok:
            print(mode, "median", {k: statistics.median(r[k] for r in ok) for k in ok[0] if k.endswith("_s")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
