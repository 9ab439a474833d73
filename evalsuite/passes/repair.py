"""The repair step: after the passes, search a safe recipe for each broken precision with real passes.

Which precisions: with `repair` "auto" (the default) each test precision whose logits or module
outputs went non-finite; with "on" (`--repair`) also those whose reference activations come within
the headroom margin of their format; "off" none.

On which tokens: `--repair-tokens` tokens of consecutive windows, starting at the batch that holds
the precision's first non-finite token (where it breaks, so a candidate has to fix that), aligned
to the main passes' batches. One FP32 reference pass over these windows gives the logits the
candidates are compared with (the main reference's were dropped with its segment); the same
windows in the same batches reproduce the main reference, which the step checks and records.
Then the plain precision itself and each candidate (numerics/repair.py proposes them) run as test
passes over those windows, with the numerics observer watching (its findings for a candidate are
taken out of the run's again). Each pass is eager (never compiled). Cost: the reference and the
precision once, plus at most REPAIR_PASSES candidates, each a model load and a pass over the
repair tokens.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

import numpy as np
import torch

from evalsuite.log import say
from evalsuite.metrics.stats import divergence_stats, paired_perplexity
from evalsuite.model.forward import Scorer
from evalsuite.model.loading import unload
from evalsuite.model.precision import exact_fp32, pass_flags
from evalsuite.numerics import repair as search
from evalsuite.passes.scoring import PassContext, TokenArrays, compare, keep_reference, staging, timed_pass
from evalsuite.phases import phase
from evalsuite.store.windows import cut, scored_counts

REPAIR_SEGMENT = -1  # a repair pass belongs to no segment: observers keep no per-segment sample for it


def wanted(loop, numerics) -> list:
    """The test precisions the run's repair setting asks to repair."""
    mode = loop.cfg.repair
    if mode == "off":
        return []
    out = []
    for p in loop.tests:
        if p.name in loop.failed:
            continue
        broken = bool((loop.arrays[p.name].nonfinite > 0).any())
        if numerics is not None:
            broken |= numerics.first_failure.get(p.name) is not None
            if mode == "on" and not broken:
                f = numerics.repair_findings(p)
                broken = any(m["headroom_bits"] < f["margin_bits"] for m in f["modules"])
        if broken:
            out.append(p)
    return out


def repair_windows(loop, name: str) -> tuple[int, int]:
    """(first window, last window + 1): the repair tokens, from the batch of the first non-finite token."""
    windows, budget = loop.windows.windows, loop.cfg.repair_tokens
    bad = np.flatnonzero(loop.arrays[name].nonfinite > 0)
    counts = scored_counts(windows)  # (W,) scored targets per window
    starts = np.concatenate([[0], np.cumsum(counts)])
    first = int(np.searchsorted(starts, bad[0], side="right") - 1) if bad.size else 0
    seg_first = max((s[0] for s in loop.segments or [(0, 0, 0)] if s[0] <= first), default=0)
    batch = max(1, loop.arrays[name].batch_size or loop.batch)
    first = seg_first + (first - seg_first) // batch * batch
    last, count = first, 0
    while last < len(windows) and (count < budget or last == first):
        count += int(counts[last])
        last += 1
    return first, last


def run_repairs(s, loop, observers, timing: dict) -> dict[str, dict]:
    """{precision name: its repair report} for each precision `wanted` asks for (empty when none)."""
    numerics = next((o for o in observers if hasattr(o, "repair_findings")), None)
    todo = wanted(loop, numerics)
    if not todo:
        return {}
    t0 = time.perf_counter()
    reports = {}
    for p in todo:
        say(f"repair: searching a safe recipe for {p.name} ({loop.cfg.repair_tokens} tokens per candidate)")
        reports[p.name] = _repair(loop, p, numerics)
    timing["repair_s"] = round(time.perf_counter() - t0, 3)
    return reports


