"""Keeping the reference as hidden states: what re-applying its FP32 head costs against reading logits back.

    python perf/hidden_reference.py --hidden 4096 --vocab 49953 --tokens 65536            # Llama-2-7B shape
    python perf/hidden_reference.py --hidden 640 --vocab 262144 --tokens 131072 --softcap 30  # Gemma 3 270M
    python perf/hidden_reference.py --model tests-tiny-checkpoint --tokens 4096 --device cpu   # a real head
    (--out FILE writes the JSON; --device auto|cuda|cpu; --io-gib caps the bytes written to disk)

Times, for one shape on whatever device, the pieces passes/reference.py's rule weighs:
- `head_us_per_token`: the FP32 head (TF32 off) re-applied chunk by chunk exactly as a test pass
  does (model/kept.py's KeptReference over the Scorer's chunk size for this vocabulary and device),
  softcap included; and `head_probe_us_per_token`, the rule's own probe (model/kept.py);
- `read_logits_us_per_token`: reading the reference's float32 logits back from a file (the
  reference cache / resume state) into the device, through store/logits.py's reader;
- `read_hidden_us_per_token`: reading the hidden states back the same way;
- the totals for `--tokens` tokens and `--tests` test passes: keeping logits on the device costs
  nothing per pass but V x 4 bytes a token; hidden states cost the head once per pass.
The disk figures are measured on at most `--io-gib` of data (page cache dropped where we may) and
scaled per token: run on the machine whose disk the cache lives on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evalsuite.model.forward import CHUNK_BYTES  # noqa: E402
from evalsuite.model.head import FrozenHead  # noqa: E402
from evalsuite.model.kept import KeptReference, head_seconds_per_token  # noqa: E402
from evalsuite.model.precision import exact_fp32  # noqa: E402
from evalsuite.store.logits import read_logits, write_logits  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_head(args, device: torch.device) -> FrozenHead:
    """The FP32 head of --model (as the reference pass freezes it), else a random (V, H) one."""
    if args.model:
        from evalsuite.model.forward import Scorer
        from evalsuite.model.loading import load_model
        from evalsuite.model.precision import DTYPES

        head = Scorer(load_model(args.model, DTYPES["fp32"], device), device).freeze_head()
        if head is None:
            raise SystemExit(f"{args.model}: no decoder/head split, so no head to re-apply")
        return head
    g = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, generator=g, device=device) * 0.02
    return FrozenHead(weight, None, args.vocab, args.softcap)


def reapply(head: FrozenHead, n: int, device: torch.device) -> dict:
    """One test pass's worth of re-application: every chunk of n tokens, timed as a whole."""
    chunk = max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"]) // (4 * head.vocab))
    kept = KeptReference(n, head.vocab, device, head, logits=False)
    kept.hidden.normal_()
    kept._starts = list(range(0, n, chunk))
    bounds = kept.bounds
    chunks = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    kept[chunks[0][0]:chunks[0][1]]  # warm-up: one chunk
    best = float("inf")
    for _ in range(2):
        _sync(device)
        t0 = time.perf_counter()
        for lo, hi in chunks:
            kept._last = None  # re-applied, not the remembered chunk
            kept[lo:hi]
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    probe = head_seconds_per_token(head, kept.hidden[: min(chunk, n)])
    return {"chunk_tokens": chunk, "head_us_per_token": best / n * 1e6, "head_probe_us_per_token": probe * 1e6}


def read_back(width: int, n: int, device: torch.device, cap_bytes: int) -> dict:
    """Write then read a float32 (rows, width) file of at most cap_bytes; microseconds per token of n."""
    rows = max(1, min(n, cap_bytes // (4 * width)))
    data = torch.randn(rows, width, device=device)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = Path(tmp) / "kept.npy"
        with open(path, "wb") as fh:
            t0 = time.perf_counter()
            write_logits(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
            write_s = time.perf_counter() - t0
        _drop_page_cache(path)
        t0 = time.perf_counter()
        back = read_logits(path, device)
        _sync(device)
        read_s = time.perf_counter() - t0
    assert torch.equal(back, data)
    return {"rows_measured": rows, "read_us_per_token": read_s / rows * 1e6, "write_us_per_token": write_s / rows * 1e6,
            "read_gib_per_s": rows * width * 4 / 2**30 / read_s}


def _drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's pages, so the read is a disk read (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except (AttributeError, OSError):
        pass


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=384)
    ap.add_argument("--softcap", type=float, default=None)
    ap.add_argument("--model", default=None, help="take the head (and H, V) from this checkpoint")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--tests", type=int, default=2, help="test passes that would re-apply the head")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--io-gib", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    with exact_fp32(), torch.inference_mode():
        head = make_head(args, device)
        vocab, width, n = head.vocab, head.weight.shape[1], args.tokens
        out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "hidden": width, "vocab": vocab,
               "tokens": n, "tests": args.tests, **reapply(head, n, device)}
        cap = int(args.io_gib * 2**30)
        out["logits_io"] = read_back(vocab, n, device, cap)
        out["hidden_io"] = read_back(width, n, device, cap)
    us = 1e-6 * n
    out["totals_s"] = {
        "reapply_per_test_pass": out["head_us_per_token"] * us,
        "reapply_all_test_passes": out["head_us_per_token"] * us * args.tests,
        "read_logits_back": out["logits_io"]["read_us_per_token"] * us,
        "read_hidden_back": out["hidden_io"]["read_us_per_token"] * us,
        "read_hidden_back_and_reapply_once": (out["hidden_io"]["read_us_per_token"] + out["head_us_per_token"]) * us}
    out["gib"] = {"logits": n * vocab * 4 / 2**30, "hidden": n * width * 4 / 2**30, "head": head.nbytes / 2**30}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
