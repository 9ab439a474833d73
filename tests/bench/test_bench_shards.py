"""Data-parallel benchmark shards: each rank scores questions index % world == rank, rank 0 merges
the other ranks' snapshots through `restore`, and `finish` then equals a one-process run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_bench_batching import _ctx, _model, _tokenizer
from test_benchmarks import _cfg, _records
from tiny import build_model

from evalsuite.bench.observer import BenchmarkObserver
from evalsuite.bench.tasks import prepare
from evalsuite.errors import UsageError

pytest.importorskip("lm_eval")

PASSES = (("fp32", "reference"), ("fp16", "test"), ("bf16", "test"))


@pytest.fixture(scope="module")
def tiny_flat(tmp_path_factory) -> Path:
    """Nearly tied choices, so that FP16/BF16 flip answers and the flip lists are not empty."""
    return build_model(tmp_path_factory.mktemp("flat") / "llama", "llama", seed=0, scale_lm_head=0.05)


def _wire(snap):
    """A snapshot as it travels between ranks and into the resume state: through JSON."""
    return json.loads(json.dumps(snap))


def _sharded_run(path, cfg, plan, world: int, *, merge_from=None) -> list[BenchmarkObserver]:
    """Every rank of `world` runs every dtype on its share; rank 0 then restores the snapshots of
    ranks `merge_from` (default: all others) with model=None, as the data-parallel runner does."""
    ranks = [BenchmarkObserver(plan, replace(cfg, out_dir=cfg.out_dir / f"w{world}r{r}"), rank=r, world=world)
             for r in range(world)]
    tokenizer, snaps = _tokenizer(path), []
    for name, role in PASSES:
        model = _model(path, name)
        for obs in ranks:
            ctx = _ctx(obs.cfg, name, model, tokenizer, role)
            obs.pass_finished(ctx)
            snaps.append((name, role, obs.rank, _wire(obs.snapshot(ctx))))
    for name, role, rank, snap in snaps:
        if rank != 0 and (merge_from is None or rank in merge_from):
            ranks[0].restore(_ctx(ranks[0].cfg, name, None, tokenizer, role), snap)
    return ranks


def _finish(obs: BenchmarkObserver) -> tuple[dict, dict, list[dict]]:
    obs.cfg.out_dir.mkdir(parents=True, exist_ok=True)
    metrics, sections = obs.finish({})
    return metrics, sections["benchmarks"], _records(obs.files)


def _without_speed(metrics: dict) -> dict:
    return {n: {k: v for k, v in m.items() if k != "bench_questions_per_s"} for n, m in metrics.items()}


@pytest.mark.parametrize("world", [2, 3])
def test_merged_shards_equal_one_process(tiny_flat, tmp_path, world):
    """At batch size 1 every request is computed alone, so a rank's numbers are bitwise those of
    the one-process run, and finish() must give exactly its results: any difference is the merge's."""
    cfg = _cfg(tmp_path, batch_size=1, limit=5)
    plan = prepare(cfg)
    (one,) = _sharded_run(tiny_flat, cfg, plan, 1)
    ranks = _sharded_run(tiny_flat, cfg, plan, world)
    for obs in ranks:
        assert obs.failed == {} and obs.mine.tolist() == list(range(obs.rank, len(plan.questions), world))
        assert len(obs._schedule.tokens) == sum(plan.questions[i].stop - plan.questions[i].start for i in obs.mine)
    m1, s1, r1 = _finish(one)
    mw, sw, rw = _finish(ranks[0])
    assert sw["failed"] == {} and sw["dtypes"] == s1["dtypes"] == ["fp32", "fp16", "bf16"]
    assert _without_speed(mw) == _without_speed(m1)
    assert sw["rows"] == s1["rows"] and sw["flipped"] == s1["flipped"] and sw["n_flipped"] == s1["n_flipped"]
    assert sum(sw["n_flipped"].values()) > 0  # the flat model flips answers: the comparison is not vacuous
    assert rw == r1
    for name, _ in PASSES:  # wall time: the slowest rank's seconds over every question
        t = sw["timing"][name]
        by_rank = [ranks[0].runs[name][r]["seconds"] for r in range(world)]
        assert t["ranks"] == world and sorted(t["by_rank"]) == [str(r) for r in range(world)]
        assert t["score_s"] == max(by_rank) and t["questions_per_s"] == pytest.approx(len(plan.questions) / max(by_rank))
        assert mw[name]["bench_questions_per_s"] == t["questions_per_s"] and t["batch_size"] == 1


