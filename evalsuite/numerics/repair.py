"""Repair: the cheapest recipe that makes a broken precision safe, searched from what numerics measured.

The search is plain functions over the numerics findings (the first non-finite module, and each
module's reference absmax with its headroom) and a `measure(recipe) -> Outcome` callback that
runs a real pass (passes/repair.py). Nothing here is specific to a model:

1. the clamp transformers applies to FP16 hidden states (FP16 compute only);
2. FP32 islands at the offending modules: the first non-finite module and every attention/MLP
   block whose reference output exceeds the format's largest finite value;
3. an FP32 residual stream from the first decoder layer at risk (the first whose output has less
   than the margin of headroom, or the first non-finite layer if earlier), with FP32 islands at the
   attention/MLP blocks from there on that are short of headroom; while it fails, the new first
   failure is added as an island (a block) or moves the start earlier (a layer before it);
4. pruning the best safe candidate: the stream started at the first non-finite layer instead (the
   latest start that can work, measured and kept only if safe), then each island dropped in turn.
   A pruned candidate whose headroom (known from the reference's activations before any pass)
   is short of the margin cannot be safe, whatever its pass shows: it is listed, not measured.

Safe: no non-finite logit or module output on the measured tokens, and at least the margin of
headroom everywhere (reference activations against the formats the recipe hands each module's
output on in: what keeps other inputs from overflowing). Cheapest: fewest parameters held in FP32
beyond the base recipe, then fewest FP32 residual-stream layers; the clamp adds neither. At most
`REPAIR_PASSES` candidates are measured per precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from evalsuite.model.precision import FORMATS, Island, Precision
from evalsuite.model.recipes import module_formats, with_changes
from evalsuite.numerics.verdict import num

REPAIR_PASSES = 8
BLOCKS = ("attention", "mlp")


@dataclass(frozen=True)
class Outcome:
    """One candidate measured over the repair tokens."""

    recipe: Precision
    metrics: dict  # n_tokens, nonfinite_tokens, kl_mean, kl_p99, top1_agreement, ppl_ratio, tokens_per_s, ...
    first_failure: dict | None  # the first non-finite module ({"module", "kind", "layer"}), or None
    min_headroom_bits: float | None  # under the recipe's formats, reference activations
    tight_module: str | None = None  # where that headroom is smallest
    cost: tuple = field(default=(0, 0))  # (extra FP32 parameters, FP32 stream layers)
    measured: bool = True  # False: ruled out by its headroom alone, no pass run

    @property
    def finite(self) -> bool:
        return self.measured and not self.metrics.get("nonfinite_tokens") and self.first_failure is None


def headroom(p: Precision, modules: list[dict]) -> tuple[float | None, str | None]:
    """(min headroom bits, module) of recipe `p` from the reference's per-module absmax (execution order)."""
    limits = module_formats(p, [(m["module"], m["kind"], m["layer"]) for m in modules])
    best: tuple[float | None, str | None] = (None, None)
    for m in modules:
        a = m["absmax"]
        h = math.log2(limits[m["module"]].finite_max / a) if 0 < a < math.inf else (-math.inf if a == math.inf else None)
        if h is not None and (best[0] is None or h < best[0]):
            best = (h, m["module"])
    return best


def is_safe(o: Outcome, margin: float) -> bool:
    return o.finite and (o.min_headroom_bits is None or o.min_headroom_bits >= margin)


def _islands(base: Precision, modules: list[str]) -> tuple[Island, ...]:
    fp32 = FORMATS["fp32"]
    out = list(base.islands)
    for m in modules:
        island = Island(m, fp32)
        if island not in out:
            out.append(island)
    return tuple(out)


def _first_at_risk(findings: dict) -> int | None:
    """The first decoder layer whose output (the residual stream) lacks the margin, or where FP16 first failed."""
    margin = findings["margin_bits"]
    layers = [m["layer"] for m in findings["modules"] if m["kind"] == "layer" and m["headroom_bits"] < margin]
    ff = findings.get("first_failure")
    if ff and ff.get("layer") is not None:
        layers.append(ff["layer"])
    return min(layers) if layers else None


