"""Which fused-kernel variants a real run compiles, and where: the check that none compiles inside a timed pass.

    python perf/kernel_variants.py --tokenizer .gem/tok49953 --text .gem/199801.txt --out $OUT

Builds a small random-init Qwen2 with the 49,953-entry vocabulary on the GPU (V not a multiple of 4:
kept rows start unaligned), empties Triton's cache, and runs `evalsuite run` in this process with
`kernels.fused_rows` traced: every call that grows the kernel's compiled-variant cache is printed
with the thread, the run's phase, dtypes, strides and pointer alignments, and the seconds it took.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    import baselines

    ap = baselines.script_args("/tmp/evalsuite-kernel-variants")
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="variants-"))
    os.environ["TRITON_CACHE_DIR"] = str(work / "triton")
    os.environ["EVALSUITE_CACHE"] = str(work / "cache")
    import torch

    from evalsuite import cli, phases
    from evalsuite.metrics import kernels

    model = str(work / "model")
    baselines.build_random_model("tiny-qwen2", 49953, model, tokenizer_dir=args.tokenizer)
    real, events = kernels.fused_rows, []

    def traced(ref, test, *a, **k):
        caches = kernels._lanes_kernel.device_caches
        dev = torch.cuda.current_device()
        before = len(caches[dev][0]) if dev in caches else 0
        t0 = time.perf_counter()
        out = real(ref, test, *a, **k)
        torch.cuda.synchronize()
        if len(caches[dev][0]) > before:
            events.append((threading.current_thread().name, phases.current_name(), str(ref.dtype), str(test.dtype),
                           ref.stride(0), test.stride(0), ref.data_ptr() % 16, test.data_ptr() % 16,
                           round(time.perf_counter() - t0, 3)))
            print("compiled:", *events[-1], flush=True)
        return out

    kernels.fused_rows = traced
    rc = cli.main(["run", "--model", model, "--corpus", str(args.text), "--max-tokens", str(args.tokens), "--tasks", "none",
                   "--batch-size", "8", "--no-progress", "--fresh", "--out", str(work / "out")])
    inside = [e for e in events if e[1] and "pass" in e[1] and not e[1].endswith("compile")]
    print(f"rc {rc}; {len(events)} variants compiled, {len(inside)} inside a timed pass")
    (Path(args.out) / "kernel_variants.txt").write_text("\n".join(map(str, events)) + f"\ninside passes: {inside}\n")
    return 0 if not inside else 1


if __name__ == "__main__":
    raise SystemExit(main())