def test_merged_shards_at_the_automatic_batch_size(tiny_llama, tmp_path):
    """Other batch layouts round differently (as in any two batch sizes); the answers stay."""
    cfg = _cfg(tmp_path, batch_size=None, limit=4)
    plan = prepare(cfg)
    (one,) = _sharded_run(tiny_llama, cfg, plan, 1)
    ranks = _sharded_run(tiny_llama, cfg, plan, 2)
    assert ranks[0].failed == {} and ranks[0].answers.keys() == one.answers.keys()
    for name, _ in PASSES:
        a, b = one.answers[name], ranks[0].answers[name]
        assert np.array_equal(a.correct, b.correct) and ranks[0].scored[name].all()
        np.testing.assert_allclose(b.choice_ll, a.choice_ll, rtol=1e-5 if name == "fp32" else 2e-2)


def test_missing_or_failed_shard_fails_the_dtype(tiny_llama, tmp_path):
    cfg = _cfg(tmp_path, batch_size=4, limit=2)
    plan = prepare(cfg)
    ranks = _sharded_run(tiny_llama, cfg, plan, 3, merge_from={1})  # rank 2's shares never arrive
    metrics, section, _ = _finish(ranks[0])
    assert section["dtypes"] == [] and metrics == {}
    for name, _ in PASSES:
        assert section["failed"][name] == (f"{len(ranks[2].mine)} of {len(plan.questions)} questions have no "
                                           f"answers (no share from rank(s) 2)")
    ctx = _ctx(ranks[0].cfg, "fp16", None, None, "test")
    ranks[0].restore(ctx, {"signature": ranks[0].signature, "failed": "OutOfMemoryError: x", "rank": 2, "world": 3})
    assert ranks[0].failed["fp16"] == "rank 2: OutOfMemoryError: x"
    bad = _wire(ranks[2].snapshot(ctx)) | {"questions": [0]}
    ranks[0].restore(_ctx(ranks[0].cfg, "bf16", None, None, "test"), bad)
    assert "do not fit the plan" in ranks[0].failed["bf16"]


def test_whole_snapshot_still_replaces_for_resume(tiny_llama, tmp_path):
    """A one-process snapshot (no `questions`) restores every answer, as a resumed run needs."""
    cfg = _cfg(tmp_path, batch_size=4, limit=2)
    plan = prepare(cfg)
    (one,) = _sharded_run(tiny_llama, cfg, plan, 1)
    ctx = _ctx(cfg, "fp32", None, None)
    snap = _wire(one.snapshot(ctx))
    assert "questions" not in snap and len(snap["correct"]) == len(plan.questions)
    resumed = BenchmarkObserver(plan, replace(cfg, out_dir=tmp_path / "resumed"))
    resumed.restore(ctx, snap)
    resumed.restore(ctx, snap)  # twice: still one run's answers
    assert resumed.scored["fp32"].all() and list(resumed.runs["fp32"]) == [0]
    assert np.array_equal(resumed.answers["fp32"].choice_ll, one.answers["fp32"].choice_ll)


def test_bad_shard_arguments_and_an_empty_share(tiny_llama, tmp_path):
    cfg = _cfg(tmp_path, limit=1)
    plan = prepare(cfg)
    for rank, world in ((2, 2), (-1, 2), (0, 0), (0, 1.5)):
        with pytest.raises(UsageError, match="rank"):
            BenchmarkObserver(plan, cfg, rank=rank, world=world)
    empty = BenchmarkObserver(plan, cfg, rank=7, world=8)  # more ranks than questions: nothing to score
    assert empty.mine.tolist() == []
    ctx = _ctx(cfg, "fp32", _model(tiny_llama, "fp32"), _tokenizer(tiny_llama))
    empty.pass_finished(ctx)
    snap = _wire(empty.snapshot(ctx))
    assert empty.failed == {} and snap["questions"] == [] and snap["correct"] == []
    rank0 = BenchmarkObserver(plan, cfg, rank=0, world=8)
    rank0.restore(ctx, snap)
    assert rank0.failed == {} and not rank0.scored["fp32"].any() and list(rank0.runs["fp32"]) == [7]
