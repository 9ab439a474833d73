"""The run loop: reference first, then each test dtype, one model on the device at a time.

How the test dtypes see the reference without both models resident: the reference's FP32
logits for a *segment* of windows are kept on the device in a buffer sized to free memory;
the reference model is then unloaded and each test dtype is loaded in turn and compared
against the buffer. A corpus larger than one buffer is processed segment by segment (each
model loaded once per segment). The stored logits are the reference's exact float32 values,
so the comparison is identical to holding both models at once (tests/test_runner.py measures
this against an all-in-memory float64 computation).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from evalsuite import corpus as corpus_mod
from evalsuite.config import RunConfig, resolve_device
from evalsuite.divergence import reference_tokens, token_divergence
from evalsuite.errors import EvalsuiteError, UsageError
from evalsuite.forward import Scorer, auto_batch_size, run_pass
from evalsuite.loading import check_model_source, load_model, load_tokenizer, stored_dtype, unload
from evalsuite.precision import Precision, exact_fp32, numeric_flags, unsupported_reason
from evalsuite.summary import build_results


def say(message: str) -> None:
    import sys

    print(f"evalsuite: {message}", file=sys.stderr, flush=True)


@dataclass
class TokenArrays:
    """Per-token results of one dtype, over the whole corpus (N tokens)."""

    nll: np.ndarray
    argmax: np.ndarray
    nonfinite: np.ndarray
    kl: np.ndarray | None = None  # test dtypes (and the noise floor) only
    top1_agree: np.ndarray | None = None
    p_ref: np.ndarray | None = None
    p_test: np.ndarray | None = None
    max_abs_dlogit: np.ndarray | None = None
    timing: dict[str, float] = field(default_factory=lambda: {"load_s": 0.0, "pass_s": 0.0})
    batch_size: int = 0

    @classmethod
    def empty(cls, n: int, divergence: bool) -> TokenArrays:
        nan = np.full(n, np.nan)
        arrays = cls(nll=nan.copy(), argmax=np.zeros(n, np.int64), nonfinite=np.zeros(n, np.int64))
        if divergence:
            arrays.kl, arrays.p_ref, arrays.p_test, arrays.max_abs_dlogit = (nan.copy() for _ in range(4))
            arrays.top1_agree = np.zeros(n, bool)
        return arrays


def _segments(windows: list[np.ndarray], max_tokens: int) -> list[tuple[int, int, int]]:
    """Consecutive window ranges (first, last+1, token offset) each with <= max_tokens tokens."""
    out, first, offset, count = [], 0, 0, 0
    for i, w in enumerate(windows):
        n = len(w) - 1
        if count and count + n > max_tokens:
            out.append((first, i, offset))
            first, offset, count = i, offset + count, 0
        count += n
    out.append((first, len(windows), offset))
    return out


def _buffer_tokens(cfg: RunConfig, device: torch.device, vocab: int, n_tokens: int) -> int:
    if cfg.buffer_gib is not None:
        budget = cfg.buffer_gib * 2**30
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.5 * free  # the rest: activations and (C, V) chunk temporaries
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = 0.35 * avail
    return int(max(cfg.seq_len, min(n_tokens, budget // (4 * vocab))))


def _load(cfg: RunConfig, source: str, precision: Precision, device: torch.device):
    t0 = time.perf_counter()
    model = load_model(source, precision, device, cfg.trust_remote_code, cfg.attn_implementation)
    return model, time.perf_counter() - t0


@dataclass(frozen=True)
class PassContext:
    """What an observer sees of one pass: the loaded model and where its tokens sit."""

    precision: Precision
    role: str  # "reference" or "test"
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    cfg: RunConfig
    windows: object  # corpus.TokenWindows of the whole run
    segment: int  # index of this segment; observers that need one pass per dtype act on segment 0
    segment_windows: tuple[int, int, int]  # (first window, last window + 1, flat token offset)
    batch_size: int


def _notify(observers, method: str, *args):
    for obs in observers:
        fn = getattr(obs, method, None)
        if fn is not None:
            fn(*args)


def run(cfg: RunConfig, source: str, observers: tuple = ()):
    """Evaluate `source` per `cfg`; return (`RunResults`, per-token arrays by name).

    `observers` are plain objects with any of these methods (docs/extending.md), called with the
    model resident: pass_started(ctx), batch_started(offset, ids (B, T+1)), pass_finished(ctx),
    and finish(metrics by dtype) -> (metric additions by dtype, extra result sections).
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    check_model_source(source)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    texts, corpus_identity = corpus_mod.load_texts(cfg.corpus)
    windows = corpus_mod.tokenize(texts, tokenizer, cfg.seq_len, cfg.max_tokens)
    n = windows.n_tokens
    targets = windows.targets
    say(f"{n} tokens in {len(windows.windows)} windows of up to {cfg.seq_len} ({windows.context} context)")

    tests: list[Precision] = []
    skipped: dict[str, str] = {}
    for p in cfg.dtypes:
        reason = unsupported_reason(p, device)
        if reason:
            skipped[p.name] = f"skipped: {reason}"
            say(f"{p.name} {skipped[p.name]}; the other dtypes go on")
        elif p != cfg.reference and p not in tests:
            tests.append(p)
    ref_reason = unsupported_reason(cfg.reference, device)
    if ref_reason:
        raise UsageError(f"reference {cfg.reference.name} cannot run here ({ref_reason}); use --reference fp32")

    ref = TokenArrays.empty(n, divergence=False)
    arrays = {p.name: TokenArrays.empty(n, divergence=True) for p in tests}
    failed: dict[str, str] = {}
    noise: TokenArrays | None = None
    prov: dict[str, object] = {}
    batch = cfg.batch_size or auto_batch_size(device, cfg.seq_len)
    segments: list[tuple[int, int, int]] | None = None
    seg_index = 0
    while segments is None or seg_index < len(segments):
        model, load_s = _load(cfg, source, cfg.reference, device)
        ref.timing["load_s"] += load_s
        with exact_fp32() as ref_flags:
            scorer = Scorer(model, device)
            if segments is None:
                buffer_tokens = _buffer_tokens(cfg, device, scorer.vocab_size, n)
                segments = _segments(windows.windows, buffer_tokens)
                prov.update(reference_flags=ref_flags, logits_path=scorer.logits_path,
                            chunk_tokens=scorer.chunk_tokens, buffer_tokens=buffer_tokens,
                            n_segments=len(segments),
                            attn_implementation=getattr(model.config, "_attn_implementation", None))
                if len(segments) > 1:
                    say(f"reference logits kept in {len(segments)} segments of <= {buffer_tokens} tokens")
            first, last, _ = segments[seg_index]
            seg_windows = windows.windows[first:last]
            seg_tokens = sum(len(w) - 1 for w in seg_windows)
            buffer = torch.empty((seg_tokens, scorer.vocab_size), dtype=torch.float32, device=device)

            ctx = PassContext(cfg.reference, "reference", model, tokenizer, device, cfg, windows, seg_index,
                              segments[seg_index], batch)
            staged = _staging(seg_tokens, device, divergence=False)
            batch = _timed_pass(ctx, scorer, seg_windows, partial(_keep_reference, buffer, staged), staged, ref,
                                observers, f"{cfg.reference.name} (reference)")
            if seg_index == 0:
                noise = _noise_pass(cfg, scorer, seg_windows, buffer, batch, targets)
        del scorer, ctx
        unload(model)
        model = None

        for p in tests:
            if p.name in failed:
                continue
            test = arrays[p.name]
            try:
                model, load_s = _load(cfg, source, p, device)
            except Exception as exc:
                failed[p.name] = str(exc)
                say(f"{p.name} failed: {exc}; the other dtypes go on")
                continue
            test.timing["load_s"] += load_s
            prov.setdefault("test_flags", numeric_flags())
            scorer = Scorer(model, device)

            ctx = PassContext(p, "test", model, tokenizer, device, cfg, windows, seg_index, segments[seg_index], batch)
            staged = _staging(seg_tokens, device, divergence=True)
            try:
                _timed_pass(ctx, scorer, seg_windows, partial(_compare, buffer, staged), staged, test, observers, p.name)
            except EvalsuiteError as exc:  # e.g. out of memory even at batch size 1: the others go on
                failed[p.name] = str(exc)
                say(f"{p.name} failed: {exc}; the other dtypes go on")
            del scorer, ctx, staged
            unload(model)
            model = None
        del buffer
        unload(None)
        seg_index += 1

    from evalsuite import kernels

    prov.update(batch_size=batch, device=str(device), stored_dtype=stored_dtype(source),
                divergence_path="fused-triton-float64" if kernels.available(device) else "torch-float64")
    results = build_results(cfg, source, device, tokenizer, windows, corpus_identity, ref, noise, arrays,
                            skipped, failed, prov)
    for obs in observers:
        finish = getattr(obs, "finish", None)
        if finish is not None:
            additions, sections = finish({k: dict(v.metrics) for k, v in results.dtypes.items()})
            for name, extra in additions.items():
                if name in results.dtypes:
                    results.dtypes[name].metrics.update(extra)
            results.sections.update(sections)
    per_token = {"targets": targets, "target_bytes": windows.target_bytes,
                 f"{cfg.reference.name}/nll": ref.nll, f"{cfg.reference.name}/argmax": ref.argmax}
    for name, a in arrays.items():
        per_token.update({f"{name}/nll": a.nll, f"{name}/kl": a.kl, f"{name}/argmax": a.argmax,
                          f"{name}/nonfinite": a.nonfinite})
    return results, per_token


