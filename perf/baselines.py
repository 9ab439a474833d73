"""Baselines the GPU benchmark compares evalsuite with: a plain HF loop and lm-eval's rolling loglikelihood.

Importable (nothing runs at import; transformers and lm_eval are imported inside the functions, so
``import baselines`` is cheap and works where lm-eval is missing) and a small CLI to try them:

    # a random-init model of a real shape, saved in bf16 with the benchmark tokenizer
    python perf/baselines.py build --shape qwen2-0.5b --tokenizer .bench/tok49953 --out /tmp/q05
    # plain loop and lm-eval over the same windows, side by side
    python perf/baselines.py compare --model /tmp/q05 --text .bench/199801.txt --n-windows 64
    # the whole thing on a CPU in about a minute with a 2-layer, 64-wide Qwen2
    python perf/baselines.py selftest --tokenizer .bench/tok49953 --text .bench/199801.txt

Why these two baselines: ``plain_loop`` is what a user writes by hand (``model(ids, labels=ids).loss``
over BOS + 2048-token windows), the lower bound of work per token; ``lmeval_rolling`` is what a user
of lm-eval gets for perplexity (HFLM's ``loglikelihood_rolling``, the machinery behind wikitext-style
tasks). Both count 2048 scored tokens per window, time with the device synchronised, and report
peak device memory, so their tokens/s compare directly with evalsuite's.

Windows and documents line up exactly when made by ``aligned_windows``: each window is
``[BOS] + tokens[p:p+2048]`` where the text of those 2048 tokens re-tokenizes to the very same
tokens, and lm-eval's rolling loglikelihood on that text with ``max_length=2048`` builds exactly
``[BOS] + tokens[:2047]`` as input and scores all 2048 tokens, the same computation as the plain
loop's window. So lm-eval's total log-likelihood must equal minus the plain loop's summed NLL (up to
the dtype's rounding and batch-shape effects).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

# Model shapes: (transformers model_type, config kwargs). vocab_size comes from the caller.
SHAPES: dict[str, tuple[str, dict]] = {
    # Qwen/Qwen2-0.5B's config.json (q/k/v biases are part of the Qwen2 architecture in transformers).
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                                 rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                                 use_sliding_window=False)),
    # meta-llama/Llama-2-7b-hf's config.json.
    "llama2-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=32, intermediate_size=11008, tie_word_embeddings=False,
                                rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)),
    # meta-llama/Llama-2-13b-hf's config.json.
    "llama2-13b": ("llama", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                                 num_key_value_heads=40, intermediate_size=13824, tie_word_embeddings=False,
                                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)),
    # For trying the code on a CPU: Qwen2 layout, 2 layers, 64 wide.
    "tiny-qwen2": ("qwen2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                                 rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                                 use_sliding_window=False)),
}
INITIALIZER_RANGE = 0.02  # HF's default initializer_range for both architectures
SEQ_LEN = 2048  # scored tokens per window; windows hold SEQ_LEN + 1 ids (BOS first)


def script_args(work: str, corpus: bool = True) -> argparse.ArgumentParser:
    """The arguments the GPU scripts share: --out (results), --work (scratch, default `work`) and,
    for the scripts that tokenize People's Daily, --text and --tokenizer."""
    ap = argparse.ArgumentParser()
    if corpus:
        ap.add_argument("--text", type=Path, required=True)
        ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path(work))
    return ap


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _as_ids(windows) -> torch.Tensor:
    """(N, T+1) LongTensor from a tensor, an array, or a list of equal-length id arrays/lists."""
    import numpy as np

    if isinstance(windows, torch.Tensor):
        return windows.long()
    return torch.from_numpy(np.asarray(windows, dtype=np.int64))


