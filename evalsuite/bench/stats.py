"""Paired statistics of one test dtype's answers against the reference's, on the same questions.

Pure numpy and integer arithmetic (no torch, no lm-eval), so every function here is checked
against an independent computation in tests/bench/test_bench_stats.py. Why paired: both dtypes answer
the same questions, so their difference has far less noise than two independent accuracies, and
accuracy can stay flat while many answers change: flips and McNemar's test see that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

BOOTSTRAP_CHUNK = 200  # Monte-Carlo resamples drawn at a time: (200, n) indices, bounded memory for large n


def answerable(ll: np.ndarray, n_choices) -> np.ndarray:
    """(n,) bool: every real choice of the question has a finite log-likelihood.

    ll (n, C) with -inf padding beyond each question's n_choices (n,). A NaN or ±inf at a real
    choice (a dtype whose logits overflowed) leaves no answer: np.argmax of such a row is the
    first choice, which lm-eval then grades as if the model had picked it.
    """
    x = np.asarray(ll, np.float64)
    real = np.arange(x.shape[1])[None, :] < np.asarray(n_choices)[:, None]  # (n, C)
    return (np.isfinite(x) | ~real).all(axis=1)


def accuracy(correct: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of 0/1 scores (n,), with the n-1 sample variance lm-eval uses."""
    x = np.asarray(correct, dtype=np.float64)
    n = len(x)
    if n == 0:
        return math.nan, math.nan
    se = math.sqrt(x.var(ddof=1) / n) if n > 1 else math.nan
    return float(x.mean()), se


