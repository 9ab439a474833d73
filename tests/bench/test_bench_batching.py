"""Benchmark batching: HFLM's own batches rebuilt once for every dtype, the automatic batch size,
the out-of-memory back-off, and the speed (questions/s, batch size) in results and report."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_benchmarks import _cfg, _run

from evalsuite.bench import lm as bench_lm
from evalsuite.bench.observer import BenchmarkObserver
from evalsuite.bench.tasks import prepare
from evalsuite.model.precision import DTYPES
from evalsuite.passes.scoring import PassContext
from evalsuite.report.render import render_report

pytest.importorskip("lm_eval")


def _model(path, name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[name].dtype)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _ctx(cfg, name: str, model, tokenizer, role: str = "reference") -> PassContext:
    return PassContext(precision=DTYPES[name], role=role, model=model, tokenizer=tokenizer, device=torch.device("cpu"),
                       cfg=cfg, windows=None, segment=0, segment_windows=(0, 0, 0), batch_size=1)


def _score(path, cfg, plan=None, name: str = "fp32") -> BenchmarkObserver:
    obs = BenchmarkObserver(plan or prepare(cfg), cfg)
    obs.pass_finished(_ctx(cfg, name, _model(path, name), _tokenizer(path)))
    return obs


def test_batches_are_hflms_own(tiny_llama, tmp_path):
    """A fixed batch size cuts the schedule into exactly the batches one HFLM call makes: the
    log-likelihoods are bitwise those of HFLM's own loop (with the same last-positions logits)."""
    plan = prepare(_cfg(tmp_path, limit=3, num_fewshot=1))
    lm = bench_lm.make_lm(_model(tiny_llama, "bf16"), _tokenizer(tiny_llama))
    tokens = bench_lm.tokenize(lm, plan.instances)
    sched = bench_lm.schedule(lm, tokens)
    assert sorted(k for row in sched.rows for k in row) == list(range(len(tokens)))
    assert len(sched.rows) == len(plan.questions)  # ' A' ... ' D' after one prompt: one row per question
    assert list(sched.lengths) == sorted(sched.lengths, reverse=True)
    for size in (1, 3, 7):
        ours = bench_lm.loglikelihoods(lm, sched, size, progress=False).results
        lm._model_call = bench_lm.LastPositions(lm, sched)
        lm.batch_size_per_gpu = size
        theirs = lm._loglikelihood_tokens(tokens, disable_tqdm=True)
        del lm._model_call
        assert ours == theirs, size