def _repair(loop, p, numerics) -> dict:
    first, last = repair_windows(loop, p.name)
    lo = int(scored_counts(loop.windows.windows[:first]).sum())
    bad = np.flatnonzero(loop.arrays[p.name].nonfinite[lo:] > 0)
    windows = cut(loop.windows.windows[first:last], loop.cfg.repair_tokens, int(bad[0]) + 1 if bad.size else 0)
    n = int(scored_counts(windows).sum())
    buffer, ref = _reference(loop, windows, n)
    ref_diff = float(np.nanmax(np.abs(ref.nll - loop.ref.nll[lo:lo + n]))) if n else 0.0
    watch = (numerics,) if numerics is not None else ()
    findings = numerics.repair_findings(p) if numerics is not None else {
        "first_failure": None, "modules": [], "margin_bits": loop.cfg.headroom_margin_bits}
    measure = partial(_measure, loop, windows=windows, n=n, buffer=buffer, ref=ref, watch=watch, findings=findings)
    baseline = measure(p)
    outcomes = search.search(p, findings, measure)
    buffer = measure = None  # the logits (n, V) go before the next precision's
    unload(None)
    margin = findings["margin_bits"]
    others = {q.name: _slice_metrics(loop.arrays[q.name], loop.ref, lo, n) for q in loop.tests
              if q.name != p.name and q.name not in loop.failed and not (loop.arrays[q.name].nonfinite > 0).any()}
    return _report(p, findings, baseline, outcomes, others, margin,
                   {"first_window": first, "n_windows": last - first, "first_token": lo, "n_tokens": n,
                    "reference_nll_max_abs_diff": ref_diff})


def _ctx(loop, p, role: str, model, batch: int) -> PassContext:
    return PassContext(p, role, model, loop.tokenizer, loop.device, loop.cfg, loop.windows, REPAIR_SEGMENT,
                       (0, 0, 0), batch)


def _reference(loop, windows, n: int) -> tuple[torch.Tensor, TokenArrays]:
    """The reference's float32 logits (n, V) over the repair windows and its per-token arrays (no observers)."""
    model, _ = loop._load(loop.cfg.reference)
    with exact_fp32():
        with phase("load"):  # the split's probe and the frozen head, as the main passes count them
            scorer = Scorer(model, loop.device)
            scorer.freeze_head()  # its logits computed as the main reference's (passes/reference.py)
        buffer = torch.empty((n, scorer.vocab_size), dtype=torch.float32, device=loop.device)
        arrays = TokenArrays.empty(n, divergence=False)
        staged = staging(n, loop.device, divergence=False)
        timed_pass(_ctx(loop, loop.cfg.reference, "reference", model, loop.batch), scorer, windows,
                   partial(keep_reference, buffer, staged), staged, arrays, (), "repair: reference")
    del scorer, staged
    unload(model)
    return buffer, arrays


def _measure(loop, q, *, windows, n: int, buffer, ref: TokenArrays, watch, findings: dict) -> search.Outcome:
    """One real test pass of recipe `q` over the repair windows.

    The pass runs under a name of its own (`probe`), so the observer's findings for it never mix with
    those of a precision of the run that has the same recipe (the plain precision itself, first of all).
    """
    arrays = TokenArrays.empty(n, divergence=True)
    probe = replace(q, name=f"{q.name} (repair)")
    with pass_flags(q):
        try:
            model, _ = loop._load(probe)
        except Exception as exc:  # a candidate that cannot be built here (e.g. a pattern matching nothing)
            return search.Outcome(q, {"n_tokens": n, "error": str(exc)}, {"module": None, "error": str(exc)}, None)
        fp32 = sum(t.numel() for t in model.parameters() if t.dtype == torch.float32)
        with phase("load"):
            scorer = Scorer(model, loop.device)
        staged = staging(n, loop.device, divergence=True)
        timed_pass(_ctx(loop, probe, "test", model, loop.batch), scorer, windows, partial(compare, buffer, staged),
                   staged, arrays, watch, f"repair: {q.name}")
    del scorer, staged
    unload(model)
    failure = watch[0].take(probe.name)["first_failure"] if watch else None
    metrics = _metrics(arrays, ref, n)
    metrics["fp32_params"] = fp32
    h, where = search.headroom(q, findings["modules"])
    layers = 0 if q.residual_fp32_from is None else max(0, _n_layers(findings) - q.residual_fp32_from)
    return search.Outcome(q, metrics, failure, h, where, (fp32, layers))


def _n_layers(findings: dict) -> int:
    return len({m["layer"] for m in findings["modules"] if m["kind"] == "layer"})