def flips(ref_correct: np.ndarray, test_correct: np.ndarray) -> tuple[int, int]:
    """(correct→wrong, wrong→correct): questions the reference got right and the test wrong, and back."""
    r, t = np.asarray(ref_correct, bool), np.asarray(test_correct, bool)
    return int((r & ~t).sum()), int((~r & t).sum())


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(at least as unbalanced a split) under Binomial(b + c, 1/2).

    The discordant pairs alone carry the evidence; under "the dtype changes nothing systematic"
    each flip is equally likely to go either way. Exact integer sums (no normal approximation,
    which is poor for the few flips a precision change usually causes); 1.0 when nothing flipped.
    """
    if b < 0 or c < 0:
        raise ValueError("flip counts must be non-negative")
    n, k = b + c, min(b, c)
    if n == 0 or 2 * k == n:
        return 1.0
    term, tail = 1, 1  # C(n, 0), running sum of C(n, i) for i <= k
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def difference_pmf(n: int, b: int, c: int) -> np.ndarray:
    """(2n + 1,) P(D = k) at index k + n, D = the sum of one bootstrap resample of the n paired
    differences, b of them -1 (correct→wrong), c of them +1 (wrong→correct), the rest 0.

    Each of the n draws is -1, 0 or +1 with probabilities b/n, (n-b-c)/n, c/n, so D's distribution
    is that one-draw distribution convolved n times: its discrete Fourier transform raised to the
    n-th power (length 2n + 1 holds every value of D, so nothing wraps around).
    """
    kernel = np.zeros(2 * n + 1)  # index k mod (2n + 1) holds P(one draw = k)
    kernel[0], kernel[1], kernel[-1] = (n - b - c) / n, c / n, b / n
    pmf = np.fft.ifft(np.fft.fft(kernel) ** n).real  # index k mod (2n + 1)
    return np.clip(np.roll(pmf, n), 0.0, None)  # index k + n; rounding can leave -1e-17


def paired_bootstrap_ci(ref_correct: np.ndarray, test_correct: np.ndarray, seed: int | None = None,
                        samples: int | None = None, level: float = 0.95) -> tuple[float, float]:
    """Percentile confidence interval of Δaccuracy (test - reference), resampling questions in pairs.

    Resampling whole questions keeps each question's two answers together, which is what makes
    the interval paired. By default the interval is exact: the percentiles of the bootstrap
    distribution itself (`difference_pmf`), i.e. what a sampled bootstrap approaches as its
    resamples grow, with no Monte-Carlo error and no seed. (With 2,000 sampled resamples an
    endpoint on a 49-question subject moved by a question with the seed.) An endpoint is the
    smallest Δ whose bootstrap CDF reaches (1 - level)/2, resp. (1 + level)/2.
    `samples`: a sampled bootstrap of that many resamples instead (numpy's default_rng(seed)), as
    other tools compute it.
    """
    d = np.asarray(test_correct, np.float64) - np.asarray(ref_correct, np.float64)  # (n,) in {-1, 0, 1}
    n = len(d)
    if n == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    if samples is None:
        cdf = np.cumsum(difference_pmf(n, int((d < 0).sum()), int((d > 0).sum())))  # (2n + 1,) at D = -n..n
        lo, hi = (int(np.argmax(cdf >= q - 1e-12)) - n for q in (tail, 1 - tail))  # D of the first CDF >= q
        return lo / n, hi / n
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, BOOTSTRAP_CHUNK):
        m = min(BOOTSTRAP_CHUNK, samples - start)
        means[start : start + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)  # (m, n) -> (m,)
    lo, hi = np.percentile(means, [tail * 100, 100 - tail * 100])
    return float(lo), float(hi)


def log_softmax_rows(ll: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (n, C) log-likelihoods; -inf marks a missing choice (fewer than C)."""
    x = np.asarray(ll, np.float64)
    m = np.max(x, axis=1, keepdims=True)  # (n, 1)
    m = np.where(np.isfinite(m), m, 0.0)  # a NaN row stays NaN below
    with np.errstate(divide="ignore", invalid="ignore"):
        return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def choice_divergence(ref_ll: np.ndarray, test_ll: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per question: KL(p_ref || p_test) of the answer distributions, and whether the top choices agree.

    p = softmax over the choices' log-likelihoods (n, C), -inf padding for missing choices. A row
    with a NaN (a broken dtype) has KL NaN and counts as disagreeing. np.argmax picks the first of
    tied choices, as lm-eval's `acc` does.
    """
    lp, lq = log_softmax_rows(ref_ll), log_softmax_rows(test_ll)  # (n, C)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)  # 0 log 0 = 0; inf where p > 0 = q
    bad = np.isnan(ref_ll).any(axis=1) | np.isnan(test_ll).any(axis=1)
    kl = np.where(bad, np.nan, terms.sum(axis=1))  # (n,)
    agree = (np.argmax(ref_ll, axis=1) == np.argmax(test_ll, axis=1)) & ~bad
    return kl, agree


def tied_top(ll: np.ndarray) -> np.ndarray:
    """(n,) bool: the best log-likelihood is shared by two or more choices, so argmax (the first
    of them) decides the answer. Happens when lm-eval's log-softmax output is rounded to FP16/BF16."""
    x = np.asarray(ll, np.float64)
    return (x == x.max(axis=1, keepdims=True)).sum(axis=1) > 1 if x.size else np.zeros(len(x), bool)


@dataclass(frozen=True)
class Paired:
    """One test dtype against the reference over one set of questions."""

    n: int
    delta_acc: float
    delta_acc_ci: tuple[float, float]
    correct_to_wrong: int
    wrong_to_correct: int
    flip_rate: float  # (correct→wrong + wrong→correct) / n
    mcnemar_p: float
    choice_kl: float  # mean over questions with finite KL
    choice_agreement: float

    @property
    def flips(self) -> int:
        return self.correct_to_wrong + self.wrong_to_correct


def paired(ref_correct, test_correct, ref_ll, test_ll, seed: int | None = None, samples: int | None = None) -> Paired:
    """Every paired statistic of one (test, reference) comparison; inputs (n,) and (n, C), the
    questions both dtypes answered (`answerable`). With none, every statistic is NaN (the flip
    counts 0): nothing was compared, so no gate may pass on it."""
    n = len(ref_correct)
    b, c = flips(ref_correct, test_correct)
    kl, agree = choice_divergence(ref_ll, test_ll)
    finite = kl[np.isfinite(kl)]
    return Paired(
        n=n,
        delta_acc=float(np.mean(np.asarray(test_correct, float) - np.asarray(ref_correct, float))) if n else math.nan,
        delta_acc_ci=paired_bootstrap_ci(ref_correct, test_correct, seed, samples),
        correct_to_wrong=b,
        wrong_to_correct=c,
        flip_rate=(b + c) / n if n else math.nan,
        mcnemar_p=mcnemar_exact_p(b, c) if n else math.nan,
        choice_kl=float(finite.mean()) if len(finite) else math.nan,
        choice_agreement=float(agree.mean()) if n else math.nan,
    )
