"""Precision recipes on a GPU (issue 15): each recipe's pass speed and memory against its plain dtype, and
what the repair costs on Gemma 3 270M.

    python perf/recipes_gpu.py --out $OUT [--shapes qwen2-0.5b,llama2-7b] [--tokens 65536] [--gemma]
    python perf/recipes_gpu.py --out /tmp/r --smoke      # the plumbing, on a CPU, in a minute

For each shape (a random-init model of the real architecture, baselines.build_random_model, bundled
corpus): one `evalsuite run` with the plain FP16 and BF16 and the recipes below, no repair, no
benchmarks, no reference cache; tokens/s and peak memory per recipe from its results.json, with the
ratio to the plain dtype of its compute format. `--gemma`: the embedded Gemma 3 270M (demo extra),
`--dtypes fp16,bf16` with the default repair: the repair's seconds, its candidates and the chosen
recipe. Writes `recipes_<shape>.json` / `repair_gemma.json` under --out and prints one line per figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPES = ["fp16", "bf16", "fp32", "bf16@fp16", "fp16@bf16", "fp16@fp32", "bf16@fp32", "tf32", "fp16+res32",
           "fp16+res32:12", "fp16+fp32:layers.%.mlp", "fp16+clamp"]


CORPUS: Path | None = None  # --corpus


def _run(model: str, out: Path, dtypes: list[str], device: str, seq_len: int, tokens: int, extra=()) -> dict:
    from evalsuite.cli import main

    args = ["run", "--model", model, "--dtypes", ",".join(dtypes), "--out", str(out), "--device", device,
            "--seq-len", str(seq_len), "--max-tokens", str(tokens), "--no-progress", "--tasks", "none",
            "--no-reference-cache", "--no-resume", "--overwrite", *extra]
    t0 = time.perf_counter()
    rc = main(args)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"evalsuite run failed ({rc}): {' '.join(args)}")
    data = json.loads((out / "results.json").read_text())
    data["wall_s"] = wall
    return data


def recipes(shape: str, out: Path, work: Path, device: str, tokens: int, seq_len: int) -> dict:
    import baselines

    from evalsuite.store.corpus import BUNDLED_CORPUS  # noqa: F401  (the corpus the runs read)

    path = baselines.build_random_model(shape, 49953 if "tiny" not in shape else 400, work / shape,
                                        device=device, tokenizer_dir=work / "tok")
    layers = baselines.SHAPES[shape][1]["num_hidden_layers"]
    dtypes = [r.replace("res32:12", f"res32:{layers // 2}") for r in RECIPES]
    extra = ["--no-repair", *(["--corpus", str(CORPUS)] if CORPUS else [])]
    # twice in this process: the first run pays one-time costs (Triton's kernel compile inside the first test
    # pass, CUDA context, cuBLAS handles); the second is what a warm process gives. Both are recorded.
    first = _run(str(path), work / f"run-{shape}-first", dtypes, device, seq_len, tokens, extra)
    data = _run(str(path), work / f"run-{shape}", dtypes, device, seq_len, tokens, extra)
    first_tps = {n: d.get("metrics", {}).get("tokens_per_s") for n, d in first["dtypes"].items()}
    rows = {}
    for name, d in data["dtypes"].items():
        if d["role"] != "test":
            continue
        m, t, r = d.get("metrics", {}), d.get("timing", {}), d.get("recipe") or {}
        plain = "tf32" if r.get("tf32") else r.get("compute")
        rows[name] = {"status": d["status"], "tokens_per_s": m.get("tokens_per_s"), "pass_s": t.get("pass_s"),
                      "load_s": t.get("load_s"), "peak_memory_gib": t.get("peak_memory_gib"),
                      "kl_mean": m.get("kl_mean"), "plain": plain, "first_run_tokens_per_s": first_tps.get(name)}
    for name, row in rows.items():
        base = rows.get("fp32" if row["plain"] == "tf32" else row["plain"])
        row["speed_vs_plain"] = (row["tokens_per_s"] / base["tokens_per_s"]
                                 if row["tokens_per_s"] and base and base["tokens_per_s"] else None)
        print(f"{shape} {name}: {row['status']}, {row['tokens_per_s']} tok/s (x{row['speed_vs_plain']} of "
              f"{base and base is not row and row['plain']}), peak {row['peak_memory_gib']} GiB, "
              f"load {row['load_s']} s, KL mean {row['kl_mean']}", flush=True)
    result = {"shape": shape, "tokens": tokens, "seq_len": seq_len, "device": data["provenance"].get("device_name"),
              "rows": rows, "wall_s": data["wall_s"], "first_wall_s": first["wall_s"],
              "n_tokens": data["corpus"]["n_tokens"], "corpus": data["corpus"].get("source")}
    (out / f"recipes_{shape}.json").write_text(json.dumps(result, indent=1))
    return result


def gemma_repair(out: Path, work: Path, device: str, tokens: int, seq_len: int, repair_tokens: int) -> dict:
    from evalsuite.model.demo import demo_checkpoint

    data = _run(str(demo_checkpoint()), work / "run-gemma", ["fp16", "bf16"], device, seq_len, tokens,
                ["--repair-tokens", str(repair_tokens)])
    r = (data.get("repair") or {}).get("fp16")
    result = {"tokens": tokens, "repair_tokens": repair_tokens, "device": data["provenance"].get("device_name"),
              "repair_s": data["provenance"]["run_timing"].get("repair_s"), "total_s": data["provenance"]["run_timing"].get("total_s"),
              "fp16_status": data["dtypes"]["fp16"]["status"], "repair": r}
    print(f"gemma repair: {result['repair_s']} s of {result['total_s']} s; {r['sentence'] if r else 'no repair ran'}",
          flush=True)
    for c in (r or {}).get("candidates", []):
        print(f"  {c['recipe']}: {c['status']} ({c['why']}), {c.get('tokens_per_s')} tok/s, "
              f"peak {c.get('peak_memory_gib')} GiB", flush=True)
    (out / "repair_gemma.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/recipes-work"))
    ap.add_argument("--shapes", default="qwen2-0.5b,llama2-7b")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--gemma", action="store_true", help="also the repair's cost on the embedded Gemma 3 270M")
    ap.add_argument("--repair-tokens", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="tiny-qwen2 on the CPU, few tokens: checks the plumbing")
    ap.add_argument("--corpus", type=Path, default=None, help="a .txt corpus (default: the bundled one)")
    args = ap.parse_args(argv)
    global CORPUS
    CORPUS = args.corpus
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    shapes = ["tiny-qwen2"] if args.smoke else [s for s in args.shapes.split(",") if s]
    tokens, seq = (256, 64) if args.smoke else (args.tokens, args.seq_len)
    _tokenizer(args.work / "tok")
    for shape in shapes:
        recipes(shape, args.out, args.work, device, tokens, seq)
    if args.gemma:
        gemma_repair(args.out, args.work, device, 512 if args.smoke else 4096, 128 if args.smoke else 512,
                     128 if args.smoke else args.repair_tokens)
    return 0


def _tokenizer(path: Path) -> None:
    """The tiny tests' byte-level BPE (trained on the bundled corpus, no network), if none is there yet."""
    if (path / "tokenizer.json").is_file():
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import build_tokenizer

    build_tokenizer().save_pretrained(path)


if __name__ == "__main__":
    sys.exit(main())