def _dtype(dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def build_random_model(shape: str, vocab_size: int, out_dir, dtype=torch.bfloat16, device="cuda", seed=0,
                       tokenizer_dir=None) -> Path:
    """Random-init model of a real architecture's shape, saved with ``save_pretrained`` (safetensors).

    Why random: the benchmark measures speed and memory, which depend on the shape, not on the
    weights, and real 7B/13B checkpoints cannot be fetched on the GPU machine. The weights are
    created directly on ``device`` (a ``torch.device`` context, so nothing is built on the CPU
    first; a 13B takes seconds, not minutes) and then set deterministically: every matrix and
    embedding ~ N(0, 0.02) as HF's ``initializer_range``, norms 1, biases 0, drawn from one generator
    seeded with ``seed`` in sorted-name order, so a shape, seed and device give the same model.
    Saved in ``dtype`` (bf16 by default: the FP32 reference is then exactly the upcast bf16 values).
    ``tokenizer_dir`` (its files are copied in) makes the directory loadable by AutoTokenizer, HFLM
    and evalsuite alike; its BOS/EOS ids go into the config. Returns ``Path(out_dir)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = _dtype(dtype)
    ids = {}
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if len(tok) > vocab_size:
            raise ValueError(f"the tokenizer has {len(tok)} entries, more than vocab_size={vocab_size}")
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, initializer_range=INITIALIZER_RANGE,
                                  **ids, **kwargs)

    _sync(device)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _sync(device)
    t_build = time.perf_counter() - t0
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied embeddings appear once
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, INITIALIZER_RANGE, generator=gen)
    _sync(device)
    t_init = time.perf_counter() - t0 - t_build
    n_params = sum(p.numel() for p in model.parameters())

    t1 = time.perf_counter()
    model.save_pretrained(str(out), safe_serialization=True)
    t_save = time.perf_counter() - t1
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"build_random_model {shape}: {n_params / 1e9:.3f} B params, vocab {vocab_size}, {dtype}, on {device}: "
          f"construct {t_build:.1f} s, init {t_init:.1f} s, save {t_save:.1f} s; {size / 2**30:.2f} GiB in {out}",
          flush=True)
    return out


def load_for_plain_loop(path, dtype=torch.bfloat16, device="cuda"):
    """``from_pretrained`` straight onto the device, timed on its own; returns ``(model, load_s)``.

    Kept apart from ``plain_loop`` so its tokens/s is the forward passes alone, as evalsuite's
    pass timing is, while the load cost is still reported.
    """
    from transformers import AutoModelForCausalLM

    _sync(device)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype), device_map={"": device}).eval()
    _sync(device)
    return model, time.perf_counter() - t0


def plain_loop(model, windows_tensor, batch_size: int, warmup: bool = True) -> dict:
    """The hand-written baseline: ``model(ids, labels=ids).loss`` over (N, 2049)-token windows.

    Full logits and HF's own shifted cross-entropy, no divergence or anything else, inside
    ``torch.inference_mode``. One batch is run first as warm-up (kernels, allocator) and not timed;
    the timed loop is bracketed by device synchronisation, and peak memory is reset after warm-up.
    Each window scores ``T - 1`` tokens (2048 for 2049-token windows). ``nll_sum`` (summed over every
    scored token, from the per-batch mean loss times its token count) is what lm-eval's rolling
    loglikelihood must match, negated.
    """
    device = model.device
    ids_all = _as_ids(windows_tensor)
    if ids_all.ndim != 2:
        raise ValueError(f"windows must be (N, T+1), got shape {tuple(ids_all.shape)}")
    ids_all = ids_all.to(device)
    n, t = ids_all.shape
    cuda = device.type == "cuda"
    warmup_s = 0.0
    with torch.inference_mode():
        if warmup:  # timed apart: a script that scores each token once pays its cold first batch too
            _sync(device)
            t0 = time.perf_counter()
            model(ids_all[:batch_size], labels=ids_all[:batch_size]).loss.item()
            _sync(device)
            warmup_s = time.perf_counter() - t0
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        nll_sum = 0.0
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            ids = ids_all[i : i + batch_size]
            loss = model(ids, labels=ids).loss.item()
            nll_sum += loss * ids.shape[0] * (t - 1)
        _sync(device)
        seconds = time.perf_counter() - t0
    tokens = n * (t - 1)
    return {"method": "plain_loop", "dtype": str(model.dtype).removeprefix("torch."), "device": str(device),
            "n_windows": n, "batch_size": batch_size, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "warmup_s": warmup_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "nll_sum": nll_sum, "mean_nll": nll_sum / tokens,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None}


def aligned_windows(tokenizer, texts, n_windows: int | None = None, seq_len: int = SEQ_LEN):
    """``(windows, docs)``: (N, seq_len+1) BOS-led windows and the texts that lm-eval will re-tokenize.

    The token stream is made as evalsuite.corpus.tokenize makes it (each line + "\\n", no special
    tokens, concatenated). A window ``[BOS] + stream[p:p+seq_len]`` is kept only if the decoded text
    of those tokens encodes back to exactly the same tokens (a cut inside a UTF-8 character or
    inside a pre-token would not); otherwise the start moves on by one token. So the plain loop and
    lm-eval score the same tokens with the same context, and a few tokens between windows go unscored.
    """
    import numpy as np

    if tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has no BOS token to lead each window")
    enc = tokenizer([t + "\n" for t in texts], add_special_tokens=False)["input_ids"]
    stream = np.concatenate([np.asarray(e, dtype=np.int64) for e in enc if e])
    windows, docs, p = [], [], 0
    while p + seq_len <= len(stream) and (n_windows is None or len(windows) < n_windows):
        chunk = stream[p : p + seq_len].tolist()
        doc = tokenizer.decode(chunk, clean_up_tokenization_spaces=False)
        if tokenizer.encode(doc, add_special_tokens=False) == chunk:
            windows.append([tokenizer.bos_token_id] + chunk)
            docs.append(doc)
            p += seq_len
        else:
            p += 1
    return torch.tensor(windows, dtype=torch.long).reshape(-1, seq_len + 1), docs


def lmeval_rolling(model_path, texts_or_windows, dtype="bfloat16", batch_size: int = 8, device="cuda",
                   max_length: int = SEQ_LEN, warmup: bool = True, progress: bool = False) -> dict:
    """lm-eval's perplexity path: ``HFLM(...).loglikelihood_rolling`` over one request per document.

    Done the way lm-eval users do it (HFLM(pretrained=path, dtype=..., batch_size=...), requests as
    ``Instance(request_type="loglikelihood_rolling", arguments=(text,))``), so its tokens/s is what
    they get: tokenization and lm-eval's batching/sorting/log-softmax (in the model dtype by
    default) are inside the timed call. ``texts_or_windows``: a list of strings (documents), or an
    (N, T+1) id array/tensor of BOS-led windows, whose ``[1:]`` parts are decoded to text (exact only
    for windows from ``aligned_windows``; ``roundtrip_exact`` counts the documents that re-tokenize
    to their window). ``max_length=2048`` makes a 2048-token document one window of input
    ``[BOS] + tokens[:2047]``, like the plain loop's. Model load time (HFLM's constructor) is
    reported apart; one batch of documents is run first as warm-up, untimed. ``progress=False``
    sends stderr to /dev/null during the scoring calls: HFLM opens a tqdm bar per batch that
    ``disable_tqdm`` does not reach, and hundreds of them would bury a log's tail.
    """
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    _sync(device)
    t0 = time.perf_counter()
    lm = HFLM(pretrained=str(model_path), dtype=dtype, batch_size=batch_size, device=device, max_length=max_length)
    _sync(device)
    load_s = time.perf_counter() - t0

    roundtrip = None
    if isinstance(texts_or_windows, (list, tuple)) and texts_or_windows and isinstance(texts_or_windows[0], str):
        docs = list(texts_or_windows)
    else:
        windows = _as_ids(texts_or_windows).tolist()
        docs = [lm.tokenizer.decode(w[1:], clean_up_tokenization_spaces=False) for w in windows]
        roundtrip = sum(lm.tok_encode(d) == w[1:] for d, w in zip(docs, windows, strict=True))
    requests = [Instance(request_type="loglikelihood_rolling", doc={"text": d}, arguments=(d,), idx=i)
                for i, d in enumerate(docs)]
    tokens = sum(len(lm.tok_encode(d)) for d in docs)  # rolling scores every token of every document

    cuda = torch.device(device).type == "cuda"
    with contextlib.ExitStack() as stack:
        if not progress:
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        if warmup:
            lm.loglikelihood_rolling(requests[:batch_size], disable_tqdm=True)
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lls = lm.loglikelihood_rolling(requests, disable_tqdm=True)
        _sync(device)
        seconds = time.perf_counter() - t0
    out = {"method": "lmeval_rolling", "dtype": str(dtype), "device": str(device), "n_docs": len(docs),
           "batch_size": batch_size, "max_length": lm.max_length, "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds, "load_s": load_s,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "loglikelihood_sum": float(sum(lls)), "mean_nll": -float(sum(lls)) / tokens,
           "per_doc_loglikelihood": [float(x) for x in lls], "roundtrip_exact": roundtrip}
    del lm
    if cuda:
        torch.cuda.empty_cache()
    return out


def compare(model_path, text_path, n_windows: int, batch_size: int, dtype="bfloat16", device="cuda") -> dict:
    """Plain loop and lm-eval over the same aligned windows; their totals and the relative gap."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    texts = [t for t in Path(text_path).read_text(encoding="utf-8").lstrip("\ufeff").splitlines() if t.strip()]
    windows, docs = aligned_windows(tok, texts, n_windows)
    model, load_s = load_for_plain_loop(model_path, dtype, device)
    plain = dict(plain_loop(model, windows, batch_size), load_s=load_s)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    lmeval = lmeval_rolling(model_path, docs, dtype=dtype, batch_size=batch_size, device=device)
    gap = (lmeval["loglikelihood_sum"] + plain["nll_sum"]) / plain["nll_sum"]
    return {"plain_loop": plain, "lmeval_rolling": lmeval, "same_tokens": plain["tokens"] == lmeval["tokens"],
            "loglikelihood_plus_nll_rel": gap}


