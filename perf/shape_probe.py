"""How much a new input shape costs a 2-byte forward on CUDA: the first forward at each of many
padded lengths (as lm-eval's batches have) against a second one at the same length.

    python perf/shape_probe.py --model /tmp/fresh-qwen2-0.5b

Why: cuDNN builds its attention kernel per exact call (docs/performance.md, round 9); the
perplexity passes have one shape, the benchmark batches one per padded length.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
from jit_probe import sync_time as timed  # (perf/ is this script's import path)
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    out = {}
    for name in ("float16", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, name), device_map="cuda").eval()
        for masked in (True, False):
            first = second = 0.0
            lengths = range(64, 1025, 32)
            for t in lengths:
                ids = torch.randint(0, 1000, (args.batch, t), device="cuda")
                mask = torch.ones_like(ids)
                if masked:
                    mask[1:, t - 7 :] = 0  # right padding in all rows but the first, as a padded batch
                kw = {"attention_mask": mask} if masked else {}
                call = partial(model, ids, **kw)
                with torch.no_grad():
                    first += timed(call)
                    second += timed(call)
            out[f"{name}, {'padding mask' if masked else 'no mask'}"] = {
                "lengths": len(lengths), "first_s": round(first, 3), "second_s": round(second, 3)}
        model = call = None
        torch.cuda.empty_cache()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
