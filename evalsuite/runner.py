"""The run loop: reference first, then each test dtype, one model on the device at a time.

How the test dtypes see the reference without both models resident: the reference's FP32
logits for a *segment* of windows are kept on the device in a buffer sized to free memory;
the reference model is then unloaded and each test dtype is loaded in turn and compared
against the buffer. A corpus larger than one buffer is processed segment by segment (each
model loaded once per segment). The stored logits are the reference's exact float32 values,
so the comparison is identical to holding both models at once (tests/test_runner.py measures
this against an all-in-memory float64 computation).

Every finished pass is saved in `<out>/.state` (state.py), so a killed run resumes without
recomputing the reference or the dtypes it had finished.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from functools import partial

import numpy as np
import torch

import evalsuite
from evalsuite import corpus as corpus_mod
from evalsuite import kernels
from evalsuite.config import RunConfig, resolve_device
from evalsuite.errors import EvalsuiteError, UsageError
from evalsuite.forward import Scorer, auto_batch_size
from evalsuite.loading import check_model_source, load_model, load_tokenizer, stored_dtype, unload
from evalsuite.passes import (
    PassContext,
    TokenArrays,
    compare,
    keep_reference,
    noise_pass,
    staging,
    timed_pass,
)
from evalsuite.precision import Precision, exact_fp32, numeric_flags, unsupported_reason
from evalsuite.state import RunState, model_signature
from evalsuite.summary import build_results


def say(message: str) -> None:
    print(f"evalsuite: {message}", file=sys.stderr, flush=True)


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


def _fault(name: str) -> None:
    """Fault injection for the interruption tests: EVALSUITE_FAULT=kill-after:<pass name>."""
    if os.environ.get("EVALSUITE_FAULT") == f"kill-after:{name}":
        os.kill(os.getpid(), signal.SIGKILL)


def _state_fields(cfg: RunConfig, source: str, device: torch.device, corpus_identity: dict) -> dict:
    """What must match for saved passes to be reused: anything that changes a number."""
    return {"evalsuite": evalsuite.__version__, "torch": torch.__version__, "model": source,
            "model_files": model_signature(source), "corpus_sha256": corpus_identity["sha256"],
            "seq_len": cfg.seq_len, "max_tokens": cfg.max_tokens, "reference": cfg.reference.name,
            "batch_size": cfg.batch_size, "noise_tokens": cfg.noise_tokens, "buffer_gib": cfg.buffer_gib,
            "attn": cfg.attn_implementation, "device": str(device), "numerics": cfg.numerics,
            "headroom_margin_bits": cfg.headroom_margin_bits, "tasks": list(cfg.tasks),
            "num_fewshot": cfg.num_fewshot, "limit": cfg.limit}


def run(cfg: RunConfig, source: str, observers: tuple = (), resume: bool = False, fresh: bool = False,
        write_outputs=None):
    """Evaluate `source` per `cfg`; return (`RunResults`, per-token arrays by name).

    With `resume`, finished passes are kept in `<cfg.out_dir>/.state` and reused by a rerun
    (`fresh` discards them first); `write_outputs(results, per_token)` is then called before the
    state is removed, so a kill at any moment leaves either the state or the results.

    `observers` are plain objects with any of these methods (docs/extending.md), called with the
    model resident: pass_started(ctx), batch_started(offset, ids (B, T+1)), pass_finished(ctx),
    and finish(metrics by dtype) -> (metric additions by dtype, extra result sections); for
    resume, snapshot(ctx) -> JSON-able and restore(ctx_without_model, snapshot).
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    check_model_source(source)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    texts, corpus_identity = corpus_mod.load_texts(cfg.corpus)
    windows = corpus_mod.tokenize(texts, tokenizer, cfg.seq_len, cfg.max_tokens)
    n = windows.n_tokens
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

    state = RunState(cfg.out_dir, _state_fields(cfg, source, device, corpus_identity), enabled=resume, fresh=fresh)
    loop = _Loop(cfg, source, device, tokenizer, windows, tests, observers, state)
    loop.run_all()
    if loop.resumed:
        say(f"resumed: reused the saved {', '.join(sorted(loop.resumed))} passes from {state.root}")

    prov = {**loop.prov, "batch_size": loop.batch, "device": str(device), "stored_dtype": stored_dtype(source),
            "divergence_path": "fused-triton-float64" if kernels.available(device) else "torch-float64",
            "resumed_passes": sorted(loop.resumed)}
    results = build_results(cfg, source, device, tokenizer, windows, corpus_identity, loop.ref, loop.noise,
                            loop.arrays, skipped, loop.failed, prov)
    for obs in observers:
        finish = getattr(obs, "finish", None)
        if finish is not None:
            additions, sections = finish({k: dict(v.metrics) for k, v in results.dtypes.items()})
            for name, extra in additions.items():
                if name in results.dtypes:
                    results.dtypes[name].metrics.update(extra)
            results.sections.update(sections)
    per_token = {"targets": windows.targets, "target_bytes": windows.target_bytes,
                 f"{cfg.reference.name}/nll": loop.ref.nll, f"{cfg.reference.name}/argmax": loop.ref.argmax}
    for name, a in loop.arrays.items():
        per_token.update({f"{name}/nll": a.nll, f"{name}/kl": a.kl, f"{name}/argmax": a.argmax,
                          f"{name}/nonfinite": a.nonfinite})
    if write_outputs is not None:
        write_outputs(results, per_token)
    if not loop.failed:  # a failed dtype keeps the state, so a rerun retries only that dtype
        state.finish()
    return results, per_token


