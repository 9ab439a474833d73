"""Generation speed: evalsuite's greedy decoding (model/decode.py) against transformers' `generate(do_sample=False)`.

    python perf/gen_speed.py --out $OUT [--shapes qwen2-0.5b,llama2-7b,gemma3-270m --batch 64 --tokens 128]

Per shape and dtype (FP32 under exact_fp32, BF16, FP16): the same left-padded batch of random prompts
(24-40 tokens), the same number of new tokens, no EOS (both run to the limit, so they do the same
work), timed with the device synchronised after one warm-up of each; tokens/s = batch x tokens /
seconds. Also whether the two gave the same tokens. Random-init weights (N(0, 0.02), as
baselines.py builds them): speed depends on the shape, not the weights.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402

from evalsuite.model.decode import greedy  # noqa: E402
from evalsuite.model.precision import exact_fp32  # noqa: E402

GEMMA3_270M = ("gemma3_text", dict(  # the embedded demo model's config.json (evalsuite/model/demo.py)
    hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
    head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True, rms_norm_eps=1e-6))
VOCAB = {"qwen2-0.5b": 151936, "llama2-7b": 32000, "gemma3-270m": 262144}


def build(shape: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = GEMMA3_270M if shape == "gemma3-270m" else baselines.SHAPES[shape]
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB[shape], initializer_range=0.02, **kwargs)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.generation_config.eos_token_id = None
    return model.eval().requires_grad_(False)


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(24, 41, (batch,), generator=g).tolist()
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def timed(fn) -> tuple[object, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def hf_generate(model, ids: list[list[int]], tokens: int) -> torch.Tensor:
    width = max(len(p) for p in ids)
    inp = torch.tensor([[0] * (width - len(p)) + p for p in ids], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device="cuda")
    out = model.generate(input_ids=inp, attention_mask=mask, do_sample=False, max_new_tokens=tokens,
                         min_new_tokens=tokens, pad_token_id=0)
    return out[:, width:].cpu()


def measure(model, name: str, ids, tokens: int) -> dict:
    dev = torch.device("cuda")
    order = list(range(len(ids)))
    ctx = exact_fp32() if name == "fp32" else torch.no_grad()
    with ctx:
        greedy(model, ids, order, len(ids), 8, (), 0, dev)  # warm-up
        hf_generate(model, ids, 8)
        torch.cuda.reset_peak_memory_stats()
        ours, t_ours = timed(lambda: greedy(model, ids, order, len(ids), tokens, (), 0, dev))
        peak = torch.cuda.max_memory_allocated() / 2**30
        theirs, t_hf = timed(lambda: hf_generate(model, ids, tokens))
    same = sum(o.tolist() == theirs[i].tolist() for i, o in enumerate(ours.tokens))
    n = len(ids) * tokens
    return {"dtype": name, "evalsuite_s": t_ours, "generate_s": t_hf, "evalsuite_tokens_per_s": n / t_ours,
            "generate_tokens_per_s": n / t_hf, "ratio": t_hf / t_ours, "same_rows": same, "rows": len(ids),
            "peak_gib": peak}


def whole_run(shape: str, work: Path, out: Path) -> dict:
    """`evalsuite run --generate` (CUDA defaults: 64 prompts x 128 tokens) on a saved random model of
    `shape` with the tests' small tokenizer: what the generation step adds to a whole run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import build_tokenizer

    from evalsuite.cli import main as cli

    tok_dir = work / "tok"
    build_tokenizer().save_pretrained(tok_dir)
    path = baselines.build_random_model(shape, VOCAB[shape], work / shape, tokenizer_dir=tok_dir)
    run_dir = work / f"run_{shape}"
    rc = cli(["run", "--model", str(path), "--tasks", "none", "--generate", "--no-reference-cache", "--no-progress",
              "--max-tokens", "65536", "--out", str(run_dir)])
    results = json.loads((run_dir / "results.json").read_text())
    (out / f"results_{shape}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return {"shape": shape, "rc": rc, "run_timing": results["provenance"]["run_timing"],
            "generation_timing": results["generation"]["timing"],
            "metrics": {n: {k: v for k, v in d["metrics"].items() if "gen_" in k} for n, d in results["dtypes"].items()}}


def main() -> None:
    ap = baselines.script_args("work", corpus=False)
    ap.add_argument("--shapes", default="gemma3-270m,qwen2-0.5b,llama2-7b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--run-shapes", default="", help="also a whole `evalsuite run --generate` of these shapes")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in filter(None, args.run_shapes.split(",")):
        r = whole_run(shape, args.work, args.out)
        print(json.dumps(r), flush=True)
        (args.out / f"whole_run_{shape}.json").write_text(json.dumps(r, indent=1))
    rows = []
    for shape in filter(None, args.shapes.split(",")):
        model = build(shape)
        ids = prompts(args.batch, VOCAB[shape])
        half = copy.deepcopy(model).half()
        for name, m in (("fp32", model), ("fp16", half), ("bf16", None)):
            if m is None:
                del half
                m = model.bfloat16()
            r = {"shape": shape, "batch": args.batch, "tokens": args.tokens, **measure(m, name, ids, args.tokens)}
            rows.append(r)
            print(json.dumps(r), flush=True)
        del model, m
        torch.cuda.empty_cache()
    (args.out / "gen_speed.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
