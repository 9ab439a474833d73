"""Questions whose log-likelihoods are not finite have no answer: counted, left out of accuracy,
Δacc, flips, McNemar, the bootstrap and choice KL, and every statistic NaN when none is left.
Checked against numpy by hand over the finite questions, and on a tiny model whose FP16 logits overflow."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_bench_stats import _binom_two_sided, _pmf_by_mixture, _quantiles
from test_benchmarks import _cfg, _records
from tiny import build_model

from evalsuite.bench.grade import Answers
from evalsuite.bench.results import build
from evalsuite.bench.tasks import Question


def _plan(n_choices: list[int], subjects: list[str]):
    qs = tuple(Question("g", s, i, f"q{i}", tuple("ABCDE"[:k]), i % int(k), 0, 0)
               for i, (k, s) in enumerate(zip(n_choices, subjects, strict=True)))
    return SimpleNamespace(tasks=("g",), questions=qs, settings={})


def _answers(ll: np.ndarray, gold: np.ndarray) -> Answers:
    """As lm-eval grades: argmax == gold, where a NaN row's argmax is its first NaN."""
    return Answers(np.argmax(ll, axis=1) == gold, ll, 1.0)


def _by_hand(ref_ll, test_ll, gold, n_choices):
    """Accuracy, Δacc, flips, McNemar, choice KL, agreement over the questions both answered, by loops."""
    def ok(ll):
        return np.array([all(math.isfinite(x) for x in row[:k]) for row, k in zip(ll, n_choices, strict=True)])

    ok_r, ok_t = ok(ref_ll), ok(test_ll)
    both = ok_r & ok_t
    right = [int(np.argmax(row[:k])) == g for row, k, g in zip(test_ll, n_choices, gold, strict=True)]
    ref_right = [int(np.argmax(row[:k])) == g for row, k, g in zip(ref_ll, n_choices, gold, strict=True)]
    acc_t = np.mean([r for r, o in zip(right, ok_t, strict=True) if o])
    pairs = [(a, b) for a, b, o in zip(ref_right, right, both, strict=True) if o]
    b = sum(1 for x, y in pairs if x and not y)
    c = sum(1 for x, y in pairs if y and not x)
    kls, agree = [], []
    for i in np.flatnonzero(both):
        k = n_choices[i]
        p = np.exp(ref_ll[i, :k] - np.logaddexp.reduce(ref_ll[i, :k]))
        q = np.exp(test_ll[i, :k] - np.logaddexp.reduce(test_ll[i, :k]))
        kls.append(float(np.sum(p * np.log(p / q))))
        agree.append(np.argmax(ref_ll[i, :k]) == np.argmax(test_ll[i, :k]))
    n = len(pairs)
    return {"n": n, "nonfinite": int((~ok_t).sum()), "acc": acc_t, "delta": (c - b) / n, "b": b, "c": c,
            "flip_rate": (b + c) / n, "mcnemar": _binom_two_sided(b, b + c) if b + c else 1.0,
            "ci": _quantiles(_pmf_by_mixture(n, b, c), n), "kl": np.mean(kls), "agree": np.mean(agree)}


