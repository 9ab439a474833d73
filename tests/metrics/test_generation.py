"""Generation statistics against independent computations on hand-made and fresh random token sequences.

The references here are written differently from metrics/generation.py: plain Python loops over
token pairs, counts per step, sorted lists with the interpolation formula written out.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalsuite.metrics.generation import (
    NEAR_TIE,
    answer_letter,
    compare,
    first_divergence,
    pooled_logprob,
    summary,
    survival,
)

N = 6  # horizon of the hand-made cases


def _arr(*xs):
    return np.array(xs, dtype=np.int64)


def _by_hand_first(ref: list, test: list, horizon: int, bad: int = -1) -> int:
    """Walk both sequences; the first unequal pair, or where one ends, or never (horizon)."""
    pos = 0
    while True:
        if bad == pos:
            return pos
        if pos == len(ref) and pos == len(test):
            return horizon
        if pos == len(ref) or pos == len(test) or ref[pos] != test[pos]:
            return pos
        pos += 1


def _quantile(values: list, q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), written out."""
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    return xs[lo] + (h - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo])


def test_first_divergence_hand_made():
    assert first_divergence(_arr(1, 2, 3), _arr(1, 2, 3), N) == N  # identical, ended at the same EOS
    assert first_divergence(_arr(1, 2, 3, 4, 5, 6), _arr(1, 2, 3, 4, 5, 6), N) == N  # identical to the limit
    assert first_divergence(_arr(1, 2, 3), _arr(1, 9, 3), N) == 1
    assert first_divergence(_arr(7, 2), _arr(1, 2), N) == 0
    assert first_divergence(_arr(1, 2), _arr(1, 2, 3), N) == 2  # one ended where the other goes on
    assert first_divergence(_arr(1, 2, 3), _arr(1, 2, 3), N, test_bad=2) == 2  # same token, but from NaN logits
    assert first_divergence(_arr(1, 2, 3), _arr(1, 5, 3), N, ref_bad=2) == 1  # the earlier of the two


def test_first_divergence_random_against_walk():
    rng = np.random.default_rng()
    for _ in range(300):
        n = int(rng.integers(1, 12))
        ref = rng.integers(0, 3, n)
        test = ref.copy()
        if rng.random() < 0.7:
            test = np.concatenate([ref[: rng.integers(0, n + 1)], rng.integers(0, 3, rng.integers(0, 5))])
        bad = int(rng.integers(-1, n)) if rng.random() < 0.2 else -1
        want = _by_hand_first(ref.tolist(), test.tolist(), 12, bad)
        assert first_divergence(ref, test, 12, test_bad=bad) == want


def _hand_case():
    """Five prompts: identical, a near-tie flip, a clear change to a top-k token, one outside top-k, a NaN."""
    ref = [_arr(1, 2, 3, 4, 5, 6), _arr(1, 2, 3), _arr(4, 4, 4, 4, 4, 4), _arr(9, 8, 7, 6, 5, 4), _arr(1, 1, 1)]
    test = [_arr(1, 2, 3, 4, 5, 6), _arr(1, 2, 8, 9), _arr(4, 4, 4, 5, 5, 5), _arr(9, 30, 7), _arr(1, 1, 1)]
    topk = np.zeros((5, N, 3), np.int64)
    topk[:, :, 0] = np.array([np.resize(r, N) for r in ref])  # the reference's own token first
    topk[1, 2] = [3, 8, 0]  # at the flip of prompt 1 the test's 8 is second
    topk[2, 3] = [4, 7, 5]  # prompt 2's 5 is third
    topk[3, 1] = [8, 11, 12]  # prompt 3's 30 is not there
    margins = np.full((5, N), 2.0)
    margins[1, 2], margins[2, 3], margins[3, 1] = 0.03, 0.9, 4.0
    ref_bad = np.full(5, -1)
    test_bad = np.array([-1, -1, -1, -1, 1])
    return ref, test, topk, margins, ref_bad, test_bad


def test_compare_hand_made():
    ref, test, topk, margins, ref_bad, test_bad = _hand_case()
    c = compare(ref, topk, margins, ref_bad, test, test_bad, N)
    assert c.first_div.tolist() == [N, 2, 3, 1, 1]
    assert c.identical.tolist() == [True, False, False, False, False]
    assert np.isnan(c.margin[0]) and c.margin[1:4].tolist() == [0.03, 0.9, 4.0] and np.isnan(c.margin[4])
    assert np.isnan(c.in_topk[0]) and c.in_topk[1:].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert c.nonfinite.tolist() == [False, False, False, False, True]


def test_survival_hand_made():
    ref, test, topk, margins, ref_bad, test_bad = _hand_case()
    c = compare(ref, topk, margins, ref_bad, test, test_bad, N)
    s = survival(c.first_div, N)
    # first divergences [6, 2, 3, 1, 1]: all five alive at t=0 and t=1, three at t=2, two at 3, one from 4 on
    assert s.tolist() == [1.0, 1.0, 0.6, 0.4, 0.2, 0.2, 0.2]