def _tight_blocks(findings: dict, start: int, limit_bits: float) -> list[str]:
    return [m["module"] for m in findings["modules"] if m["kind"] in BLOCKS and m["layer"] is not None
            and m["layer"] >= start and m["headroom_bits"] < limit_bits]


def search(base: Precision, findings: dict, measure: Callable[[Precision], Outcome],
           max_passes: int = REPAIR_PASSES) -> list[Outcome]:
    """Every candidate measured, in the order tried (see the module docstring)."""
    tried: dict[str, Outcome] = {}
    margin = findings["margin_bits"]

    def run(p: Precision) -> Outcome | None:
        if p.name in tried:
            return tried[p.name]
        if len(tried) >= max_passes:
            return None
        tried[p.name] = measure(p)
        return tried[p.name]

    ff = findings.get("first_failure")
    if base.compute == FORMATS["fp16"] and not base.clamp:
        run(with_changes(base, clamp=True))
    over = [m["module"] for m in findings["modules"] if m["kind"] in BLOCKS and m["headroom_bits"] < 0]
    offending = ([ff["module"]] if ff and ff.get("kind") in (*BLOCKS, "layer") else []) + over
    if offending:
        run(with_changes(base, islands=_islands(base, list(dict.fromkeys(offending)))))
    start = _first_at_risk(findings)
    start = 0 if start is None else start
    if base.residual_fp32_from is not None:
        start = min(start, base.residual_fp32_from)
    best = _stream(base, findings, start, run, margin)
    if best is not None:
        _prune(best, base, ff, _unless_short(run, tried, findings), margin)
    return list(tried.values())


def _unless_short(run, tried: dict, findings: dict):
    """`run` for the pruning step: a candidate short of headroom is recorded unmeasured instead."""
    def prune_run(p: Precision) -> Outcome | None:
        h, where = headroom(p, findings["modules"])
        if p.name in tried or h is None or h >= findings["margin_bits"]:
            return run(p)
        tried[p.name] = Outcome(p, {}, None, h, where, measured=False)
        return tried[p.name]
    return prune_run


def _stream(base: Precision, findings: dict, start: int, run, margin: float) -> Outcome | None:
    """An FP32 residual stream from `start`, refined on failure; the safe outcome, or None."""
    p = with_changes(base, residual_fp32_from=start, islands=_islands(base, _tight_blocks(findings, start, margin)))
    for _ in range(4):
        o = run(p)
        if o is None or is_safe(o, margin):
            return o
        f = o.first_failure
        if f is not None and f.get("kind") in BLOCKS:
            p = with_changes(p, islands=_islands(p, [f["module"]]))
        elif f is not None and f.get("layer") is not None and f["layer"] < p.residual_fp32_from:
            p = with_changes(p, residual_fp32_from=f["layer"])
        elif f is not None and f.get("kind") not in ("layer", None):
            p = with_changes(p, islands=_islands(p, [f["module"]]))
        elif p.residual_fp32_from > 0:
            p = with_changes(p, residual_fp32_from=0)
        else:
            return None
    return None


def _prune(best: Outcome, base: Precision, ff: dict | None, run, margin: float) -> None:
    """Try the latest start that can work, then drop each island the search added (each measured)."""
    p = best.recipe
    if ff and ff.get("layer") is not None and ff["layer"] > p.residual_fp32_from:
        later = with_changes(p, residual_fp32_from=ff["layer"],
                             islands=tuple(i for i in p.islands if (_island_layer(i) or 0) >= ff["layer"]
                                           or i in base.islands))
        o = run(later)
        if o is not None and is_safe(o, margin):
            p = later
    for island in [i for i in p.islands if i not in base.islands]:
        fewer = with_changes(p, islands=tuple(i for i in p.islands if i != island))
        o = run(fewer)
        if o is not None and is_safe(o, margin):
            p = fewer


