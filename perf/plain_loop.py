"""The plain script a user would write instead of `evalsuite run`: the baseline of perf/fresh_process.py.

    python perf/plain_loop.py --model DIR --text corpus.txt --max-tokens 65536 --batch 4

Same imports (torch, transformers), same tokens (each line + "\\n", no special tokens, one
stream cut into BOS + 2,048-token windows, as evalsuite's stream windowing), same loads
(`from_pretrained` at each dtype straight onto the GPU) and the loop everyone writes:
`model(ids, labels=ids).loss` per batch, FP32 with TF32 off, then FP16, then BF16. Nothing is
warmed up and nothing is excluded: it is timed as `time python plain_loop.py` times it. Prints
one JSON line: per dtype load_s, pass_s, tokens/s, mean NLL, and the process's wall time from
its start (imports included).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so imports are counted."""
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return float(Path("/proc/uptime").read_text().split()[0]) - int(stat[19]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tok = AutoTokenizer.from_pretrained(args.model)
    lines = [t for t in Path(args.text).read_text(encoding="utf-8").splitlines() if t.strip()]
    stream, need = [], args.max_tokens + 1
    for i in range(0, len(lines), 256):  # encode until enough tokens are there
        for ids in tok([t + "\n" for t in lines[i : i + 256]], add_special_tokens=False)["input_ids"]:
            stream += ids
        if len(stream) >= need:
            break
    stream = stream[: args.max_tokens]
    windows = [[tok.bos_token_id] + stream[s : s + args.seq_len] for s in range(0, len(stream), args.seq_len)]
    full = torch.tensor([w for w in windows if len(w) == args.seq_len + 1], device="cuda")  # (N, T+1)
    out = {"tokens": full.shape[0] * args.seq_len, "batch": args.batch, "dtypes": {}}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map={"": "cuda"}).eval()
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        nll = 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, full.shape[0], args.batch):
                ids = full[i : i + args.batch]
                nll += model(ids, labels=ids).loss.item() * ids.shape[0] * args.seq_len
        torch.cuda.synchronize()
        pass_s = time.perf_counter() - t0
        out["dtypes"][name] = {"load_s": round(load_s, 3), "pass_s": round(pass_s, 3),
                               "tokens_per_s": round(out["tokens"] / pass_s, 1), "mean_nll": nll / out["tokens"]}
        del model
        torch.cuda.empty_cache()
    out["wall_s"] = round(process_age(), 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