def _keep_reference(buffer, staged, pos: int, logits: torch.Tensor, tgt: torch.Tensor) -> None:
    buffer[pos : pos + len(tgt)] = logits  # copy_ casts in place: no float32 temporary
    _stage(staged, pos, reference_tokens(logits, tgt))


def _compare(buffer, staged, pos: int, logits: torch.Tensor, tgt: torch.Tensor) -> None:
    _stage(staged, pos, token_divergence(buffer[pos : pos + len(tgt)], logits, tgt))


def _timed_pass(ctx: PassContext, scorer: Scorer, seg_windows, on_chunk, staged, arrays: TokenArrays,
                observers, desc: str) -> int:
    """One dtype over one segment, with the observers told; returns the batch size that fit."""
    offset = ctx.segment_windows[2]
    _notify(observers, "pass_started", ctx)
    on_batch = partial(_notify_batch, observers, offset) if observers else None
    stats = run_pass(scorer, seg_windows, ctx.batch_size, on_chunk, desc, ctx.cfg.progress, on_batch)
    _flush(staged, arrays, offset)
    arrays.timing["pass_s"] += stats.seconds
    _note_peak(arrays, stats)
    arrays.batch_size = stats.batch_size
    _notify(observers, "pass_finished", ctx)
    return stats.batch_size