def test_start_batch_fits_the_memory(tiny_llama, tmp_path, monkeypatch):
    """The automatic size is the largest whose every batch fits the budget (and the CPU token cap)."""
    plan = prepare(_cfg(tmp_path, limit=5, num_fewshot=2))
    model = _model(tiny_llama, "fp32")
    lm = bench_lm.make_lm(model, _tokenizer(tiny_llama))
    sched = bench_lm.schedule(lm, bench_lm.tokenize(lm, plan.instances))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # "cuda" only selects the rule: nothing runs there

    def worst(rows, device):
        costs = bench_lm._costs(model, device)
        return max(bench_lm._batch_bytes(costs, sched, i, rows) for i in range(0, len(sched.rows), rows))

    for free in (10**6, 3 * 10**6, 10**7, 10**12):
        monkeypatch.setattr(bench_lm, "_free_bytes", lambda device, free=free: free)
        budget = bench_lm.MEMORY_SHARE * free
        size = bench_lm.start_batch(model, sched, cuda)
        assert 1 <= size <= min(bench_lm.MAX_BATCH, len(sched.rows))
        assert size == 1 or worst(size, cuda) <= budget
        assert size == min(bench_lm.MAX_BATCH, len(sched.rows)) or worst(size + 1, cuda) > budget
        cpu_size = bench_lm.start_batch(model, sched, cpu)  # FP32 counts attention scores either way
        assert cpu_size == min(size, max(1, bench_lm.CPU_TOKENS // sched.lengths[0]))
    assert bench_lm.start_batch(model, replace(sched, rows=(), lengths=()), cpu) == 1


def _oom_above(limit: int, calls: list):
    """LastPositions that runs out of memory on batches of more than `limit` rows."""
    real = bench_lm.LastPositions.__call__

    def call(self, inps, *a):
        calls.append(inps.shape[0])
        if inps.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, inps, *a)

    return call


def test_out_of_memory_halves_and_redoes_the_batch(tiny_llama, tmp_path, monkeypatch):
    """Out of memory: the batch size halves, the batch is redone, the answers are those of a run
    at the final size with no fault, and the sizes are recorded and reported."""
    cfg = _cfg(tmp_path, batch_size=None, limit=5)
    plan = prepare(cfg)
    clean = _score(tiny_llama, cfg, plan)  # automatic size, no fault
    start = clean.timing("fp32")["batch_size"]
    assert clean.timing("fp32")["batch_size_start"] == start and start > 4
    calls: list[int] = []
    with monkeypatch.context() as mp:
        mp.setattr(bench_lm.LastPositions, "__call__", _oom_above(3, calls))
        faulted = _score(tiny_llama, cfg, plan)
    assert faulted.failed == {}
    sizes = [start]
    while sizes[-1] > 3:
        sizes.append(sizes[-1] // 2)
    assert calls[: len(sizes)] == sizes  # the first batch, tried at each size until it fits
    assert set(calls[len(sizes) :]) <= set(range(1, sizes[-1] + 1))
    t = faulted.timing("fp32")
    assert (t["batch_size"], t["batch_size_start"]) == (sizes[-1], start)
    fixed = _score(tiny_llama, replace(cfg, batch_size=sizes[-1]), plan)  # the same batches, no fault
    a, b = faulted.answers["fp32"], fixed.answers["fp32"]
    assert np.array_equal(a.correct, b.correct) and np.array_equal(a.choice_ll, b.choice_ll)
    c = clean.answers["fp32"]  # other batches: equal up to rounding
    assert np.array_equal(a.correct, c.correct)
    np.testing.assert_allclose(a.choice_ll, c.choice_ll, rtol=1e-5)
    snap = faulted.snapshot(_ctx(cfg, "fp32", None, None))
    assert (snap["batch_size"], snap["batch_size_start"]) == (sizes[-1], start)
    restored = BenchmarkObserver(plan, cfg)
    restored.restore(_ctx(cfg, "fp32", None, None), snap)
    assert restored.timing("fp32")["batch_size"] == sizes[-1]


def test_out_of_memory_at_batch_size_one_fails_only_the_benchmark(tiny_llama, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, batch_size=2, limit=1)
    calls: list[int] = []
    monkeypatch.setattr(bench_lm.LastPositions, "__call__", _oom_above(0, calls))
    obs = _score(tiny_llama, cfg)
    assert calls == [2, 1] and "out of memory at benchmark batch size 1" in obs.failed["fp32"]
    assert obs.snapshot(_ctx(cfg, "fp32", None, None))["failed"] == obs.failed["fp32"]


def test_speed_in_metrics_section_and_report(tiny_llama, tmp_path, monkeypatch):
    """questions/s and the batch size per dtype; the schedule is built once for all dtypes."""
    built = []
    real = bench_lm.schedule
    monkeypatch.setattr(bench_lm, "schedule", lambda lm, tokens: built.append(1) or real(lm, tokens))
    results, obs = _run(tiny_llama, _cfg(tmp_path, batch_size=None, limit=2))  # fp32, fp16, bf16
    assert len(built) == 1
    section = results.sections["benchmarks"]
    n = section["n_questions"]
    for name in ("fp32", "fp16", "bf16"):
        t = section["timing"][name]
        assert t["score_s"] > 0 and t["ranks"] == 1 and "by_rank" not in t
        assert isinstance(t["batch_size"], int) and t["batch_size"] == t["batch_size_start"] >= 1
        assert results.dtypes[name].metrics["bench_questions_per_s"] == pytest.approx(n / t["score_s"])
        assert t["questions_per_s"] == results.dtypes[name].metrics["bench_questions_per_s"]
    html = render_report(results.to_dict())
    view = html.split('id="benchmarks"')[1]
    assert "questions/s" in view and "batch size" in view
    assert "<code>bench_questions_per_s</code>" not in html.split("every metric in results.json")[0]


def test_report_shows_a_halved_batch_size():
    from sample_results import make_results

    r = make_results()
    r["benchmarks"] = {"tasks": ["t"], "reference": "fp32", "dtypes": ["fp32"], "rows": [],
                       "timing": {"fp32": {"score_s": 2.0, "questions_per_s": 60.0, "batch_size": 8,
                                           "batch_size_start": 32, "ranks": 2},
                                  "<b>x</b>": {"score_s": None, "batch_size": None}}}
    html = render_report(r)
    assert "8 (from 32)" in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
