"""bench_stats against independent computations: scipy or brute-force binomial sums, plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalsuite.bench import stats as bench_stats


def _binom_two_sided(b: int, n: int) -> float:
    """scipy's definition, by brute force: P(every outcome no more likely than b) under Bin(n, 1/2)."""
    pmf = [math.comb(n, k) / 2**n for k in range(n + 1)]
    return min(1.0, sum(p for p in pmf if p <= pmf[b] * (1 + 1e-7)))


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (0, 5), (1, 5), (3, 3), (4, 7), (10, 2), (25, 40), (0, 60),
                                 (117, 150), (400, 470)])
def test_mcnemar_exact_matches_the_binomial(b, c):
    p = bench_stats.mcnemar_exact_p(b, c)
    n = b + c
    expect = 1.0 if n == 0 else _binom_two_sided(b, n)
    assert p == pytest.approx(expect, rel=1e-9, abs=1e-300)
    assert bench_stats.mcnemar_exact_p(c, b) == p  # symmetric
    scipy_stats = pytest.importorskip("scipy.stats")
    if n:
        assert p == pytest.approx(scipy_stats.binomtest(b, n, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_mcnemar_small_cases_by_hand():
    assert bench_stats.mcnemar_exact_p(0, 5) == 2 / 32  # both all-one-way outcomes of 5 flips
    assert bench_stats.mcnemar_exact_p(1, 1) == 1.0
    assert bench_stats.mcnemar_exact_p(0, 0) == 1.0
    assert bench_stats.mcnemar_exact_p(0, 1000) == 2.0**-999  # exact integers: no overflow, no NaN
    assert bench_stats.mcnemar_exact_p(0, 2000) == 0.0  # below the smallest float: 0, not NaN
    with pytest.raises(ValueError):
        bench_stats.mcnemar_exact_p(-1, 2)


def test_accuracy_and_se():
    x = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)
    acc, se = bench_stats.accuracy(x)
    p, n = 5 / 8, 8
    assert acc == p and se == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))  # lm-eval's n-1 variance
    assert math.isnan(bench_stats.accuracy(np.array([True]))[1])
    assert all(math.isnan(v) for v in bench_stats.accuracy(np.array([], bool)))


def test_flips_by_loop():
    rng = np.random.default_rng(3)
    ref, test = rng.random(500) < 0.6, rng.random(500) < 0.55
    b = sum(1 for r, t in zip(ref, test, strict=True) if r and not t)
    c = sum(1 for r, t in zip(ref, test, strict=True) if t and not r)
    assert bench_stats.flips(ref, test) == (b, c)


def _bootstrap_by_loop(ref, test, seed, samples):
    """One resample at a time, from the same generator stream."""
    rng = np.random.default_rng(seed)
    d = test.astype(float) - ref.astype(float)
    means = [d[rng.integers(0, len(d), size=len(d))].mean() for _ in range(samples)]
    return tuple(np.percentile(means, [2.5, 97.5]))


def test_bootstrap_is_seeded_and_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    ref = rng.random(300) < 0.5
    test = ref.copy()
    test[rng.choice(300, 30, replace=False)] ^= True
    ci = bench_stats.paired_bootstrap_ci(ref, test, seed=7, samples=500)
    assert ci == bench_stats.paired_bootstrap_ci(ref, test, seed=7, samples=500)  # reproducible
    assert ci != bench_stats.paired_bootstrap_ci(ref, test, seed=8, samples=500)
    assert ci == pytest.approx(_bootstrap_by_loop(ref, test, 7, 500), abs=1e-12)
    delta = test.mean() - ref.mean()
    assert ci[0] <= delta <= ci[1]
    assert bench_stats.paired_bootstrap_ci(ref, ref, seed=1) == (0.0, 0.0)  # identical answers: no spread


def _kl_by_loop(ref_row, test_row):
    k = [i for i, x in enumerate(ref_row) if x != -math.inf]
    zr = sum(math.exp(ref_row[i]) for i in k)
    zt = sum(math.exp(test_row[i]) for i in k)
    return sum(math.exp(ref_row[i]) / zr * (ref_row[i] - math.log(zr) - test_row[i] + math.log(zt)) for i in k)


def test_choice_kl_and_agreement():
    ref = np.array([[-1.0, -2.0, -3.0, -4.0], [-5.0, -1.0, -2.0, -np.inf], [-700.0, -701.0, -702.0, -703.0]])
    test = np.array([[-1.1, -1.9, -3.0, -4.2], [-0.5, -1.0, -2.5, -np.inf], [-700.0, -701.0, -702.0, -703.0]])
    kl, agree = bench_stats.choice_divergence(ref, test)
    for i in range(3):
        assert kl[i] == pytest.approx(_kl_by_loop(ref[i].tolist(), test[i].tolist()), rel=1e-9, abs=1e-15)
    assert kl[2] == pytest.approx(0.0, abs=1e-15)  # large magnitudes: stable, not NaN
    assert agree.tolist() == [True, False, True]
    broken = test.copy()
    broken[0, 1] = np.nan
    kl, agree = bench_stats.choice_divergence(ref, broken)
    assert math.isnan(kl[0]) and not agree[0] and np.isfinite(kl[1:]).all()


def test_tied_top():
    ll = np.array([[-1.0, -1.0, -2.0, -3.0], [-1.0, -1.5, -2.0, -np.inf], [-2.0, -2.0, -2.0, -2.0]])
    assert bench_stats.tied_top(ll).tolist() == [True, False, True]


def test_paired_summary():
    ref = np.array([1, 1, 0, 0, 1, 0], bool)
    test = np.array([1, 0, 1, 0, 0, 0], bool)
    ll = np.zeros((6, 4))
    p = bench_stats.paired(ref, test, ll, ll, seed=0, samples=200)
    assert (p.correct_to_wrong, p.wrong_to_correct, p.flips) == (2, 1, 3)
    assert p.flip_rate == 0.5 and p.delta_acc == pytest.approx(-1 / 6)
    assert p.mcnemar_p == pytest.approx(_binom_two_sided(1, 3))
    assert p.choice_kl == 0.0 and p.choice_agreement == 1.0