def _metrics(a: TokenArrays, ref: TokenArrays, n: int) -> dict:
    """Divergence of one repair pass over its tokens (finite tokens only, as the main results)."""
    ok = (ref.nonfinite == 0) & (a.nonfinite == 0)
    d = divergence_stats(a.kl[ok], a.top1_agree[ok], a.p_ref[ok], a.p_test[ok], a.max_abs_dlogit[ok])
    pp = paired_perplexity(ref.nll[ok], a.nll[ok])
    pass_s = a.timing["pass_s"]
    return {"n_tokens": n, "nonfinite_tokens": int((a.nonfinite > 0).sum()), "kl_mean": d.kl_mean,
            "kl_p99": d.kl_p99, "kl_max": d.kl_max, "top1_agreement": d.top1_agreement, "ppl_ratio": pp.ppl_ratio,
            "tokens_per_s": round(n / pass_s, 1) if pass_s else None,
            "peak_memory_gib": a.timing.get("peak_memory_gib"), "pass_s": round(pass_s, 4)}


def _slice_metrics(a: TokenArrays, ref: TokenArrays, lo: int, n: int) -> dict:
    """Another precision's main-pass figures over the same tokens (what the repaired one is set beside)."""
    part = TokenArrays(**{k: getattr(a, k)[lo:lo + n] for k in ("nll", "argmax", "nonfinite", "kl", "top1_agree",
                                                                  "p_ref", "p_test", "max_abs_dlogit")})
    r = replace(ref, nll=ref.nll[lo:lo + n], nonfinite=ref.nonfinite[lo:lo + n])
    out = _metrics(part, r, n)
    for k in ("tokens_per_s", "peak_memory_gib", "pass_s"):
        out.pop(k)
    return out


def _outcome_dict(o: search.Outcome, verdict: str, why: str) -> dict:
    return {"recipe": o.recipe.name, "description": o.recipe.describe(), "status": verdict, "why": why,
            **o.metrics, "first_nonfinite_module": (o.first_failure or {}).get("module"),
            "min_headroom_bits": o.min_headroom_bits, "tightest_module": o.tight_module,
            "fp32_stream_layers": o.cost[1]}


def _report(p, findings, baseline: search.Outcome, outcomes, others: dict, margin: float, tokens: dict) -> dict:
    chosen, kind = search.choose(outcomes, margin)
    rows = [_outcome_dict(o, "chosen" if o is chosen else "rejected" if o.measured else "not measured",
                          "cheapest safe" if o is chosen and kind == "safe" else
                          "finite, but short of headroom; no safe candidate" if o is chosen else
                          search.rejection(o, margin, chosen)) for o in outcomes]
    ff = findings.get("first_failure")
    P = p.name.upper()
    if chosen is None:
        sentence = (f"repair: none of the {len(outcomes)} candidates tried made {P} finite on {tokens['n_tokens']} "
                    f"tokens (see the repair table); serve another precision")
    else:
        sentence = (f"repair: {search.phrase(chosen.recipe, p)} ({chosen.recipe.name}): "
                    f"{search.price(chosen, baseline.metrics, others)}"
                    + ("" if kind == "safe" else f"; but {search.rejection(chosen, margin, None)}")
                    + f"; measure it on the whole corpus with --dtypes {chosen.recipe.name}")
    say(sentence)
    return {"base": p.name, "tokens": tokens, "trigger": ff, "margin_bits": margin,
            "baseline": _outcome_dict(baseline, "baseline", "the precision itself on the same tokens"),
            "others": others, "candidates": rows, "chosen": chosen.recipe.name if chosen else None,
            "chosen_kind": kind, "sentence": sentence}


def attach(results, reports: dict[str, dict]):
    """The results with the repair section, each repaired precision's flat repair metrics and verdict reason."""
    if not reports:
        return results
    sections = dict(results.sections)
    sections["repair"] = reports
    numerics = sections.get("numerics")
    for name, r in reports.items():
        d = results.dtypes.get(name)
        chosen = next((c for c in r["candidates"] if c["status"] == "chosen"), None)
        if d is not None:
            d.metrics.update({"repair_recipe": r["chosen"], "repair_safe": r["chosen_kind"] == "safe",
                              "repair_kl_mean": chosen["kl_mean"] if chosen else None,
                              "repair_nonfinite_tokens": chosen["nonfinite_tokens"] if chosen else None})
        verdict = (numerics or {}).get("verdicts", {}).get(name) if isinstance(numerics, dict) else None
        if verdict is not None:
            verdict["reasons"] = [*verdict["reasons"], r["sentence"]]
    return replace(results, sections=sections)
