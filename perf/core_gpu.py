"""GPU benchmark for the core pass: evalsuite run vs a plain `model(ids, labels=ids)` loop.

Reproduces the numbers in docs/performance.md ("Core run"). One command on a CUDA machine:

    python perf/core_gpu.py --text ../shared/data/peoples-daily-1998/199801.txt --out bench-out

It trains a 32k BPE on the text, builds a random-init model with Qwen2-0.5B's config (fixed seed,
saved with save_pretrained), runs `evalsuite run` on it, then times the plain loop over the very
same windows (BOS + 2048 tokens) at each dtype, in the same process, on the same card.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def build(text: Path, work: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    path = work / "qwen2-0.5b-shape"
    if (path / "config.json").exists():
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN2_05B))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def plain_loop(path: Path, windows, dtype: torch.dtype, batch: int) -> dict:
    """The baseline a user would write: full logits, HF's own loss, no divergence at all."""
    from transformers import AutoModelForCausalLM

    from evalsuite.model.precision import exact_fp32

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": 0}).eval()
    ids_all = torch.from_numpy(__import__("numpy").stack(windows)).cuda()  # (N, T+1)
    ctx = exact_fp32() if dtype == torch.float32 else torch.autocast("cuda", enabled=False)
    with ctx, torch.inference_mode():
        model(ids_all[:batch], labels=ids_all[:batch])  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(0, len(ids_all), batch):
            model(ids_all[i : i + batch], labels=ids_all[i : i + batch]).loss.item()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    n = int((ids_all.shape[1] - 1) * len(ids_all))
    out = {"dtype": str(dtype), "tokens": n, "seconds": seconds, "tokens_per_s": n / seconds,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "batch_size": batch}
    del model, ids_all
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/evalsuite-bench"))
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[49152, 196608])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from evalsuite.cli_config import config_from_args
    from evalsuite.cli_parser import build_parser
    from evalsuite.model.loading import load_tokenizer
    from evalsuite.passes.runner import run
    from evalsuite.store import corpus
    from evalsuite.store.results import write_results

    t0 = time.perf_counter()
    path = build(args.text, args.work)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "build_s": time.perf_counter() - t0,
              "runs": [], "plain_loop": []}
    for max_tokens in args.max_tokens:
        out = args.work / f"evalsuite-{max_tokens}"
        t0 = time.perf_counter()
        argv = ["run", "--model", str(path), "--corpus", str(args.text), "--seq-len", "2048",
                "--max-tokens", str(max_tokens), "--out", str(out), "--no-progress"]
        results = run(config_from_args(build_parser().parse_args(argv)), str(path)).results  # what `evalsuite run` does
        wall = time.perf_counter() - t0
        write_results(out / "results.json", results)
        code = 0
        res = json.loads((out / "results.json").read_text())
        (args.out / f"results-{max_tokens}.json").write_text(json.dumps(res, indent=1))
        report["runs"].append({"max_tokens": max_tokens, "exit": code, "wall_s": wall,
                               "dtypes": {k: {"metrics": v["metrics"], "timing": v["timing"]} for k, v in res["dtypes"].items()},
                               "noise_floor": res["noise_floor"], "provenance": res["provenance"]})
    tok = load_tokenizer(str(path))
    texts, _ = corpus.load_texts(corpus.CorpusSpec(source=str(args.text)))
    windows = corpus.tokenize(texts, tok, 2048, args.max_tokens[0]).windows
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        report["plain_loop"].append(plain_loop(path, windows, dtype, batch=8))
    (args.out / "core_gpu.json").write_text(json.dumps(report, indent=2))
    print(f"device: {report['device']}  torch {report['torch']}")
    for entry in report["runs"]:
        print(f"evalsuite run, {entry['max_tokens']} tokens: wall {entry['wall_s']:.1f} s, "
              f"segments {entry['provenance']['n_segments']}, batch {entry['provenance']['batch_size']}")
        for name, d in entry["dtypes"].items():
            t = d["timing"]
            print(f"  {name}: {d['metrics'].get('tokens_per_s')} tok/s, load {t.get('load_s', 0):.1f} s, "
                  f"pass {t.get('pass_s', 0):.1f} s, peak {t.get('peak_memory_gib', 0):.2f} GiB, "
                  f"kl_mean {d['metrics'].get('kl_mean')}")
        nf = entry["noise_floor"]
        print(f"  noise floor: kl_mean {nf.get('kl_mean')} kl_max {nf.get('kl_max')} top1 {nf.get('top1_agreement')}")
    for p in report["plain_loop"]:
        print(f"plain loop {p['dtype']}: {p['tokens_per_s']:.0f} tok/s, peak {p['peak_memory_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