def test_survival_random_against_counts():
    rng = np.random.default_rng()
    for _ in range(50):
        horizon = int(rng.integers(1, 40))
        first = rng.integers(0, horizon + 1, rng.integers(1, 60))
        want = [sum(1 for d in first.tolist() if d >= t) / len(first) for t in range(horizon + 1)]
        assert survival(first, horizon) == pytest.approx(want, abs=1e-15)


def test_summary_hand_made():
    ref, test, topk, margins, ref_bad, test_bad = _hand_case()
    c = compare(ref, topk, margins, ref_bad, test, test_bad, N)
    ref_lp = [np.full(len(r), -1.0) for r in ref]
    test_lp = [np.full(len(t), -1.5) for t in test]
    test_lp[4] = test_lp[4][:1]  # a continuation is scored up to its first non-finite step
    m = summary(c, ref_lp, test_lp, answers=(["A", "B", None], ["A", "C", "D"]))
    assert m["gen_prompts"] == 5 and m["gen_identical"] == pytest.approx(1 / 5)
    assert m["gen_first_div_median"] == 2.0  # sorted [1, 1, 2, 3, 6]
    assert m["gen_first_div_p10"] == pytest.approx(1.0)  # h = 0.4 between the two 1s
    # of the four divergences only prompt 1 (margin 0.03 < 0.1) is a near-tie; the NaN one never is
    assert NEAR_TIE == 0.1 and m["gen_near_tie_share"] == pytest.approx(1 / 4)
    assert m["gen_in_ref_topk"] == pytest.approx(2 / 4) and m["gen_nonfinite_prompts"] == 1
    assert m["gen_ref_logprob"] == pytest.approx(-1.5)
    assert m["gen_ref_logprob_delta"] == pytest.approx(-1.5 - (-1.0))  # pooled over every token: -1.5 vs -1.0
    assert m["gen_answer_changed"] == pytest.approx(2 / 3)


def test_summary_random_against_loops():
    rng = np.random.default_rng()
    p, horizon = int(rng.integers(5, 40)), 10
    ref = [rng.integers(0, 4, rng.integers(1, horizon + 1)) for _ in range(p)]
    test = [r.copy() if rng.random() < 0.4 else rng.integers(0, 4, rng.integers(1, horizon + 1)) for r in ref]
    topk = rng.integers(0, 4, (p, horizon, 2))
    margins = rng.exponential(0.3, (p, horizon))
    none = np.full(p, -1)
    c = compare(ref, topk, margins, none, test, none, horizon)
    ref_lp = [-rng.exponential(1.0, len(r)) for r in ref]
    test_lp = [-rng.exponential(1.0, len(t)) for t in test]
    m = summary(c, ref_lp, test_lp)
    firsts, near, inside = [], [], []
    for i in range(p):
        d = _by_hand_first(ref[i].tolist(), test[i].tolist(), horizon)
        firsts.append(d)
        if d < horizon:
            inside_now = d < len(ref[i]) and d < len(test[i])
            near.append(inside_now and margins[i, d] < 0.1)
            inside.append(inside_now and int(test[i][d]) in topk[i, d].tolist())
    assert c.first_div.tolist() == firsts
    assert m["gen_identical"] == pytest.approx(firsts.count(horizon) / p)
    assert m["gen_first_div_median"] == pytest.approx(_quantile(firsts, 0.5))
    assert m["gen_first_div_p10"] == pytest.approx(_quantile(firsts, 0.1))
    if near:
        assert m["gen_near_tie_share"] == pytest.approx(sum(near) / len(near))
        assert m["gen_in_ref_topk"] == pytest.approx(sum(inside) / len(inside))
    flat_test = [float(x) for t in test_lp for x in t]
    flat_ref = [float(x) for t in ref_lp for x in t]
    assert m["gen_ref_logprob_delta"] == pytest.approx(math.fsum(flat_test) / len(flat_test)
                                                       - math.fsum(flat_ref) / len(flat_ref), rel=1e-12)


def test_nothing_diverged_gives_no_near_tie_share():
    ref = [_arr(1, 2), _arr(3)]
    c = compare(ref, np.zeros((2, 4, 2), np.int64), np.ones((2, 4)), np.full(2, -1), [r.copy() for r in ref],
                np.full(2, -1), 4)
    m = summary(c, [np.zeros(2), np.zeros(1)], [np.zeros(2), np.zeros(1)])
    assert m["gen_identical"] == 1.0 and m["gen_first_div_median"] == 4.0 and m["gen_ref_logprob_delta"] == 0.0
    assert math.isnan(m["gen_near_tie_share"]) and math.isnan(m["gen_in_ref_topk"])  # null in results.json
    assert math.isnan(pooled_logprob([np.zeros(0)]))


def test_answer_letter():
    assert answer_letter(" B。因为", ("A", "B", "C", "D")) == "B"
    assert answer_letter("\n答案是B", ("A", "B")) is None
    assert answer_letter("", ("A",)) is None
