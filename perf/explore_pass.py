"""Where the time of a per-dtype pass goes (0.5B shape): the exploration behind docs/performance.md.

    python perf/explore_pass.py --text .bench/199801.txt --tokenizer .bench/tok49953 --out $OUT

Times, on the same windows and card: the plain `model(ids, labels=ids)` loop; the decoder body
alone (eager, and under torch.compile); the LM head + HF-style loss against the LM head + our
fused float64 kernel per chunk; `evalsuite run` with and without numerics; and a 2-process
torchrun run when two GPUs are visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402


def timed(fn, reps: int = 1) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def body_and_head(path: Path, ids_all: torch.Tensor, batch: int, out: dict) -> None:
    from evalsuite.metrics.divergence import token_divergence

    model, _ = baselines.load_for_plain_loop(path, torch.bfloat16)
    dec, head = model.get_decoder(), model.get_output_embeddings()
    n = ids_all.shape[0] * (ids_all.shape[1] - 1)

    def body():
        with torch.inference_mode():
            for i in range(0, len(ids_all), batch):
                dec(input_ids=ids_all[i:i + batch, :-1], use_cache=False)

    body()
    out["body_eager_tok_s"] = n / timed(body)
    with torch.inference_mode():
        h = dec(input_ids=ids_all[:batch, :-1], use_cache=False).last_hidden_state.reshape(-1, head.weight.shape[1])
        tgt = ids_all[:batch, 1:].reshape(-1)
        c = 5374
        ref = torch.randn(c, head.weight.shape[0], device="cuda") * 2

        def loss_path():
            logits = head(h)  # (B*T, V) bf16, as the plain loop
            torch.nn.functional.cross_entropy(logits.float(), tgt)

        def ours():
            for s in range(0, h.shape[0], c):
                token_divergence(ref[: min(c, h.shape[0] - s)], head(h[s:s + c]), tgt[s:s + c])

        loss_path()
        ours()
        out["head_loss_us_per_tok"] = timed(loss_path, 5) / h.shape[0] * 1e6
        out["head_kernel_us_per_tok"] = timed(ours, 5) / h.shape[0] * 1e6
    try:
        t0 = time.perf_counter()
        cdec = torch.compile(dec)

        def cbody():
            with torch.inference_mode():
                for i in range(0, len(ids_all), batch):
                    cdec(input_ids=ids_all[i:i + batch, :-1], use_cache=False)

        cbody()
        out["compile_s"] = time.perf_counter() - t0
        out["body_compiled_tok_s"] = n / timed(cbody)
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        out["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    model = dec = head = None  # noqa: F841 - free the model before the next stage
    torch.cuda.empty_cache()


def evalsuite_run(path: Path, text: Path, tokens: int, extra: list[str], out_dir: Path) -> dict:
    from evalsuite.cli import main

    t0 = time.perf_counter()
    code = main(["run", "--model", str(path), "--corpus", str(text), "--seq-len", "2048", "--max-tokens",
                 str(tokens), "--out", str(out_dir), "--no-progress", "--tasks", "none", *extra])
    wall = time.perf_counter() - t0
    res = json.loads((out_dir / "results.json").read_text())
    return {"exit": code, "wall_s": wall, "timing": {k: v["timing"] for k, v in res["dtypes"].items()},
            "tok_s": {k: v["metrics"].get("tokens_per_s") for k, v in res["dtypes"].items()},
            "run_timing": res["provenance"].get("run_timing"), "cache": res["provenance"].get("reference_cache"),
            "dp": res["provenance"].get("data_parallel")}


def main() -> None:
    ap = baselines.script_args("/tmp/evalsuite-explore")
    ap.add_argument("--tokens", type=int, default=131072)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from evalsuite.store import corpus

    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    path = baselines.build_random_model("qwen2-0.5b", len(tok), args.work / "qwen2-0.5b", tokenizer_dir=args.tokenizer)
    texts, _ = corpus.load_texts(corpus.CorpusSpec(source=str(args.text)))
    windows = corpus.tokenize(texts, tok, 2048, args.tokens).windows
    ids_all = torch.from_numpy(__import__("numpy").stack(windows)).cuda()
    model, load_s = baselines.load_for_plain_loop(path, torch.bfloat16)
    report["plain_bf16"] = {**baselines.plain_loop(model, ids_all, 8), "load_s": load_s}
    del model
    torch.cuda.empty_cache()
    body_and_head(path, ids_all, 8, report)
    print(json.dumps(report, indent=1), flush=True)
    for name, extra in [("numerics", ["--no-reference-cache"]), ("no_numerics", ["--no-reference-cache", "--no-numerics"]),
                        ("cache_cold", []), ("cache_hit", [])]:
        report[f"run_{name}"] = evalsuite_run(path, args.text, args.tokens, extra, args.work / f"run-{name}")
        print(name, json.dumps(report[f"run_{name}"]), flush=True)
    if torch.cuda.device_count() >= 2:
        out_dir = args.work / "run-dp2"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "evalsuite",
                               "run", "--model", str(path), "--corpus", str(args.text), "--seq-len", "2048",
                               "--max-tokens", str(args.tokens), "--out", str(out_dir), "--no-progress", "--tasks",
                               "none", "--no-reference-cache"], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "8"})
        report["run_dp2"] = {"exit": proc.returncode, "wall_s": time.perf_counter() - t0, "stderr": proc.stderr[-2000:]}
        if proc.returncode == 0:
            res = json.loads((out_dir / "results.json").read_text())
            report["run_dp2"].update(timing={k: v["timing"] for k, v in res["dtypes"].items()},
                                     tok_s={k: v["metrics"].get("tokens_per_s") for k, v in res["dtypes"].items()},
                                     dp=res["provenance"].get("data_parallel"))
        print("dp2", json.dumps(report["run_dp2"]), flush=True)
    (args.out / "explore_pass.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