def _print_compare(res: dict) -> None:
    p, e = res["plain_loop"], res["lmeval_rolling"]
    for r in (p, e):
        mem = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "n/a"
        print(f"{r['method']:15s} {r['dtype']}: {r['tokens']} tokens in {r['seconds']:.3f} s = "
              f"{r['tokens_per_s']:.0f} tok/s, load {r['load_s']:.1f} s, peak {mem}, mean NLL {r['mean_nll']:.6f}")
    print(f"lm-eval loglikelihood sum {e['loglikelihood_sum']:.4f} vs -plain NLL sum {-p['nll_sum']:.4f}: "
          f"relative gap {res['loglikelihood_plus_nll_rel']:.2e}; same token count: {res['same_tokens']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build_random_model")
    b.add_argument("--shape", choices=sorted(SHAPES), required=True)
    b.add_argument("--vocab-size", type=int, default=49953)
    b.add_argument("--tokenizer", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument("--device", default="cuda")
    b.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare", help="plain_loop and lmeval_rolling on the same windows")
    c.add_argument("--model", type=Path, required=True)
    s = sub.add_parser("selftest", help="tiny Qwen2 on the CPU: build, then compare in float32")
    s.add_argument("--tokenizer", type=Path, required=True)
    s.add_argument("--work", type=Path, default=Path("/tmp/baselines-selftest"))
    for p in (c, s):
        p.add_argument("--text", type=Path, required=True)
        p.add_argument("--n-windows", type=int, default=4)
        p.add_argument("--batch-size", type=int, default=2)
        p.add_argument("--json", type=Path, help="also write the result here")
    c.add_argument("--dtype", default="bfloat16")
    c.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)

    if args.cmd == "build":
        build_random_model(args.shape, args.vocab_size, args.out, _dtype(args.dtype), args.device, args.seed,
                           tokenizer_dir=args.tokenizer)
        return 0
    if args.cmd == "selftest":
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(str(args.tokenizer)))
        model = build_random_model("tiny-qwen2", vocab, args.work / "tiny-qwen2", torch.float32, "cpu",
                                   tokenizer_dir=args.tokenizer)
        res = compare(model, args.text, args.n_windows, args.batch_size, "float32", "cpu")
    else:
        res = compare(args.model, args.text, args.n_windows, args.batch_size, args.dtype, args.device)
    _print_compare(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
