"""Would torch.compile of the decoder body be usable? Speed, compile time, numerics, hooks (one card).

    python perf/compile_probe.py --out $OUT [--shape qwen2-0.5b]

For BF16 and FP16, the eager decoder body against `torch.compile(decoder)` with inductor's
defaults and with `emulate_precision_casts` (which rounds fused intermediates where eager
rounds them): first-call time (compilation), body tokens/s at batch 8 and 32, the largest
|difference| of the last hidden state from eager and the share of bit-identical elements, and
whether forward hooks registered on submodules (evalsuite's numerics observers) still fire with
the same absmax values.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402


def body_rate(dec, ids: torch.Tensor, batch: int) -> float:
    with torch.inference_mode():
        dec(input_ids=ids[:batch], use_cache=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(ids), batch):
            dec(input_ids=ids[i:i + batch], use_cache=False)
        torch.cuda.synchronize()
    return ids.numel() / (time.perf_counter() - t0)


def main() -> int:
    ap = baselines.script_args("/tmp/evalsuite-compile", corpus=False)
    ap.add_argument("--shape", default="qwen2-0.5b")
    ap.add_argument("--vocab", type=int, default=49953)
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()
    import torch._dynamo
    import torch._inductor.config as inductor

    from evalsuite.model.loading import load_model
    from evalsuite.model.modules import find_modules
    from evalsuite.model.precision import DTYPES
    from evalsuite.numerics.hooks import Recorder

    path = baselines.build_random_model(args.shape, args.vocab, args.work / args.shape)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.windows, 2048), generator=gen).cuda()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape}
    for dname in ("bf16", "fp16"):
        model = load_model(str(path), DTYPES[dname], torch.device("cuda"))
        dec = model.get_decoder()
        rec = Recorder(find_modules(model), torch.device("cuda"), histogram=False)
        rec.attach()
        probe = ids[:8]
        with torch.inference_mode():
            rec.start_batch(0)
            ref = dec(input_ids=probe, use_cache=False).last_hidden_state.float()
            rec.start_batch(1)
        eager_rows, _ = rec.finish()
        out = {"eager_b8_tok_s": body_rate(dec, ids, 8), "eager_b32_tok_s": body_rate(dec, ids, 32)}
        for mode in ("default", "emulate_precision_casts"):
            torch._dynamo.reset()
            inductor.emulate_precision_casts = mode != "default"
            rec2 = Recorder(find_modules(model), torch.device("cuda"), histogram=False)
            rec.detach()
            rec2.attach()
            entry: dict = {}
            try:
                cdec = torch.compile(dec)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    rec2.start_batch(0)
                    got = cdec(input_ids=probe, use_cache=False).last_hidden_state.float()
                    rec2.start_batch(1)
                torch.cuda.synchronize()
                entry["first_call_s"] = time.perf_counter() - t0
                rows, _ = rec2.finish()
                diff = (got - ref).abs()
                entry["max_abs_diff"] = float(diff.max())
                entry["identical_fraction"] = float((got == ref).float().mean())
                entry["hook_rows"] = len(rows)
                entry["hooks_equal_absmax"] = bool(rows and eager_rows and (rows[0][1] == eager_rows[0][1]).all())
                entry["hooks_max_rel_diff"] = float(
                    abs(rows[0][1] - eager_rows[0][1]).max() / max(1e-30, abs(eager_rows[0][1]).max())) if rows else None
                rec2.detach()
                t0 = time.perf_counter()
                entry["b8_tok_s"] = body_rate(cdec, ids, 8)
                entry["b32_tok_s"] = body_rate(cdec, ids, 32)  # a new shape: may recompile
                entry["rates_and_recompile_s"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - recorded: the probe asks whether it works
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            out[mode] = entry
            rec2.detach()
            print(dname, mode, json.dumps(entry), flush=True)
        res[dname] = out
        del model, dec, rec, cdec
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compile_probe_{args.shape}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
