"""Summary statistics over per-token arrays, in float64 numpy: plain functions, no torch.

Uncertainties treat tokens as independent draws (as llama.cpp's perplexity does). Tokens of
one text are correlated, so the standard errors are optimistic; they are still the right
scale for "is this difference bigger than the noise", and the paired forms below remove the
large shared variance between two dtypes scored on the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

LN2 = math.log(2.0)


def _exp(x: float) -> float:
    """exp that saturates to inf (a model can be bad enough to overflow a perplexity)."""
    return math.exp(x) if x < 709.0 else math.inf


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return mean, se


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_se: float  # delta method: ppl * se(mean NLL)
    mean_nll: float  # nats per token
    mean_nll_se: float
    bits_per_byte: float
    n_tokens: int
    n_bytes: int


def perplexity(nll: np.ndarray, n_bytes: int) -> PerplexityResult:
    """Token perplexity and bits per UTF-8 byte from per-token NLL (nats)."""
    nll = np.asarray(nll, dtype=np.float64)
    mean, se = _mean_se(nll)
    ppl = _exp(mean) if nll.size else math.nan
    bpb = float(nll.sum() / LN2 / n_bytes) if n_bytes > 0 and nll.size else math.nan
    return PerplexityResult(ppl, ppl * se, mean, se, bpb, int(nll.size), int(n_bytes))


@dataclass(frozen=True)
class PairedPerplexity:
    ppl_ratio: float  # exp(mean(nll_test - nll_ref)) = ppl_test / ppl_ref
    ppl_ratio_se: float
    delta_ppl: float  # ppl_test - ppl_ref
    delta_ppl_se: float
    delta_nll: float  # mean per-token NLL difference (nats)
    delta_nll_se: float


def paired_perplexity(nll_ref: np.ndarray, nll_test: np.ndarray) -> PairedPerplexity:
    """ΔPPL and PPL ratio with a paired standard error: both runs score the same tokens."""
    nll_ref = np.asarray(nll_ref, dtype=np.float64)
    d = np.asarray(nll_test, dtype=np.float64) - nll_ref
    m, se = _mean_se(d)
    ratio = _exp(m) if d.size else math.nan
    ppl_ref = _exp(float(nll_ref.mean())) if d.size else math.nan
    return PairedPerplexity(ratio, ratio * se, ppl_ref * (ratio - 1.0), ppl_ref * ratio * se, m, se)


@dataclass(frozen=True)
class DivergenceStats:
    kl_mean: float  # nats, KL(ref || test) per token
    kl_mean_se: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    top1_agreement: float  # fraction of tokens whose argmax matches the reference's
    delta_p_mean: float  # mean of p_test(correct) - p_ref(correct)
    delta_p_rms: float
    max_abs_dlogit: float
    n_tokens: int

    def as_metrics(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def divergence_stats(
    kl: np.ndarray, top1_agree: np.ndarray, p_ref: np.ndarray, p_test: np.ndarray, max_abs_dlogit: np.ndarray
) -> DivergenceStats:
    """Summaries of per-token divergence arrays (all (N,), already restricted to finite tokens)."""
    kl = np.asarray(kl, dtype=np.float64)
    n = int(kl.size)
    if n == 0:
        nan = math.nan
        return DivergenceStats(nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, 0)
    mean, se = _mean_se(kl)
    q = np.quantile(kl, [0.5, 0.9, 0.99, 0.999])
    dp = np.asarray(p_test, dtype=np.float64) - np.asarray(p_ref, dtype=np.float64)
    return DivergenceStats(
        kl_mean=mean,
        kl_mean_se=se,
        kl_median=float(q[0]),
        kl_p90=float(q[1]),
        kl_p99=float(q[2]),
        kl_p999=float(q[3]),
        kl_max=float(kl.max()),
        top1_agreement=float(np.mean(np.asarray(top1_agree, dtype=np.float64))),
        delta_p_mean=float(dp.mean()),
        delta_p_rms=float(math.sqrt(np.mean(dp * dp))),
        max_abs_dlogit=float(np.max(max_abs_dlogit)),
        n_tokens=n,
    )


def kl_histogram(kl: np.ndarray, bins: int = 40) -> dict[str, list[float] | list[int]]:
    """Counts of per-token KL on log-spaced bins (for the report's distribution chart)."""
    kl = np.asarray(kl, dtype=np.float64)
    kl = kl[np.isfinite(kl)]
    if kl.size == 0:
        return {"edges": [], "counts": [], "n_zero": 0}
    positive = kl[kl > 0]
    n_zero = int(kl.size - positive.size)
    if positive.size == 0:
        return {"edges": [], "counts": [], "n_zero": n_zero}
    lo, hi = math.log10(positive.min()), math.log10(positive.max())
    if hi - lo < 1e-9:
        hi = lo + 1.0
    edges = np.logspace(lo, hi, bins + 1)
    edges[0], edges[-1] = min(edges[0], positive.min()), max(edges[-1], positive.max())  # logspace rounding
    counts, _ = np.histogram(positive, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist(), "n_zero": n_zero}
