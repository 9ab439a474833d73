"""Where a whole `evalsuite run` spends its time beyond the passes (7B shape): a cProfile of main().

    python perf/profile_run.py --text .bench/199801.txt --tokenizer .bench/tok49953 --out $OUT

Builds the random-init model (as perf_gpu.py), runs `evalsuite run` once to warm up imports and
kernels on a small token count, then once under cProfile with the reference cache and resume
off, and writes the functions with the largest cumulative time to $OUT/profile_run.txt. Time
spent waiting for the GPU shows up in the function that synchronises.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402


def main() -> int:
    ap = baselines.script_args("/tmp/evalsuite-profile-run")
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--tokens", type=int, default=65536)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from evalsuite.cli import main as cli

    vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    path = baselines.build_random_model(args.shape, vocab, args.work / args.shape, tokenizer_dir=args.tokenizer)
    common = ["run", "--model", str(path), "--corpus", str(args.text), "--seq-len", "2048", "--no-progress",
              "--tasks", "none", "--no-reference-cache", "--no-resume"]
    cli([*common, "--max-tokens", "4096", "--out", str(args.work / "warm")])
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    code = cli([*common, "--max-tokens", str(args.tokens), "--out", str(args.work / "run")])
    prof.disable()
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
    stats.print_stats(60)
    args.out.mkdir(parents=True, exist_ok=True)
    text = f"exit {code}, wall {wall:.2f} s\n" + buf.getvalue()
    (args.out / "profile_run.txt").write_text(text)
    print(text[:9000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
