"""One word per test dtype (ok, degraded, broken) and the reasons, in sentences a user can act on.

- broken: the dtype produces inf/NaN (logits, or any watched module's output), or weights
  overflow to inf when cast. Nothing else it measures can be trusted.
- degraded: finite, but a divergence statistic is beyond its bound *and* well above the run's
  noise floor (`noise_factor` times it; the perplexity ratio must also be 2 standard errors
  from 1), or activations come within `margin_bits` of the dtype's largest finite value, or a
  weight tensor loses more than `underflow_tensor_frac` of its values to underflow.
- ok: none of the above.

The bounds are the ones `default_gates.toml` uses, and like them are engineering judgement
(docs/numerics.md says why): a KL mean of 0.01 nats is at most about 1 % in perplexity;
BF16, with its 8-bit mantissa, measures 0.001 on Gemma 3 270M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from evalsuite.model.precision import Precision


@dataclass(frozen=True)
class Thresholds:
    kl_mean: float = 0.01
    kl_p99: float = 0.1
    top1_agreement: float = 0.95
    ppl_ratio: float = 1.01
    noise_factor: float = 10.0  # "well above the noise floor"
    margin_bits: float = 1.0  # headroom below which a module is flagged as near overflow
    underflow_tensor_frac: float = 0.05  # real checkpoints measure <= 0.5 % per tensor in FP16


@dataclass(frozen=True)
class Evidence:
    """What the numerics diagnostics found for one dtype, beyond its flat metrics."""

    first_failure: dict | None = None  # {"module", "reference_absmax"}
    near_overflow: tuple[dict, ...] = ()  # {"module", "absmax", "headroom_bits"}, tightest first
    overflow_tensors: tuple[dict, ...] = ()  # {"name", "overflow", "absmax"}
    underflow_tensors: tuple[dict, ...] = ()  # {"name", "underflow_frac"}, worst first
    growth: dict | None = None  # {"layer", "factor"}


@dataclass(frozen=True)
class Verdict:
    word: str  # ok | degraded | broken
    reasons: tuple[str, ...] = field(default_factory=tuple)


def num(x: float | None) -> str:
    """6.84e4, 9876, 1.5, 0.0011, 2.8e-6: short, with no '+' or leading zeros in exponents."""
    if x is None or not math.isfinite(x):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) >= 1 else f"{x:.2g}"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def limit(p: Precision) -> str:
    """A dtype's largest finite value as users know it: 65504, 3.39e38."""
    return f"{p.finite_max:.0f}" if p.finite_max < 1e6 else num(p.finite_max)


def serve_in(alternatives: list[str]) -> str:
    names = [a.upper() for a in alternatives]
    if not names:
        return "serve this model in a wider precision"
    return "serve this model in " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1])


def is_broken(metrics: dict, evidence: Evidence) -> bool:
    return bool((metrics.get("nonfinite_logits") or 0) > 0 or evidence.first_failure or evidence.overflow_tensors)


def _broken_reasons(p: Precision, m: dict, ev: Evidence, serve: str) -> list[str]:
    P, fmax = p.name.upper(), limit(p)
    out = []
    if ev.overflow_tensors:
        t = ev.overflow_tensors[0]
        total = sum(x["overflow"] for x in ev.overflow_tensors)
        out.append(f"{total} weight value(s) overflow to inf when cast to {P} ({t['name']} reaches "
                   f"{num(t['absmax'])} > {fmax}); {serve}, or rescale that tensor")
    ff = ev.first_failure
    if ff:
        ref = ff.get("reference_absmax")
        if ref is not None and ref > p.finite_max:
            out.append(f"{P} overflows at {ff['module']}: reference activations reach {num(ref)} > {fmax}; {serve}")
        else:
            out.append(f"{P} first gives inf/NaN at {ff['module']}, although the reference output there stays "
                       f"within range (up to {num(ref)}): a value inside that module overflows; {serve}")
    bad, n = m.get("nonfinite_tokens") or 0, m.get("n_tokens")
    if bad:
        out.append(f"{P} gives non-finite logits on {bad} of {n} tokens" + ("" if ff else f"; {serve}"))
    return out