def test_partly_broken_dtype_against_numpy():
    rng = np.random.default_rng(4)
    q = 60
    n_choices = rng.choice([3, 4, 5], size=q)
    subjects = ["s1"] * 30 + ["s2"] * 30
    gold = np.array([i % k for i, k in enumerate(n_choices)])
    ref_ll = rng.normal(-2.0, 1.0, size=(q, 5))
    test_ll = ref_ll + rng.normal(0.0, 0.6, size=(q, 5))  # enough noise to flip answers
    for ll in (ref_ll, test_ll):
        ll[np.arange(5)[None, :] >= n_choices[:, None]] = -np.inf  # padding
    test_ll[[2, 7, 31]] = np.nan  # a broken dtype's rows
    test_ll[11, 0], test_ll[40, n_choices[40] - 1] = np.inf, -np.inf  # overflowed, not NaN
    ref_ll[50, 1] = np.nan  # the reference can lose one too
    plan = _plan(list(n_choices), subjects)
    ref, test = _answers(ref_ll, gold), _answers(test_ll, gold)
    metrics, sections, files = build(plan, {"fp32": ref, "fp16": test}, {"fp32": "reference", "fp16": "test"}, {})
    expect = _by_hand(ref_ll, test_ll, gold, n_choices)
    assert expect["n"] == q - 6 and expect["b"] + expect["c"] > 3  # the comparison is not vacuous
    m = metrics["fp16"]
    assert m["bench_nonfinite/g"] == expect["nonfinite"] == 5 and metrics["fp32"]["bench_nonfinite/g"] == 1
    assert m["acc/g"] == pytest.approx(expect["acc"], abs=1e-15)
    assert m["delta_acc/g"] == pytest.approx(expect["delta"], abs=1e-15)
    assert m["flips/g"] == pytest.approx(expect["flip_rate"], abs=1e-15)
    assert m["mcnemar_p/g"] == pytest.approx(expect["mcnemar"], rel=1e-9)
    assert (m["delta_acc_ci_low/g"], m["delta_acc_ci_high/g"]) == expect["ci"]
    assert m["choice_kl/g"] == pytest.approx(expect["kl"], rel=1e-9)
    assert m["choice_agreement/g"] == pytest.approx(expect["agree"], abs=1e-15)
    section = sections["benchmarks"]
    total = section["rows"][0]
    v = total["vs_reference"]["fp16"]
    assert (v["n"], v["excluded"], v["correct_to_wrong"], v["wrong_to_correct"]) == (q - 6, 6, expect["b"], expect["c"])
    assert total["acc"]["fp16"]["n"] == q - 5 and total["acc"]["fp16"]["nonfinite"] == 5
    by_subject = {r["subject"]: r for r in section["rows"][1:]}
    assert by_subject["s1"]["acc"]["fp16"]["nonfinite"] == 3 and by_subject["s2"]["acc"]["fp16"]["nonfinite"] == 2
    assert sum(r["vs_reference"]["fp16"]["flips"] for r in by_subject.values()) == expect["b"] + expect["c"]
    recs = _records(files)
    broken = [i for i, r in enumerate(recs) if r["answers"]["fp16"]["nonfinite"]]
    assert broken == [2, 7, 11, 31, 40]
    assert all(recs[i]["answers"]["fp16"]["choice"] is None and recs[i]["answers"]["fp16"]["correct"] is None
               for i in broken)
    assert recs[50]["answers"]["fp32"]["nonfinite"] and not recs[50]["answers"]["fp16"]["nonfinite"]
    flipped = {f["doc_id"] for f in section["flipped"]["fp16"]}
    assert len(flipped) == section["n_flipped"]["fp16"] == expect["b"] + expect["c"]
    assert not flipped & {2, 7, 11, 31, 40, 50}


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> dict[str, Path]:
    """Tiny models whose FP16 logits overflow: for some questions (x6000), for all (x40000)."""
    root = tmp_path_factory.mktemp("overflow")
    return {k: build_model(root / k, "llama", seed=0, scale_lm_head=s) for k, s in (("some", 6e3), ("all", 4e4))}


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("which", ["some", "all"])
def test_overflowing_fp16_has_no_answers(overflowing, which, tmp_path):
    from test_bench_batching import _ctx, _model, _tokenizer

    from evalsuite.bench.observer import BenchmarkObserver
    from evalsuite.bench.tasks import prepare

    cfg = _cfg(tmp_path, limit=3)
    obs = BenchmarkObserver(prepare(cfg), cfg)
    tokenizer = _tokenizer(overflowing[which])
    for name, role in (("fp32", "reference"), ("fp16", "test")):
        obs.pass_finished(_ctx(cfg, name, _model(overflowing[which], name), tokenizer, role))
    metrics, sections = obs.finish({})
    recs = _records(obs.files)
    broken = np.array([r["answers"]["fp16"]["nonfinite"] for r in recs])
    lls = [r["answers"]["fp16"]["loglik"] for r in recs]
    assert broken.tolist() == [any(x is None for x in ll) for ll in lls]  # None: a non-finite number
    m = metrics["fp16"]
    assert m["bench_nonfinite/zh_mc"] == broken.sum() and metrics["fp32"]["bench_nonfinite/zh_mc"] == 0
    assert sections["benchmarks"]["failed"] == {} and obs.failures == []
    if which == "all":
        assert broken.all()
        assert all(math.isnan(m[f"{k}/zh_mc"]) for k in ("acc", "delta_acc", "flips", "mcnemar_p", "choice_kl"))
        assert sections["benchmarks"]["n_flipped"]["fp16"] == 0
        return
    assert 0 < broken.sum() < len(recs)
    ok = ~broken
    ref = np.array([r["answers"]["fp32"]["correct"] for r in recs])
    test = np.array([bool(r["answers"]["fp16"]["correct"]) for r in recs])
    assert m["acc/zh_mc"] == pytest.approx(test[ok].mean())
    assert m["delta_acc/zh_mc"] == pytest.approx(test[ok].mean() - ref[ok].mean())
    assert m["flips/zh_mc"] == pytest.approx((ref[ok] != test[ok]).mean())
