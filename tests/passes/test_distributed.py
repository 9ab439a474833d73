"""Data-parallel runs: torchrun with 2 CPU processes over gloo gives the one-process run's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from evalsuite.passes import distributed

ARGS = ["--device", "cpu", "--seq-len", "64", "--max-tokens", "700", "--batch-size", "2", "--no-progress"]
TIMINGS = {"tokens_per_s", "bench_questions_per_s"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _run(args: list[str], out, nproc: int | None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--standalone", "-m"] if nproc else [sys.executable, "-m"]
    cmd = [*launcher, "evalsuite", "run", *args, "--out", str(out), "--no-reference-cache"]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def _metrics(data: dict) -> dict:
    return {k: {m: v for m, v in d["metrics"].items() if m not in TIMINGS and not m.startswith("noise_")}
            for k, d in data["dtypes"].items()}


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    args = ["--model", str(tiny_llama), *ARGS, "--tasks", "zh_mc", "--limit", "4"]
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    p1 = _run(args, one, None)
    assert p1.returncode == 0, p1.stderr
    p2 = _run(args, two, 2)
    assert p2.returncode == 0, p2.stderr[-3000:]
    return one, two, p2


def test_two_ranks_give_the_one_process_metrics(runs):
    one, two, _ = runs
    a, b = _results(one), _results(two)
    assert b["provenance"]["data_parallel"]["world_size"] == 2
    assert sum(b["provenance"]["data_parallel"]["tokens_per_rank"]) == a["corpus"]["n_tokens"]
    ma, mb = _metrics(a), _metrics(b)
    assert ma.keys() == mb.keys()
    for dtype in ma:
        for name, va in ma[dtype].items():
            vb = mb[dtype][name]
            if name.startswith("choice_kl/"):
                # lm-eval pads each batch to its longest request, and a rank's batches hold other
                # questions: in FP16/BF16 that changes the rounding (not the answers, checked below)
                assert vb == pytest.approx(va, rel=0.5, abs=1e-9), (dtype, name)
            elif isinstance(va, float) and isinstance(vb, float):
                # only the batch layout differs: the noise floor on this CPU is exactly 0, allow rounding
                assert vb == pytest.approx(va, rel=1e-9, abs=1e-12, nan_ok=True), (dtype, name)
            else:
                assert vb == va, (dtype, name)


def test_per_token_arrays_are_gathered_in_window_order(runs):
    one, two, _ = runs
    with np.load(one / "per_token.npz") as a, np.load(two / "per_token.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_numerics_and_benchmarks_merge_every_rank(runs):
    one, two, _ = runs
    a, b = _results(one), _results(two)
    acts_a = {m["module"]: m["absmax"] for m in a["numerics"]["activations"]}
    acts_b = {m["module"]: m["absmax"] for m in b["numerics"]["activations"]}
    assert acts_b == pytest.approx(acts_a, rel=1e-6)  # maxima over the whole corpus, not rank 0's share
    acc = {k: v for k, v in _metrics(b)["bf16"].items() if k.startswith(("acc/", "flips/"))}
    assert acc and acc == {k: v for k, v in _metrics(a)["bf16"].items() if k in acc}  # all questions, merged


def test_only_rank_zero_writes_and_the_state_is_removed(runs):
    _, two, proc = runs
    assert not (two / ".state").exists()
    assert proc.stderr.count("evalsuite: results: ") == 1


def test_share_splits_every_window_once():
    for n in range(1, 12):
        for world in range(1, 5):
            spans = [distributed.share(n, distributed.Dist(r, world, r)) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(spans[i][1] == spans[i + 1][0] for i in range(world - 1))
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1


def test_launch_without_a_rendezvous_is_a_one_line_error(tiny_llama, tmp_path):
    env = _env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-m", "evalsuite", "run", "--model", str(tiny_llama), *ARGS,
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("evalsuite: error: WORLD_SIZE > 1 but MASTER_ADDR")


def test_device_map_with_several_ranks_is_refused(tiny_llama, tmp_path):
    env = _env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    proc = subprocess.run([sys.executable, "-m", "evalsuite", "run", "--model", str(tiny_llama), *ARGS,
                           "--device-map", "auto", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2
    assert "--device-map auto" in proc.stderr.strip().splitlines()[-1]
