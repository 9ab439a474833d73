"""Numerics diagnostics: where a precision breaks, and why (docs/numerics.md).

`NumericsObserver` plugs into the run loop (`runner.run(..., observers=(obs,))`) and adds to
every run, with the model that is resident anyway:
1. weight conversion, from the FP32 reference's parameters (weights.py);
2. per-module activation absmax and a high percentile on the reference pass, and the headroom
   to each test dtype's largest finite value, log2(max_finite / absmax) (hooks.py);
3. per test dtype, the first module in execution order whose output turns inf/NaN;
4. per decoder layer, the test hidden states' error against the reference's (layers.py);
5. a verdict per test dtype with reasons (verdict.py).
Metrics go into each dtype's flat `metrics`; the details into the `numerics` section.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np

from evalsuite.model.loading import stored_dtype
from evalsuite.model.modules import find_modules
from evalsuite.model.precision import DTYPES, Precision
from evalsuite.model.recipes import module_formats, weights_format
from evalsuite.numerics.hooks import (
    HIST_BINS,
    HIST_BINS_PER_BIT,
    HIST_SAMPLE,
    PERCENTILE,
    Recorder,
    first_failure,
    module_record,
    p9999,
)
from evalsuite.numerics.layers import (
    SAMPLE_BYTES,
    SAMPLE_TOKENS,
    LayerError,
    LayerSample,
    compare,
    max_growth_layer,
)
from evalsuite.numerics.verdict import Evidence, Thresholds, decide, is_broken
from evalsuite.numerics.weights import TensorConversion, conversion_stats, summarize
from evalsuite.store.windows import scored_counts

NEAR_OVERFLOW_LISTED = 20  # modules per dtype listed in the section (the metric counts all)
CHART_KINDS = {"layer": "residual", "attention": "attention", "mlp": "mlp"}  # legend labels: short


class NumericsObserver:
    """Collects the diagnostics during a run; `finish` turns them into metrics and a section."""

    part = "numerics"  # how a failure of this observer is named (passes/observers.py)

    def __init__(self, cfg, source: str | None = None):
        self.cfg, self.source = cfg, source
        self.reference: Precision = cfg.reference
        self.tests = [p for p in dict.fromkeys(cfg.dtypes) if p != cfg.reference]
        self.thresholds = Thresholds(margin_bits=cfg.headroom_margin_bits)
        self.stored: str | None = None
        self.weights = None  # {dtype: [TensorConversion]}
        self.modules: dict[str, dict] = {}  # name -> {kind, layer, absmax, hist}, in execution order
        self.first_failure: dict[str, dict | None] = {}
        self.layer_errors: dict[str, list] = {}
        self.sample: LayerSample | None = None  # the reference's hidden states
        self.sample_info: dict = {}
        self.seen: set[str] = set()  # dtypes with at least one pass measured or restored
        self._pass = None  # (ctx, watched, recorder, sample) of the running pass
        self._weights_pending = None  # weight statistics of the running reference pass
        self._last: tuple | None = None  # (dtype, segment, findings) of the last pass (see snapshot)

    # -- runner callbacks ------------------------------------------------------------------
    def pass_started(self, ctx) -> None:
        if self._pass is not None:  # the previous pass raised (the runner goes on without it)
            self._pass[2].detach()
            self._pass = None
        watched = find_modules(ctx.model)
        reference = ctx.role == "reference"
        if reference and ctx.segment == 0:
            self.stored = stored_dtype(self.source or getattr(ctx.model, "name_or_path", "") or "")
            # every other dtype, not only this run's: a cached reference serves runs of other dtypes
            self._weights_pending = conversion_stats(ctx.model, self._convertible(), self.stored)
            self.sample = self._new_sample(ctx, watched)
        sample = None
        if ctx.segment == 0 and self.sample is not None:
            sample = self.sample if reference else self.sample.like()
        recorder = Recorder(watched, ctx.device, histogram=reference, capture=sample.capture if sample else None)
        recorder.attach()
        self._pass = (ctx, watched, recorder, sample)

    def batch_started(self, offset: int, ids) -> None:
        if self._pass is None:
            return
        _, _, recorder, sample = self._pass
        recorder.start_batch(offset)
        if sample is not None:
            sample.set_batch(offset, ids.shape[0] * (ids.shape[1] - 1))  # ids (B, T+1): B*T scored tokens

    def pass_finished(self, ctx) -> None:
        if self._pass is None:
            return
        _, watched, recorder, sample = self._pass
        self._pass = None
        recorder.detach()
        rows, hist = recorder.finish()
        contrib: dict = {"numerics": 1, "role": ctx.role, "failure": first_failure(watched, recorder.order, rows)}
        if ctx.role == "reference":
            contrib["modules"] = [module_record(watched[i], rows, hist, i) for i in recorder.order]
            if self._weights_pending is not None:
                contrib |= {"stored": self.stored, "sample_info": self.sample_info,
                            "weights": {d: [asdict(t) for t in ts] for d, ts in self._weights_pending.items()}}
                self._weights_pending = None
        elif sample is not None and self.sample is not None:
            contrib["layer_errors"] = [e.to_dict() for e in compare(self.sample.buf, sample.buf)]
        self._apply(ctx, contrib)
        self._last = (ctx.precision.name, ctx.segment, contrib)

    def snapshot(self, ctx) -> dict | None:
        """This pass's findings, JSON-able, saved with the pass for a resumed run (`restore`)."""
        if self._last is None or self._last[:2] != (ctx.precision.name, ctx.segment):
            return None
        findings = self._last[2]
        if "weights" in findings and self.sample is not None:  # the reference's hidden states, for a resume
            findings = {**findings, "sample": self.sample.to_state()}
        return findings

    def restore(self, ctx, snap) -> None:
        if isinstance(snap, dict) and snap.get("numerics") == 1:  # ignore another observer's snapshot
            self._apply(ctx, snap)

    def _apply(self, ctx, c: dict) -> None:
        """Merge one pass's findings (fresh, or restored from a snapshot) into the run's."""
        name = ctx.precision.name
        self.seen.add(name)
        if "weights" in c:
            self.stored, self.sample_info = c["stored"], c["sample_info"]
            self.weights = {d: [TensorConversion(**t) for t in ts] for d, ts in c["weights"].items()}
            if self.sample is None and c.get("sample"):
                self.sample = LayerSample.from_state(c["sample"], ctx.device)
        for m in c.get("modules", []):
            hist = np.zeros(HIST_BINS)
            hist[m["bins"]] = m["counts"]
            entry = self.modules.setdefault(m["name"], {"kind": m["kind"], "layer": m["layer"], "absmax": 0.0,
                                                        "hist": np.zeros(HIST_BINS)})
            entry["absmax"] = max(entry["absmax"], m["absmax"])
            entry["hist"] = entry["hist"] + hist
        if self.first_failure.get(name) is None:
            self.first_failure[name] = c.get("failure")
        if c.get("layer_errors") is not None and name not in self.layer_errors:  # rank 0's sample comes first
            self.layer_errors[name] = [LayerError(**e) for e in c["layer_errors"]]

    def finish(self, metrics_by_dtype: dict[str, dict]) -> tuple[dict, dict]:
        self.sample = None  # free the reference's hidden states
        for f in self.first_failure.values():
            ref = self.modules.get(f["module"]) if f else None
            if ref is not None:
                f["reference_absmax"] = ref["absmax"]
                f["reference_p9999"] = p9999(ref)
        ran = [p for p in self.tests if metrics_by_dtype.get(p.name)]
        additions: dict[str, dict] = {}
        evidence: dict[str, Evidence] = {}
        near: dict[str, list[dict]] = {}
        for p in ran:
            m, ev, near[p.name] = self._metrics(p)
            additions[p.name], evidence[p.name] = m, ev
        ref_failure = self.first_failure.get(self.reference.name)
        if self.reference.name in metrics_by_dtype:
            additions[self.reference.name] = {"first_nonfinite_module": ref_failure["module"] if ref_failure else None}
        merged = {n: {**metrics_by_dtype.get(n, {}), **additions.get(n, {})} for n in additions}
        safe = [p.name for p in ran if not is_broken(merged[p.name], evidence[p.name])] + [self.reference.name]
        verdicts = {}
        for p in ran:
            v = decide(p, merged[p.name], evidence[p.name], safe, self.thresholds)
            additions[p.name]["verdict"] = v.word
            verdicts[p.name] = {"verdict": v.word, "reasons": list(v.reasons)}
        return additions, {"numerics": self._section(ran, near, verdicts)}

    # -- helpers ---------------------------------------------------------------------------
    def _convertible(self) -> list[Precision]:
        return [p for p in DTYPES.values() if p != self.reference and p.dtype.is_floating_point]

    def _new_sample(self, ctx, watched) -> LayerSample | None:
        n_layers = sum(w.kind == "layer" for w in watched)
        emb = next((w.module for w in watched if w.kind == "embedding"), None)
        if not n_layers or emb is None or not hasattr(emb, "weight"):
            return None
        first, last, _ = ctx.segment_windows
        n_tokens = int(scored_counts(ctx.windows.windows[first:last]).sum())
        sample = LayerSample(n_tokens, n_layers + 1, int(emb.weight.shape[-1]), ctx.device)
        self.sample_info = {"tokens": sample.count, "stride": sample.stride}
        return sample

    def _headroom(self, p: Precision) -> dict[str, float]:
        """log2(limit / reference absmax) per module; the limit is the format the module's output has under
        the recipe (an FP32 residual stream's layers: FP32's), so a plain dtype's is its own for all."""
        limits = module_formats(p, [(n, e["kind"], e["layer"]) for n, e in self.modules.items()])
        return {n: math.log2(limits[n].finite_max / e["absmax"]) if 0 < e["absmax"] < math.inf else
                (-math.inf if e["absmax"] == math.inf else math.inf) for n, e in self.modules.items()}

    def take(self, name: str) -> dict:
        """A repair candidate's findings (its first non-finite module), removed from the run's: a candidate is
        measured on a few windows and reported by the repair, not in the numerics section."""
        self.seen.discard(name)
        self.layer_errors.pop(name, None)
        failure = self.first_failure.pop(name, None)
        ref = self.modules.get(failure["module"]) if failure else None
        if ref is not None:
            failure = {**failure, "reference_absmax": ref["absmax"]}
        return {"first_failure": failure}

    def repair_findings(self, p: Precision) -> dict:
        """What the repair search starts from: the first failure, and per module the reference's absmax (in
        execution order) with its headroom under `p`."""
        head = self._headroom(p)
        failure = self.first_failure.get(p.name)
        ref = self.modules.get(failure["module"]) if failure else None
        return {"first_failure": {**failure, "reference_absmax": ref["absmax"] if ref else None} if failure else None,
                "modules": [{"module": n, "kind": e["kind"], "layer": e["layer"], "absmax": e["absmax"],
                             "headroom_bits": head[n]} for n, e in self.modules.items()],
                "margin_bits": self.thresholds.margin_bits}

    def _metrics(self, p: Precision) -> tuple[dict, Evidence, list[dict]]:
        m: dict = {}
        held = weights_format(p)  # a recipe's weights are described by the one plain dtype they were rounded to
        tensors = (self.weights or {}).get(held.name, []) if held is not None else []
        if tensors:
            m.update(summarize(tensors, self.stored, DTYPES[held.name])[0])
        head = self._headroom(p)
        finite = [h for h in head.values() if h != math.inf]
        m["min_headroom_bits"] = min(finite) if finite else None
        near = sorted(({"module": n, "absmax": self.modules[n]["absmax"], "headroom_bits": h}
                       for n, h in head.items() if h < self.thresholds.margin_bits), key=lambda d: d["headroom_bits"])
        m["modules_near_overflow"] = len(near)
        ff = self.first_failure.get(p.name)
        m["first_nonfinite_module"] = ff["module"] if ff else None
        errors = self.layer_errors.get(p.name)
        layer = max_growth_layer(errors) if errors else None
        m["layer_max_error_growth"] = layer
        growth = next((e.growth for e in errors or [] if e.layer == layer), None)
        ev = Evidence(
            first_failure=ff, near_overflow=tuple(near),
            overflow_tensors=tuple({"name": t.name, "overflow": t.overflow, "absmax": t.absmax}
                                   for t in sorted(tensors, key=lambda t: -t.overflow) if t.overflow),
            underflow_tensors=tuple({"name": t.name, "underflow_frac": t.underflow_frac}
                                    for t in sorted(tensors, key=lambda t: -t.underflow_frac)
                                    if t.underflow_frac > self.thresholds.underflow_tensor_frac),
            growth={"layer": layer, "factor": growth if growth is not None and math.isfinite(growth) else None}
            if layer is not None else None)
        return m, ev, near

    def _section(self, ran: list[Precision], near: dict, verdicts: dict) -> dict:
        heads = {p.name: self._headroom(p) for p in ran}
        activations = []
        for n, e in self.modules.items():
            activations.append({"module": n, "kind": e["kind"], "layer": e["layer"], "absmax": e["absmax"],
                                "p9999": p9999(e),
                                "headroom_bits": {d: h[n] for d, h in heads.items()}})
        chart: dict[str, list] = {}
        for kind, label in CHART_KINDS.items():
            points = [{"layer": e["layer"], "max_abs": e["absmax"]} for e in self.modules.values() if e["kind"] == kind]
            if points:
                chart[label] = points
        return {
            "settings": {"headroom_margin_bits": self.thresholds.margin_bits, "percentile": PERCENTILE,
                         "percentile_estimator": f"histogram of float32 bit patterns, {HIST_BINS_PER_BIT} bins per "
                                                 f"power of two, <= {HIST_SAMPLE} elements per call (upper bin edge)",
                         "layer_sample": {"max_tokens": SAMPLE_TOKENS, "max_bytes": SAMPLE_BYTES, **self.sample_info},
                         "thresholds": asdict(self.thresholds)},
            "weights": {"stored_dtype": self.stored,
                        "by_dtype": {p: summarize(t, self.stored, DTYPES[p])[1] for p, t in (self.weights or {}).items()
                                     if p in {q.name for q in ran}}},
            "activations": activations,
            "activation_headroom": chart,
            "near_overflow": {d: rows[:NEAR_OVERFLOW_LISTED] for d, rows in near.items()},
            "first_nonfinite": {n: f for n, f in self.first_failure.items()},
            "layer_error": {d: [e.to_dict() for e in errors] for d, errors in self.layer_errors.items()},
            "verdicts": verdicts,
            "not_measured": [p.name for p in ran if p.name not in self.seen],  # resumed from --no-numerics state
        }