def _divergence_reasons(m: dict, th: Thresholds) -> list[str]:
    """'KL mean 0.03 nats > 0.01' for each bound exceeded well above the noise floor."""
    parts = []

    def above_noise(value, noise) -> bool:
        return noise is None or value > th.noise_factor * noise

    kl, nkl = m.get("kl_mean"), m.get("noise_kl_mean")
    if kl is not None and kl > th.kl_mean and above_noise(kl, nkl):
        parts.append(f"KL mean {num(kl)} nats > {th.kl_mean}" + (f" (noise floor {num(nkl)})" if nkl is not None else ""))
    p99, n99 = m.get("kl_p99"), m.get("noise_kl_p99")
    if p99 is not None and p99 > th.kl_p99 and above_noise(p99, n99):
        parts.append(f"KL p99 {num(p99)} nats > {th.kl_p99}")
    top1, ntop1 = m.get("top1_agreement"), m.get("noise_top1_agreement")
    if top1 is not None and top1 < th.top1_agreement and above_noise(1 - top1, None if ntop1 is None else 1 - ntop1):
        parts.append(f"top-1 agreement {top1:.1%} < {th.top1_agreement:.0%}")
    ratio, se = m.get("ppl_ratio"), m.get("ppl_ratio_se")
    if ratio is not None and ratio > th.ppl_ratio and (se is None or ratio - 1 > 2 * se):
        parts.append(f"perplexity ratio {ratio:.4f} > {th.ppl_ratio}")
    return parts


def decide(p: Precision, metrics: dict, evidence: Evidence, alternatives: list[str],
           th: Thresholds = Thresholds()) -> Verdict:
    """The verdict of dtype `p` from its metrics and evidence; `alternatives` are the dtypes to suggest."""
    P = p.name.upper()
    serve = serve_in([a for a in alternatives if a != p.name])
    if is_broken(metrics, evidence):
        return Verdict("broken", tuple(_broken_reasons(p, metrics, evidence, serve)))
    reasons = []
    parts = _divergence_reasons(metrics, th)
    if parts:
        where = ""
        if evidence.growth and evidence.growth.get("layer") is not None:
            g = evidence.growth
            where = f"; the hidden-state error grows most at decoder layer {g['layer']}" + (
                f" (x{num(g['factor'])})" if g.get("factor") else "")
        reasons.append(f"{P} shifts next-token predictions beyond the bounds: {', '.join(parts)}{where}; "
                       f"check {P} on your own task, or {serve}")
    if evidence.near_overflow:
        t = evidence.near_overflow[0]
        more = len(evidence.near_overflow) - 1
        reasons.append(f"{P} has {t['headroom_bits']:.2f} bits of headroom at {t['module']}: reference activations "
                       f"reach {num(t['absmax'])}, close to {P}'s max {limit(p)}"
                       + (f" ({more} more module(s) within {th.margin_bits:g} bit(s))" if more else "")
                       + f"; longer or different inputs may overflow: {serve}, or test {P} on your own data")
    if evidence.underflow_tensors:
        t = evidence.underflow_tensors[0]
        more = len(evidence.underflow_tensors) - 1
        reasons.append(f"{t['underflow_frac']:.0%} of {t['name']}'s values underflow in {P} (to zero or subnormals)"
                       + (f", and {more} more tensor(s) lose over {th.underflow_tensor_frac:.0%}" if more else "")
                       + f"; rescale that tensor or {serve}")
    if reasons:
        return Verdict("degraded", tuple(reasons))
    kl, top1 = metrics.get("kl_mean"), metrics.get("top1_agreement")
    summary = "no overflow, no significant underflow"
    if kl is not None and top1 is not None:
        summary += f", and divergence within the bounds (KL mean {num(kl)} nats, top-1 agreement {top1:.1%})"
    return Verdict("ok", (summary,))
