"""evalsuite/phases.py: every second of a run in exactly one phase, so the phases sum to the wall."""

from __future__ import annotations

import json

import numpy as np
from helpers import run_config

from evalsuite import phases
from evalsuite.cli import main
from evalsuite.config import DEMO_CPU_TOKENS, for_device
from evalsuite.store.windows import cut, scored_counts


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_nested_phases_are_exclusive_and_sum_to_the_wall(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(phases.time, "perf_counter", clock)
    p = phases.Phases(start=90.0)  # 10 s of startup before the clock object existed
    p.enter("setup")
    clock.now += 2
    with phases.active(p):
        with phases.phase("repair"):
            clock.now += 1
            with phases.phase("load"):
                clock.now += 4
                with phases.phase("numerics"):
                    clock.now += 0.5
            clock.now += 3
        with phases.phase("load"):
            clock.now += 5
    clock.now += 0.25
    out = p.report()
    assert out == {"startup_s": 10.0, "setup_s": 2.25, "repair_s": 4.0, "repair/load_s": 4.0,
                   "repair/numerics_s": 0.5, "load_s": 5.0, "wall_s": 25.75}
    assert sum(v for k, v in out.items() if k != "wall_s") == out["wall_s"]


def test_phase_without_an_active_clock_just_runs():
    ran = []
    with phases.phase("load"):
        ran.append(1)
    assert ran == [1]


def test_process_started_is_in_the_past():
    import time

    assert phases.process_started() <= time.perf_counter()


def test_a_run_accounts_for_its_wall_time(tiny_llama, tmp_path):
    out = tmp_path / "o"
    rc = main(["run", "--model", str(tiny_llama), "--out", str(out), "--max-tokens", "256", "--seq-len", "64",
               "--tasks", "none", "--no-progress", "--dtypes", "fp16"])
    assert rc == 0
    ph = json.loads((out / "results.json").read_text())["provenance"]["run_timing"]["phases"]
    for name in ("setup_s", "tokenizer_s", "tokenize_s", "load_s", "reference_pass_s", "test_pass_s",
                 "noise_floor_s", "numerics_s", "write_s", "report_s"):
        assert name in ph, name
    total = sum(v for k, v in ph.items() if k != "wall_s")
    assert abs(total - ph["wall_s"]) <= 0.02 * ph["wall_s"]  # rounding only: by construction


def test_cut_scores_the_budget_and_keeps_the_first_bad_token():
    windows = [np.arange(65), np.arange(65), np.arange(33)]  # 64 + 64 + 32 targets
    assert scored_counts(cut(windows, 100)).tolist() == [64, 36]
    assert [w.tolist() for w in cut(windows, 100)][1] == list(range(37))  # a prefix of the window
    assert scored_counts(cut(windows, 10, keep=70)).tolist() == [64, 6]
    assert scored_counts(cut(windows, 1000)).tolist() == [64, 64, 32]


def test_device_defaults_fill_only_what_the_user_left_open(tmp_path):
    import torch

    cfg = run_config(tmp_path)
    cpu, notes = for_device(cfg, torch.device("cpu"))
    assert (cpu.noise_tokens, cpu.repair_tokens) == (512, 512)
    gpu, _ = for_device(cfg, torch.device("cuda"))
    assert (gpu.noise_tokens, gpu.repair_tokens) == (32768, 2048)
    mine, _ = for_device(run_config(tmp_path, noise_tokens=7, repair_tokens=9), torch.device("cpu"))
    assert (mine.noise_tokens, mine.repair_tokens) == (7, 9)
    demo, notes = for_device(run_config(tmp_path, model=None, max_tokens=None), torch.device("cpu"))
    assert demo.max_tokens == DEMO_CPU_TOKENS and notes and "--max-tokens" in notes[0]


def test_current_name_is_the_innermost_running_phase():
    from evalsuite.phases import Phases, active, current_name, phase

    assert current_name() is None
    with active(Phases(first="startup")):
        assert current_name() == "startup"
        with phase("repair"):
            with phase("load"):
                assert current_name() == "repair/load"
            assert current_name() == "repair"
    assert current_name() is None