def _notify_batch(observers, offset: int, pos: int, ids: torch.Tensor) -> None:
    _notify(observers, "batch_started", offset + pos, ids)


def _note_peak(arrays: TokenArrays, stats) -> None:
    if stats.peak_memory_gib is not None:
        arrays.timing["peak_memory_gib"] = max(arrays.timing.get("peak_memory_gib", 0.0), stats.peak_memory_gib)


_TOKEN_FIELDS = {"nll": torch.float64, "argmax": torch.int64, "nonfinite": torch.int64}
_DIVERGENCE_FIELDS = {"kl": torch.float64, "top1_agree": torch.bool, "p_ref": torch.float64,
                      "p_test": torch.float64, "max_abs_dlogit": torch.float32}


def _staging(n: int, device: torch.device, divergence: bool) -> dict[str, torch.Tensor]:
    """Per-token results stay on the device during a pass: no host sync per chunk."""
    fields = {**_TOKEN_FIELDS, **(_DIVERGENCE_FIELDS if divergence else {})}
    return {k: torch.empty(n, dtype=dt, device=device) for k, dt in fields.items()}


def _stage(staged: dict[str, torch.Tensor], pos: int, result) -> None:
    own = getattr(result, "test", result)  # TokenDivergence carries the test's own NLL in .test
    for k in _TOKEN_FIELDS:
        value = getattr(own, k)
        staged[k][pos : pos + len(value)] = value
    for k in _DIVERGENCE_FIELDS:
        if k in staged:
            value = getattr(result, k)
            staged[k][pos : pos + len(value)] = value


def _flush(staged: dict[str, torch.Tensor], arrays: TokenArrays, offset: int) -> None:
    for k, t in staged.items():
        getattr(arrays, k)[offset : offset + len(t)] = t.cpu().numpy()


def _noise_pass(cfg: RunConfig, scorer: Scorer, seg_windows, buffer, batch: int, targets) -> TokenArrays | None:
    """A second reference pass that differs only in batch layout: the run's noise floor."""
    chosen, count = [], 0
    for w in seg_windows:
        if chosen and count + len(w) - 1 > cfg.noise_tokens:
            break
        chosen.append(w)
        count += len(w) - 1
    noise_batch = batch // 2 if batch > 1 else 2
    noise = TokenArrays.empty(count, divergence=True)
    staged = _staging(count, scorer.device, divergence=True)

    def compare(pos: int, logits: torch.Tensor, tgt: torch.Tensor) -> None:
        _stage(staged, pos, token_divergence(buffer[pos : pos + len(tgt)], logits, tgt))

    stats = run_pass(scorer, chosen, noise_batch, compare, "noise floor (reference again)", cfg.progress)
    _flush(staged, noise, 0)
    noise.timing["pass_s"] = stats.seconds
    noise.batch_size = stats.batch_size
    return noise
