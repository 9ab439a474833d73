"""The segment loop: reference first, then each test dtype, one model on the device at a time.

How the test dtypes see the reference without both models resident: for a *segment* of windows
the reference's FP32 logits, or its final hidden states and a copy of its FP32 head from which
they are re-applied bit for bit (reference.py decides by measurement, model/kept.py), are kept on
the device in a buffer sized to free memory; the reference model is then unloaded and each test
dtype is loaded in turn and compared against them. A corpus larger than one buffer is processed
segment by segment (each model loaded once per segment). The values compared are the reference's
exact float32 logits, so the comparison is identical to holding both models at once
(tests/passes/test_runner.py measures this against an all-in-memory float64 computation).

Where finished passes go: the reference's (per-token results, noise floor, observers'
findings, hidden states and head, or logits) into the reference cache (refcache.py) when it is
on, else into the resume state; the test dtypes' into the resume state (state.py). Large writes run in a background
thread while the next pass computes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch

from evalsuite.config import RunConfig
from evalsuite.errors import EvalsuiteError
from evalsuite.log import say
from evalsuite.model.convert import load_recipe
from evalsuite.model.cpu import fp32_accumulating_linears
from evalsuite.model.forward import Scorer
from evalsuite.model.kept import KeptReference
from evalsuite.model.loading import load_model, unload, vocab_size
from evalsuite.model.precision import Precision, exact_fp32, pass_flags
from evalsuite.passes import reference
from evalsuite.passes.attention import AttentionWarm
from evalsuite.passes.prewarm import prewarm_kernels, warm_kernels
from evalsuite.passes.scoring import (
    PassContext,
    TokenArrays,
    compare,
    noise_pass,
    restore_observers,
    staging,
    timed_pass,
)
from evalsuite.passes.stores import Stores
from evalsuite.phases import phase
from evalsuite.store.corpus import TokenWindows
from evalsuite.store.provenance import Provenance
from evalsuite.store.refcache import CacheCorrupt
from evalsuite.store.windows import scored_counts


@dataclass(frozen=True)
class Plan:
    """What the pass loop runs, fixed before the first model loads."""

    cfg: RunConfig
    source: str  # checkpoint path or Hub id
    device: torch.device
    tokenizer: object
    windows: TokenWindows  # this rank's windows
    tests: tuple[Precision, ...]  # the test precisions that can run here, in order
    batch: int  # windows per batch (the reference may halve it on out-of-memory)
    noise_tokens: int  # tokens of the noise-floor pass on this rank
    prewarm: object | None = None  # prewarm.prewarm_child's thread, started with the run (None: Loop starts one)


def pass_label(name: str, seg: int, segments) -> str:
    """The progress bar's label: a bar covers one segment, so a run of several says which one
    (a bar at 100 % is then that segment's end, not the precision's)."""
    return f"{name} segment {seg + 1}/{len(segments)}" if segments and len(segments) > 1 else name


def after_pass(loop: Loop, name: str) -> None:
    """Called once each pass is saved; a seam for the interruption tests (tests/faultrun.py), a no-op here."""


class Loop:
    """The segment loop's state in one place (it spans several passes and a resume)."""

    def __init__(self, plan: Plan, stores: Stores, observers: tuple, collect_snapshots: bool = False):
        self.cfg, self.source, self.device, self.tokenizer = plan.cfg, plan.source, plan.device, plan.tokenizer
        self.prewarm = plan.prewarm  # prewarm.py: a child compiling the kernel; run_all adds the thread
        self.attention = AttentionWarm(plan.device, [p.dtype for p in plan.tests])  # cuDNN's builds, off the test passes
        self.windows, self.tests, self.observers = plan.windows, plan.tests, observers
        self.state, self.cache, self.writer = stores.state, stores.cache, stores.writer
        self.noise_tokens = plan.noise_tokens
        self.refstore = self.cache if self.cache is not None else self.state
        self.state.writer = self.writer
        n = self.windows.n_tokens
        self.ref = TokenArrays.empty(n, divergence=False)
        self.arrays = {p.name: TokenArrays.empty(n, divergence=True) for p in self.tests}
        self.failed: dict[str, str] = {}
        self.noise: TokenArrays | None = None
        self.prov = Provenance()
        self.batch = plan.batch
        self.segments: list[tuple[int, int, int]] | None = None
        self.resumed: set[str] = set()  # dtypes whose saved passes were reused
        self.cached_reference = False  # the reference came from the cache (no reference model loaded)
        self.not_kept: str | None = None  # why the reference's logits were not written (see worth_keeping)
        self.keep_snapshots = self.state.enabled or self.cache is not None or collect_snapshots
        self.collected: list[tuple[str, str, int, list]] | None = [] if collect_snapshots else None
        saved = (self.cache.plan() if self.cache is not None else None) or self.state.plan()
        if saved is not None:
            self.segments = [tuple(s) for s in saved["segments"]]
            self.batch = saved["batch"]
            self.prov.update(saved["prov"])

    def ctx(self, p: Precision, role: str, model, seg: int) -> PassContext:
        span = self.segments[seg] if self.segments and seg < len(self.segments) else (0, 0, 0)
        return PassContext(p, role, model, self.tokenizer, self.device, self.cfg, self.windows, seg, span, self.batch)

    def _restore(self, seg: int, name: str, arrays: TokenArrays, p: Precision, role: str, store,
                 loaded: tuple | None = None) -> None:
        saved, meta = loaded or store.load(seg, name)
        if store is self.state:  # (a cached reference is reported as a cache hit instead)
            self.resumed.add(p.name)
        offset = self.segments[seg][2]
        arrays.restore(offset, {k: v for k, v in saved.items() if not k.startswith(("noise/", "kept/"))},
                       meta["timing"], meta["batch_size"])
        if role == "reference" and seg == 0 and "noise/kl" in saved:
            noise = {k[6:]: v for k, v in saved.items() if k.startswith("noise/")}
            self.noise = TokenArrays.empty(len(noise["kl"]), divergence=True)
            self.noise.restore(0, noise, meta["noise_timing"], meta["noise_batch_size"])
        ctx = self.ctx(p, role, None, seg)
        snaps = meta.get("observers", [])
        restore_observers(self.observers, ctx, snaps)
        self._collect(p.name, role, seg, snaps)

    def _snapshots(self, ctx: PassContext) -> list:
        if not self.keep_snapshots:  # nothing will be saved: don't encode the observers' state
            return []
        snaps = [obs.snapshot(ctx) if hasattr(obs, "snapshot") else None for obs in self.observers]
        self._collect(ctx.precision.name, ctx.role, ctx.segment, snaps)
        return snaps

    def _collect(self, name: str, role: str, seg: int, snaps: list) -> None:
        if self.collected is not None:  # a data-parallel rank: rank 0 restores these into its observers
            self.collected.append((name, role, seg, snaps))

    def run_all(self) -> None:
        seg = 0
        if self.device.type == "cuda":  # the kernel compiles (or loads what prewarm_child compiled) meanwhile
            self.prewarm = prewarm_kernels(self.device, vocab_size(self.source, self.cfg.trust_remote_code),
                                           [p.dtype for p in self.tests], after=self.prewarm) or self.prewarm
        while self.segments is None or seg < len(self.segments):
            todo = [p for p in self.tests if p.name not in self.failed and not self.state.has(seg, p.name)]
            buffer = self._reference(seg, need_logits=bool(todo))
            for p in self.tests:
                if p not in todo and p.name not in self.failed:
                    self._restore(seg, p.name, self.arrays[p.name], p, "test", self.state)
            for p in todo:
                self._test(seg, p, buffer)
            del buffer
            unload(None)
            self.state.drop_logits_when_done(seg, [p.name for p in self.tests])
            seg += 1

    def _load(self, p: Precision):
        """(model, seconds) for one precision (a recipe: converted, model/convert.py), placed as the run asks."""
        t0 = time.perf_counter()
        load = load_model if p.is_plain else load_recipe
        with phase("load"):
            model = load(self.source, p, self.device, self.cfg.trust_remote_code, self.cfg.attn_implementation,
                         device_map=self.cfg.device_map)
            routed = fp32_accumulating_linears(model, self.cfg.cpu_half_gemm)
        if routed:
            self.prov.cpu_half_gemm[p.name] = routed
        return model, time.perf_counter() - t0

    def _scorer(self, model, p: Precision, arrays: TokenArrays | None = None) -> Scorer:
        """The pass's Scorer; test passes in 2-byte dtypes compiled under --compile (compiled.py)."""
        compile = self.cfg.compile and arrays is not None and p.is_half
        with phase("load"):  # the decoder/head split's probe forward touches every weight once
            scorer = Scorer(model, self.device, compile=compile)
        with phase("compile"):
            kernel_s = warm_kernels(scorer, "test" if arrays is not None else "reference", self.prewarm)
            if arrays is not None:
                self.prewarm = None  # joined: every variant is compiled
        if kernel_s:
            timing = (arrays or self.ref).timing
            timing["kernel_compile_s"] = timing.get("kernel_compile_s", 0.0) + kernel_s
        self.prov.padded_head[p.name] = scorer.padded_head is not None
        if scorer.compiled:
            arrays.timing["compile_s"] = arrays.timing.get("compile_s", 0.0) + scorer.compile_s
            if self.prov.compiled is None:
                self.prov.compiled = {"backend": "inductor", "dynamic": True, "emulate_precision_casts": True,
                                      "dtypes": {}}
            self.prov.compiled["dtypes"][p.name] = {"modules": len(scorer.compiled), "compile_s": round(scorer.compile_s, 3)}
        return scorer

    def _reference(self, seg: int, need_logits: bool) -> KeptReference | None:
        if self.segments is not None and self.refstore.has(seg, "reference"):
            try:
                with phase("cache_io"):
                    loaded = self.refstore.load(seg, "reference")
                    kept = reference.load_kept(self.refstore, seg, self.device, loaded[0],
                                               self.prov.reference_kept or reference.LOGITS) if need_logits else None
                    self._restore(seg, "reference", self.ref, self.cfg.reference, "reference", self.refstore, loaded)
                self.cached_reference = self.cache is not None
                return kept
            except CacheCorrupt as exc:
                self.cache.drop(str(exc))
                say(f"{self.cache.problem}; computing the reference again")
                self.cache.reopen()
        return self._reference_pass(seg, need_logits)

    def _reference_pass(self, seg: int, need_logits: bool) -> KeptReference | None:
        cfg, ref_name = self.cfg, self.cfg.reference.name
        model, load_s = self._load(cfg.reference)
        self.ref.timing["load_s"] += load_s
        with exact_fp32() as ref_flags:
            scorer = self._scorer(model, cfg.reference)
            head = scorer.freeze_head()  # the reference's logits go through this copy (model/kept.py)
            if self.segments is None:
                reference.fix_plan(self, model, scorer, head, ref_flags, load_s)
            first, last, offset = self.segments[seg]
            seg_windows = self.windows.windows[first:last]
            seg_tokens = int(scored_counts(seg_windows).sum())
            kept = reference.allocate(self.prov.reference_kept, seg_tokens, scorer, head, self.device)
            ctx = self.ctx(cfg.reference, "reference", model, seg)
            staged = staging(seg_tokens, self.device, divergence=False)
            before = self.ref.timing["pass_s"]
            with self.attention.recording():
                self.batch = timed_pass(ctx, scorer, seg_windows, reference.on_chunk(scorer, kept, staged), staged,
                                        self.ref, (*self.observers, self.attention),
                                        pass_label(f"{ref_name} (reference)", seg, self.segments))
            scorer.hidden_out = False
            if self.prov.reference_head_us is None:
                self.prov.reference_head_us = reference.measure_head(self, kept)
            saved = self.ref.segment(offset, seg_tokens)
            meta = {"timing": _timing(self.ref, load_s, before),
                    "batch_size": self.batch, "observers": self._snapshots(ctx)}
            if seg == 0 and self.noise_tokens > 0:
                self.noise = noise_pass(cfg, scorer, seg_windows, kept, self.batch, self.noise_tokens)
                saved.update({f"noise/{k}": v for k, v in self.noise.segment(0, len(self.noise.kl)).items()})
                meta.update(noise_timing=self.noise.timing, noise_batch_size=self.noise.batch_size)
        del scorer, ctx, staged
        unload(model)
        plan = {"segments": self.segments, "batch": self.batch, "prov": self.prov.plan_dict()}
        self.state.save_plan(plan)
        if self.cache is not None:
            self.cache.save_plan(plan)
        reference.keep_for_reuse(self, seg, kept, saved, meta, need_logits)
        kept.release()  # where logits are kept, the hidden states and head go (once written)
        after_pass(self, ref_name)
        return kept if need_logits else None

    def _test(self, seg: int, p: Precision, buffer: KeptReference) -> None:
        """One test pass under the numeric flags its precision runs with (TF32 for `tf32`), recorded per precision."""
        with pass_flags(p) as flags:
            self.prov.test_flags = {**(self.prov.test_flags or {}), p.name: flags}
            self._test_pass(seg, p, buffer)

    def _test_pass(self, seg: int, p: Precision, buffer: KeptReference) -> None:
        test = self.arrays[p.name]
        try:
            model, load_s = self._load(p)
        except Exception as exc:
            self.failed[p.name] = str(exc)
            say(f"{p.name} failed: {exc}; the other dtypes go on")
            return
        test.timing["load_s"] += load_s
        scorer = self._scorer(model, p, test)
        first, last, offset = self.segments[seg]
        seg_windows = self.windows.windows[first:last]
        ctx = self.ctx(p, "test", model, seg)
        staged = staging(len(buffer), self.device, divergence=True)
        before = test.timing["pass_s"]
        try:
            timed_pass(ctx, scorer, seg_windows, partial(compare, buffer, staged), staged, test,
                       (*self.observers, self.attention), pass_label(p.name, seg, self.segments))
        except EvalsuiteError as exc:  # e.g. out of memory even at batch size 1: the others go on
            self.failed[p.name] = str(exc)
            say(f"{p.name} failed: {exc}; the other dtypes go on")
        else:
            self.prov.attention_warm = self.attention.provenance()
            meta = {"timing": _timing(test, load_s, before), "batch_size": test.batch_size,
                    "observers": self._snapshots(ctx)}
            if scorer.compiled:
                meta["timing"]["compile_s"] = scorer.compile_s
            self.state.save(seg, p.name, test.segment(offset, len(buffer)), meta)
        del scorer, ctx, staged
        unload(model)
        after_pass(self, p.name)


def _timing(arrays: TokenArrays, load_s: float, pass_s_before: float) -> dict:
    """This segment's share of a dtype's timing (the arrays accumulate over segments)."""
    t = {"load_s": load_s, "pass_s": arrays.timing["pass_s"] - pass_s_before}
    if "peak_memory_gib" in arrays.timing:
        t["peak_memory_gib"] = arrays.timing["peak_memory_gib"]
    return t
