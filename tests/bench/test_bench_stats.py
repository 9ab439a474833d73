"""bench_stats against independent computations: scipy or brute-force binomial sums, plain loops."""

from __future__ import annotations

import math
from fractions import Fraction

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


def _pmf_by_mixture(n: int, b: int, c: int) -> dict[int, Fraction]:
    """P(D = k) of one resample's sum, exactly, by another route than the code's Fourier powers: the
    number m of nonzero draws is Binomial(n, (b+c)/n) and, given m, the +1 draws Binomial(m, c/(b+c))."""
    q, out = Fraction(b + c, n), {}
    for m in range(n + 1):
        pm = math.comb(n, m) * q**m * (1 - q) ** (n - m)
        if b + c == 0:
            out[0] = out.get(0, 0) + pm
            continue
        r = Fraction(c, b + c)
        for j in range(m + 1):
            out[2 * j - m] = out.get(2 * j - m, 0) + pm * math.comb(m, j) * r**j * (1 - r) ** (m - j)
    return out


def _quantiles(pmf: dict, n: int, level: float = 0.95) -> tuple[float, float]:
    """The smallest D/n whose CDF reaches each tail: a sampled bootstrap's percentiles in the limit."""
    ends, cdf = [], 0
    tails = iter(((1 - level) / 2, (1 + level) / 2))
    tail = next(tails)
    for k in sorted(pmf):
        cdf += pmf[k]
        while tail is not None and cdf >= Fraction(tail):
            ends.append(k / n)
            tail = next(tails, None)
    return ends[0], ends[1]


def _pairs(n: int, b: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference/test correctness of n questions with b correct→wrong and c wrong→correct, shuffled."""
    ref = np.zeros(n, bool)
    test = np.zeros(n, bool)
    ref[:b] = True
    test[b : b + c] = True
    ref[b + c : b + c + (n - b - c) // 2] = test[b + c : b + c + (n - b - c) // 2] = True  # concordant right
    perm = np.random.default_rng(n * 1000 + b * 10 + c).permutation(n)
    return ref[perm], test[perm]


@pytest.mark.parametrize("n,b,c", [(1, 0, 1), (5, 1, 2), (12, 0, 3), (49, 3, 5), (49, 7, 2), (120, 1, 0),
                                   (200, 17, 29)])
def test_bootstrap_distribution_matches_the_binomial_mixture(n, b, c):
    pmf = bench_stats.difference_pmf(n, b, c)
    exact = _pmf_by_mixture(n, b, c)
    np.testing.assert_allclose(pmf, [float(exact.get(k, 0)) for k in range(-n, n + 1)], rtol=0, atol=1e-13)
    ref, test = _pairs(n, b, c)
    assert bench_stats.paired_bootstrap_ci(ref, test) == _quantiles(exact, n)


@pytest.mark.parametrize("d", [(1, 0, 0, -1), (1, 1, 0, -1, 0), (-1, -1, 0, 1, 0, 0), (1, 0, 0, 0, 0, 0),
                               (1, -1, 1, 0, 1, 1)])
def test_exact_interval_by_enumerating_every_resample(d):
    """All n^n resamples of n <= 6 questions, counted: the bootstrap distribution itself."""
    import itertools

    n = len(d)
    counts: dict[int, int] = {}
    for pick in itertools.product(d, repeat=n):
        counts[sum(pick)] = counts.get(sum(pick), 0) + 1
    expect = _quantiles({k: Fraction(v, n**n) for k, v in counts.items()}, n)
    dd = np.array(d)
    ref = dd == -1  # -1: correct→wrong; +1: wrong→correct; 0: both wrong
    assert bench_stats.paired_bootstrap_ci(ref, ref ^ (dd != 0)) == expect


def test_exact_interval_is_the_limit_of_a_sampled_bootstrap_and_ignores_the_seed():
    """A 49-question subject: 400,000 sampled resamples (a plain numpy loop) land on the exact
    endpoints; 2,000 resamples, as before, move an endpoint with the seed; the exact one cannot."""
    n, b, c = 49, 3, 6
    ref, test = _pairs(n, b, c)
    exact = _pmf_by_mixture(n, b, c)
    ci = bench_stats.paired_bootstrap_ci(ref, test)
    cdf = np.cumsum([float(exact.get(k, 0)) for k in range(-n, n + 1)])
    for tail in (0.025, 0.975):  # no CDF value near a tail: the sampled percentile cannot straddle it
        assert np.abs(cdf - tail).min() > 0.002
    d = test.astype(float) - ref.astype(float)
    rng = np.random.default_rng(11)
    means = np.concatenate([d[rng.integers(0, n, size=(20_000, n))].mean(axis=1) for _ in range(20)])
    assert ci == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1e-12)
    sampled = {bench_stats.paired_bootstrap_ci(ref, test, seed=s, samples=2000) for s in range(30)}
    assert len(sampled) > 1  # the issue: a sampled interval's endpoint moved by a question with the seed
    assert {bench_stats.paired(ref, test, np.zeros((n, 4)), np.zeros((n, 4)), seed=s).delta_acc_ci
            for s in range(30)} == {ci}


def test_exact_interval_is_fast_on_a_large_task():
    import time

    ref, test = _pairs(100_000, 900, 1100)
    t0 = time.perf_counter()
    lo, hi = bench_stats.paired_bootstrap_ci(ref, test)
    assert time.perf_counter() - t0 < 1.0
    delta, se = 200 / 100_000, math.sqrt((900 + 1100) / 100_000 - (200 / 100_000) ** 2) / math.sqrt(100_000)
    assert lo == pytest.approx(delta - 1.96 * se, abs=2e-5) and hi == pytest.approx(delta + 1.96 * se, abs=2e-5)


def test_no_question_gives_nan_statistics():
    p = bench_stats.paired(np.zeros(0, bool), np.zeros(0, bool), np.zeros((0, 4)), np.zeros((0, 4)))
    assert p.flips == 0 and p.n == 0
    assert all(math.isnan(x) for x in (p.delta_acc, *p.delta_acc_ci, p.flip_rate, p.mcnemar_p, p.choice_kl,
                                       p.choice_agreement))


def test_answerable_looks_only_at_real_choices():
    ll = np.array([[-1.0, -2.0, -np.inf, -np.inf], [-1.0, np.nan, -2.0, -3.0], [-1.0, -2.0, -np.inf, -4.0],
                   [np.inf, -1.0, -2.0, -3.0], [-1.0, -2.0, -3.0, np.nan]])
    assert bench_stats.answerable(ll, [2, 4, 4, 4, 3]).tolist() == [True, False, False, False, True]
