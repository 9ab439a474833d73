"""Summary statistics against independent float64 computations on fresh random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalsuite.metrics.stats import divergence_stats, kl_histogram, paired_perplexity, perplexity


@pytest.fixture
def rng():
    return np.random.default_rng()  # fresh inputs every run: the code must be right on any input


def test_perplexity_matches_definition(rng):
    nll = rng.gamma(2.0, 1.5, size=rng.integers(50, 500))
    n_bytes = int(rng.integers(100, 2000))
    r = perplexity(nll.astype(np.float32), n_bytes)
    total = math.fsum(float(x) for x in nll.astype(np.float32))
    mean = total / len(nll)
    var = math.fsum((float(x) - mean) ** 2 for x in nll.astype(np.float32)) / (len(nll) - 1)
    assert r.ppl == pytest.approx(math.exp(mean), rel=1e-12)
    assert r.mean_nll_se == pytest.approx(math.sqrt(var / len(nll)), rel=1e-9)
    assert r.ppl_se == pytest.approx(math.exp(mean) * math.sqrt(var / len(nll)), rel=1e-9)
    assert r.bits_per_byte == pytest.approx(total / math.log(2) / n_bytes, rel=1e-12)
    assert r.n_tokens == len(nll)


def test_paired_perplexity(rng):
    n = int(rng.integers(20, 300))
    ref = rng.gamma(2.0, 1.0, n)
    test = ref + rng.normal(0, 0.01, n)
    r = paired_perplexity(ref, test)
    ppl_ref = math.exp(math.fsum(ref) / n)
    ppl_test = math.exp(math.fsum(test) / n)
    d = [t - s for s, t in zip(ref, test, strict=True)]
    dm = math.fsum(d) / n
    se = math.sqrt(math.fsum((x - dm) ** 2 for x in d) / (n - 1) / n)
    assert r.ppl_ratio == pytest.approx(ppl_test / ppl_ref, rel=1e-10)
    assert r.delta_ppl == pytest.approx(ppl_test - ppl_ref, rel=1e-7, abs=1e-12)
    assert r.delta_nll_se == pytest.approx(se, rel=1e-9)
    assert r.ppl_ratio_se == pytest.approx(ppl_test / ppl_ref * se, rel=1e-9)


def test_divergence_stats(rng):
    n = int(rng.integers(100, 3000))
    kl = rng.lognormal(-8, 2, n)
    agree = rng.random(n) < 0.97
    p_ref, p_test = rng.random(n), rng.random(n)
    dl = rng.random(n)
    s = divergence_stats(kl, agree, p_ref, p_test, dl)
    srt = sorted(kl)

    def q(p):  # linear interpolation between order statistics (numpy's default definition)
        h = (n - 1) * p
        lo = math.floor(h)
        return srt[lo] + (h - lo) * (srt[min(lo + 1, n - 1)] - srt[lo])

    assert s.kl_mean == pytest.approx(math.fsum(kl) / n, rel=1e-12)
    assert s.kl_median == pytest.approx(q(0.5), rel=1e-12)
    assert s.kl_p99 == pytest.approx(q(0.99), rel=1e-12)
    assert s.kl_p999 == pytest.approx(q(0.999), rel=1e-12)
    assert s.kl_max == max(kl)
    assert s.top1_agreement == pytest.approx(sum(agree) / n)
    dp = [b - a for a, b in zip(p_ref, p_test, strict=True)]
    assert s.delta_p_mean == pytest.approx(math.fsum(dp) / n, rel=1e-10, abs=1e-15)
    assert s.delta_p_rms == pytest.approx(math.sqrt(math.fsum(x * x for x in dp) / n), rel=1e-12)
    assert s.max_abs_dlogit == max(dl)


def test_delta_ppl_se_is_the_delta_method_with_covariance(rng):
    """Against a hand-written delta method (llama.cpp's formula), on a pair whose ratio is far from 1."""
    n = int(rng.integers(50, 400))
    ref = rng.gamma(2.0, 1.0, n)
    test = 0.8 * ref + rng.gamma(1.0, 0.5, n)  # correlated, PPL ratio well above 1
    r = paired_perplexity(ref, test)
    mr, mt = math.fsum(ref) / n, math.fsum(test) / n
    var_r = math.fsum((x - mr) ** 2 for x in ref) / (n - 1) / n
    var_t = math.fsum((x - mt) ** 2 for x in test) / (n - 1) / n
    cov = math.fsum((a - mr) * (b - mt) for a, b in zip(ref, test, strict=True)) / (n - 1) / n
    pr, pt = math.exp(mr), math.exp(mt)
    want = math.sqrt(pt * pt * var_t + pr * pr * var_r - 2 * pt * pr * cov)
    assert r.delta_ppl_se == pytest.approx(want, rel=1e-9)
    assert abs(r.delta_ppl_se - pt * r.delta_nll_se) > 1e-3 * want  # the old PPL_test·SE(d) differs here


def test_lower_tail_and_delta_p_percentiles_and_standard_errors(rng):
    n = int(rng.integers(200, 2000))
    kl = rng.lognormal(-6, 2, n)
    agree = rng.random(n) < 0.9
    p_ref, p_test = rng.random(n), rng.random(n)
    s = divergence_stats(kl, agree, p_ref, p_test, rng.random(n))

    def q(values, p):  # linear interpolation between order statistics, by hand
        srt = sorted(values)
        h = (len(srt) - 1) * p
        lo = math.floor(h)
        return srt[lo] + (h - lo) * (srt[min(lo + 1, len(srt) - 1)] - srt[lo])

    assert s.kl_min == min(kl)
    for name, p in (("kl_p1", 0.01), ("kl_p5", 0.05), ("kl_p10", 0.1)):
        assert getattr(s, name) == pytest.approx(q(kl, p), rel=1e-12)
    dp = [b - a for a, b in zip(p_ref, p_test, strict=True)]
    assert s.delta_p_min == min(dp) and s.delta_p_max == max(dp)
    for name, p in (("delta_p_p1", 0.01), ("delta_p_p5", 0.05), ("delta_p_p10", 0.1), ("delta_p_median", 0.5),
                    ("delta_p_p90", 0.9), ("delta_p_p95", 0.95), ("delta_p_p99", 0.99)):
        assert getattr(s, name) == pytest.approx(q(dp, p), rel=1e-9, abs=1e-12)
    share = sum(agree) / n
    assert s.top1_agreement_se == pytest.approx(math.sqrt(share * (1 - share) / (n - 1)), rel=1e-12)
    sq = [x * x for x in dp]
    m2 = math.fsum(sq) / n
    se_m2 = math.sqrt(math.fsum((x - m2) ** 2 for x in sq) / (n - 1) / n)
    assert s.delta_p_rms_se == pytest.approx(se_m2 / (2 * math.sqrt(m2)), rel=1e-9)


def test_empty_inputs_are_nan_not_errors():
    s = divergence_stats(np.array([]), np.array([], bool), np.array([]), np.array([]), np.array([]))
    assert s.n_tokens == 0 and math.isnan(s.kl_mean)
    assert all(math.isnan(v) for k, v in s.as_metrics().items() if k != "n_tokens")
    assert math.isnan(perplexity(np.array([]), 10).ppl)


def test_kl_histogram_counts_every_token(rng):
    kl = np.concatenate([rng.lognormal(-6, 2, 500), np.zeros(7)])
    h = kl_histogram(kl, bins=20)
    assert sum(h["counts"]) + h["n_zero"] == len(kl)
    assert h["n_zero"] == 7 and len(h["edges"]) == 21