class _Loop:
    """The segment loop's state in one place (it spans several passes and a resume)."""

    def __init__(self, cfg, source, device, tokenizer, windows, tests, observers, state: RunState):
        self.cfg, self.source, self.device, self.tokenizer = cfg, source, device, tokenizer
        self.windows, self.tests, self.observers, self.state = windows, tests, observers, state
        n = windows.n_tokens
        self.ref = TokenArrays.empty(n, divergence=False)
        self.arrays = {p.name: TokenArrays.empty(n, divergence=True) for p in tests}
        self.failed: dict[str, str] = {}
        self.noise: TokenArrays | None = None
        self.prov: dict[str, object] = {}
        self.batch = cfg.batch_size or auto_batch_size(device, cfg.seq_len)
        self.segments: list[tuple[int, int, int]] | None = None
        self.resumed: set[str] = set()  # dtypes whose saved passes were reused
        plan = state.plan()
        if plan is not None:
            self.segments = [tuple(s) for s in plan["segments"]]
            self.batch = plan["batch"]
            self.prov.update(plan["prov"])

    def _ctx(self, p: Precision, role: str, model, seg: int) -> PassContext:
        return PassContext(p, role, model, self.tokenizer, self.device, self.cfg, self.windows, seg,
                           self.segments[seg], self.batch)

    def _restore(self, seg: int, name: str, arrays: TokenArrays, p: Precision, role: str) -> None:
        saved, meta = self.state.load(seg, name)
        self.resumed.add(p.name)
        offset = self.segments[seg][2]
        arrays.restore(offset, {k: v for k, v in saved.items() if not k.startswith("noise/")},
                       meta["timing"], meta["batch_size"])
        if role == "reference" and seg == 0 and "noise/kl" in saved:
            noise = {k[6:]: v for k, v in saved.items() if k.startswith("noise/")}
            self.noise = TokenArrays.empty(len(noise["kl"]), divergence=True)
            self.noise.restore(0, noise, meta["noise_timing"], meta["noise_batch_size"])
        ctx = self._ctx(p, role, None, seg)
        for obs, snap in zip(self.observers, meta.get("observers", []), strict=False):
            if snap is not None and hasattr(obs, "restore"):
                obs.restore(ctx, snap)

    def _snapshots(self, ctx: PassContext) -> list:
        if not self.state.enabled:  # nothing will be saved: don't encode the observers' state
            return []
        return [obs.snapshot(ctx) if hasattr(obs, "snapshot") else None for obs in self.observers]

    def run_all(self) -> None:
        seg = 0
        while self.segments is None or seg < len(self.segments):
            todo = [p for p in self.tests if p.name not in self.failed and not self.state.has(seg, p.name)]
            buffer = self._reference(seg, need_logits=bool(todo))
            for p in self.tests:
                if p not in todo and p.name not in self.failed:
                    self._restore(seg, p.name, self.arrays[p.name], p, "test")
            for p in todo:
                self._test(seg, p, buffer)
            del buffer
            unload(None)
            if all(self.state.has(seg, p.name) for p in self.tests):
                self.state.drop_logits(seg)
            seg += 1

    def _reference(self, seg: int, need_logits: bool) -> torch.Tensor | None:
        cfg, ref_name = self.cfg, self.cfg.reference.name
        if self.segments is not None and self.state.has(seg, "reference"):
            self._restore(seg, "reference", self.ref, cfg.reference, "reference")
            return self.state.load_logits(seg, self.device) if need_logits else None
        model, load_s = _load(cfg, self.source, cfg.reference, self.device)
        self.ref.timing["load_s"] += load_s
        with exact_fp32() as ref_flags:
            scorer = Scorer(model, self.device)
            if self.segments is None:
                buffer_tokens = _buffer_tokens(cfg, self.device, scorer.vocab_size, self.windows.n_tokens)
                self.segments = _segments(self.windows.windows, buffer_tokens)
                self.prov.update(reference_flags=ref_flags, logits_path=scorer.logits_path,
                                 chunk_tokens=scorer.chunk_tokens, buffer_tokens=buffer_tokens,
                                 n_segments=len(self.segments),
                                 attn_implementation=getattr(model.config, "_attn_implementation", None))
                if len(self.segments) > 1:
                    say(f"reference logits kept in {len(self.segments)} segments of <= {buffer_tokens} tokens")
            first, last, offset = self.segments[seg]
            seg_windows = self.windows.windows[first:last]
            seg_tokens = sum(len(w) - 1 for w in seg_windows)
            buffer = torch.empty((seg_tokens, scorer.vocab_size), dtype=torch.float32, device=self.device)
            ctx = self._ctx(cfg.reference, "reference", model, seg)
            staged = staging(seg_tokens, self.device, divergence=False)
            before = self.ref.timing["pass_s"]
            self.batch = timed_pass(ctx, scorer, seg_windows, partial(keep_reference, buffer, staged), staged,
                                    self.ref, self.observers, f"{ref_name} (reference)")
            saved = self.ref.segment(offset, seg_tokens)
            meta = {"timing": _timing(self.ref, load_s, before),
                    "batch_size": self.batch, "observers": self._snapshots(ctx)}
            if seg == 0:
                self.noise = noise_pass(cfg, scorer, seg_windows, buffer, self.batch)
                saved.update({f"noise/{k}": v for k, v in self.noise.segment(0, len(self.noise.kl)).items()})
                meta.update(noise_timing=self.noise.timing, noise_batch_size=self.noise.batch_size)
        del scorer, ctx, staged
        unload(model)
        self.state.save_plan({"segments": self.segments, "batch": self.batch, "prov": self.prov})
        if need_logits:
            self.state.save_logits(seg, buffer)
        self.state.save(seg, "reference", saved, meta)  # last: "reference done" implies its logits exist
        _fault(ref_name)
        return buffer if need_logits else None

    def _test(self, seg: int, p: Precision, buffer: torch.Tensor) -> None:
        test = self.arrays[p.name]
        try:
            model, load_s = _load(self.cfg, self.source, p, self.device)
        except Exception as exc:
            self.failed[p.name] = str(exc)
            say(f"{p.name} failed: {exc}; the other dtypes go on")
            return
        test.timing["load_s"] += load_s
        self.prov.setdefault("test_flags", numeric_flags())
        scorer = Scorer(model, self.device)
        first, last, offset = self.segments[seg]
        seg_windows = self.windows.windows[first:last]
        ctx = self._ctx(p, "test", model, seg)
        staged = staging(len(buffer), self.device, divergence=True)
        before = test.timing["pass_s"]
        try:
            timed_pass(ctx, scorer, seg_windows, partial(compare, buffer, staged), staged, test, self.observers, p.name)
        except EvalsuiteError as exc:  # e.g. out of memory even at batch size 1: the others go on
            self.failed[p.name] = str(exc)
            say(f"{p.name} failed: {exc}; the other dtypes go on")
        else:
            meta = {"timing": _timing(test, load_s, before), "batch_size": test.batch_size,
                    "observers": self._snapshots(ctx)}
            self.state.save(seg, p.name, test.segment(offset, len(buffer)), meta)
        del scorer, ctx, staged
        unload(model)
        _fault(p.name)


def _timing(arrays: TokenArrays, load_s: float, pass_s_before: float) -> dict:
    """This segment's share of a dtype's timing (the arrays accumulate over segments)."""
    t = {"load_s": load_s, "pass_s": arrays.timing["pass_s"] - pass_s_before}
    if "peak_memory_gib" in arrays.timing:
        t["peak_memory_gib"] = arrays.timing["peak_memory_gib"]
    return t
