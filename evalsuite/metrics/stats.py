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
    """ΔPPL and PPL ratio with paired standard errors: both runs score the same tokens.

    ΔPPL = PPL_test - PPL_ref, and its standard error by the delta method with the covariance of
    the two mean NLLs, sqrt(P_t² σ_t² + P_r² σ_r² - 2 P_t P_r cov), as llama.cpp computes it:
    PPL_test·SE(d) (the previous formula) is exact only where the ratio is 1.
    """
    nll_ref = np.asarray(nll_ref, dtype=np.float64)
    nll_test = np.asarray(nll_test, dtype=np.float64)
    d = nll_test - nll_ref
    m, se = _mean_se(d)
    ratio = _exp(m) if d.size else math.nan
    ppl_ref = _exp(float(nll_ref.mean())) if d.size else math.nan
    ppl_test = ppl_ref * ratio
    return PairedPerplexity(ratio, ratio * se, ppl_ref * (ratio - 1.0), _delta_ppl_se(nll_ref, nll_test, ppl_ref,
                                                                                       ppl_test), m, se)


def _delta_ppl_se(nll_ref: np.ndarray, nll_test: np.ndarray, p_ref: float, p_test: float) -> float:
    n = nll_ref.size
    if n < 2:
        return math.nan
    cov = np.cov(nll_test, nll_ref, ddof=1) / n  # (2, 2): variances and covariance of the two means
    var = p_test * p_test * cov[0, 0] + p_ref * p_ref * cov[1, 1] - 2.0 * p_test * p_ref * cov[0, 1]
    return math.sqrt(max(var, 0.0))


KL_QUANTILES = {"kl_min": 0.0, "kl_p1": 0.01, "kl_p5": 0.05, "kl_p10": 0.1, "kl_median": 0.5, "kl_p90": 0.9,
                "kl_p99": 0.99, "kl_p999": 0.999}
DP_QUANTILES = {"delta_p_min": 0.0, "delta_p_p1": 0.01, "delta_p_p5": 0.05, "delta_p_p10": 0.1,
                "delta_p_median": 0.5, "delta_p_p90": 0.9, "delta_p_p95": 0.95, "delta_p_p99": 0.99, "delta_p_max": 1.0}


@dataclass(frozen=True)
class DivergenceStats:
    """Summaries of per-token divergence, the figures llama.cpp's KL mode prints and a few more.

    Quantiles use numpy's default (linear between order statistics). Standard errors treat tokens
    as independent: top-1's is the binomial sqrt(p(1-p)/(n-1)); Δp RMS's comes from the SE of
    mean(Δp²) by the delta method, SE/(2·RMS).
    """

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
    kl_min: float = math.nan  # the lower tail: where most tokens sit
    kl_p1: float = math.nan
    kl_p5: float = math.nan
    kl_p10: float = math.nan
    top1_agreement_se: float = math.nan
    delta_p_rms_se: float = math.nan
    delta_p_min: float = math.nan
    delta_p_p1: float = math.nan
    delta_p_p5: float = math.nan
    delta_p_p10: float = math.nan
    delta_p_median: float = math.nan
    delta_p_p90: float = math.nan
    delta_p_p95: float = math.nan
    delta_p_p99: float = math.nan
    delta_p_max: float = math.nan

    @classmethod
    def empty(cls) -> DivergenceStats:
        """No finite token: every statistic NaN, so no gate can pass on it."""
        nan = math.nan
        return cls(kl_mean=nan, kl_mean_se=nan, kl_median=nan, kl_p90=nan, kl_p99=nan, kl_p999=nan, kl_max=nan,
                   top1_agreement=nan, delta_p_mean=nan, delta_p_rms=nan, max_abs_dlogit=nan, n_tokens=0)

    def as_metrics(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def divergence_stats(
    kl: np.ndarray, top1_agree: np.ndarray, p_ref: np.ndarray, p_test: np.ndarray, max_abs_dlogit: np.ndarray
) -> DivergenceStats:
    """Summaries of per-token divergence arrays (all (N,), already restricted to finite tokens)."""
    kl = np.asarray(kl, dtype=np.float64)
    n = int(kl.size)
    if n == 0:
        return DivergenceStats.empty()
    mean, se = _mean_se(kl)
    q = dict(zip(KL_QUANTILES, np.quantile(kl, list(KL_QUANTILES.values())).tolist(), strict=True))
    dp = np.asarray(p_test, dtype=np.float64) - np.asarray(p_ref, dtype=np.float64)
    qdp = dict(zip(DP_QUANTILES, np.quantile(dp, list(DP_QUANTILES.values())).tolist(), strict=True))
    top1 = float(np.mean(np.asarray(top1_agree, dtype=np.float64)))
    sq_mean, sq_se = _mean_se(dp * dp)
    rms = math.sqrt(sq_mean)
    return DivergenceStats(
        kl_mean=mean,
        kl_mean_se=se,
        kl_max=float(kl.max()),
        top1_agreement=top1,
        delta_p_mean=float(dp.mean()),
        delta_p_rms=rms,
        max_abs_dlogit=float(np.max(max_abs_dlogit)),
        n_tokens=n,
        top1_agreement_se=math.sqrt(top1 * (1.0 - top1) / (n - 1)) if n > 1 else math.nan,
        delta_p_rms_se=sq_se / (2.0 * rms) if rms > 0 else math.nan,
        **q,
        **qdp,
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