def _island_layer(island: Island) -> int | None:
    segs = island.pattern.split(".")
    for a, b in zip(segs, segs[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def choose(outcomes: list[Outcome], margin: float) -> tuple[Outcome | None, str]:
    """(the cheapest safe outcome, or else the cheapest finite one; why), by `Outcome.cost`."""
    safe = sorted((o for o in outcomes if is_safe(o, margin)), key=lambda o: o.cost)
    if safe:
        return safe[0], "safe"
    finite = sorted((o for o in outcomes if o.finite), key=lambda o: o.cost)
    if finite:
        return finite[0], "finite"
    return None, "none"


def rejection(o: Outcome, margin: float, chosen: Outcome | None) -> str:
    """Why a candidate was not chosen, in words."""
    if not o.measured:
        return (f"not measured: {o.min_headroom_bits:.2f} bits of headroom at {o.tight_module} (< {margin:g}) "
                "from the reference's activations, so it cannot be safe")
    if not o.finite:
        where = o.first_failure["module"] if o.first_failure else None
        bad = o.metrics.get("nonfinite_tokens")
        return ("still non-finite" + (f" at {where}" if where else "")
                + (f" ({bad} non-finite tokens)" if bad else " (logits finite)"))
    if o.min_headroom_bits is not None and o.min_headroom_bits < margin:
        return (f"finite here, but {o.min_headroom_bits:.2f} bits of headroom at {o.tight_module} "
                f"(< {margin:g}): other inputs may overflow")
    return "safe, but costlier than the chosen recipe" if chosen is not None else "not chosen"


def price(o: Outcome, baseline: dict | None, others: dict[str, dict]) -> str:
    """'0 non-finite over 2048 tokens (FP16: 312), KL mean 0.0021 (BF16: 0.0013), 1234 tok/s (FP16: 1400)'."""
    m, b = o.metrics, baseline or {}
    base = o.recipe.compute.name.upper() if b else None
    parts = [f"{m.get('nonfinite_tokens', 0)} non-finite tokens over {m.get('n_tokens')}"
             + (f" ({base}: {b.get('nonfinite_tokens')})" if base else "")]
    kl_others = ", ".join(f"{n.upper()}: {num(v.get('kl_mean'))}" for n, v in others.items() if v.get("kl_mean") is not None)
    parts.append(f"KL mean {num(m.get('kl_mean'))} nats" + (f" ({kl_others})" if kl_others else ""))
    parts.append(f"KL p99 {num(m.get('kl_p99'))}")
    if m.get("top1_agreement") is not None:
        parts.append(f"top-1 {m['top1_agreement']:.1%}")
    if m.get("tokens_per_s"):
        parts.append(f"{num(m['tokens_per_s'])} tok/s" + (f" ({base}: {num(b.get('tokens_per_s'))})"
                                                          if base and b.get("tokens_per_s") else ""))
    if m.get("peak_memory_gib") is not None:
        parts.append(f"peak memory {m['peak_memory_gib']:.2f} GiB" + (
            f" ({base}: {b['peak_memory_gib']:.2f})" if base and b.get("peak_memory_gib") is not None else ""))
    return ", ".join(parts)


def phrase(p: Precision, base: Precision) -> str:
    """'FP16 with an FP32 residual stream from layer 7 and model.layers.7.mlp in FP32': what `p` adds to `base`."""
    parts = []
    if p.residual_fp32_from is not None and p.residual_fp32_from != base.residual_fp32_from:
        parts.append("an FP32 residual stream" + (f" from layer {p.residual_fp32_from}" if p.residual_fp32_from else ""))
    added = [i for i in p.islands if i not in base.islands]
    if added:
        parts.append(", ".join(i.pattern for i in added) + f" in {added[0].format.name.upper()}"
                     if len({i.format for i in added}) == 1 else ", ".join(f"{i.pattern} in {i.format.name.upper()}"
                                                                          for i in added))
    if p.clamp and not base.clamp:
        parts.append("transformers' FP16 clamp after each decoder layer")
    return f"{base.name.upper()} with " + " and ".join(parts) if parts else base.name.upper()
