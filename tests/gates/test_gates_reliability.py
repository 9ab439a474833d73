"""Issue 19 on the gates side: a broken dtype's benchmark metrics never pass; `gate` without --gate.

The results are built in memory (`RunResults`), as `run --gate` evaluates them, or written and read
back where the JSON form matters; every case is a hand-made dict so its expected outcome is exact.
"""

from __future__ import annotations

import math

import pytest

from evalsuite.errors import UsageError
from evalsuite.gates import ci, gatefile, rules
from evalsuite.store.results import DtypeResult, RunResults, load_results, write_results

OPS = ["<", "<=", ">", ">=", "==", "!="]


def _results(fp16: dict, fp32: dict | None = None, bf16: dict | None = None, fp16_status: str = "ok",
             sections: dict | None = None) -> RunResults:
    dtypes = {"fp32": DtypeResult("fp32", "reference", "ok", None, fp32 or {"acc/zh_mc": 0.2417})}
    dtypes["fp16"] = DtypeResult("fp16", "test", fp16_status, None, fp16)
    if bf16 is not None:
        dtypes["bf16"] = DtypeResult("bf16", "test", "ok", None, bf16)
    return RunResults({}, {}, {"source": "hand-made"}, {}, "fp32", dtypes, sections=sections or {})


def _gates(text: str, baseline: RunResults | None = None) -> gatefile.GateSet:
    return gatefile.GateSet("gates.toml", gatefile.parse(text), baseline, "base/results.json" if baseline else None)


def _outcomes(gs: gatefile.GateSet, results: RunResults) -> dict[tuple[str, str], rules.Outcome]:
    return {(o.dtype, o.gate.text): o for o in rules.evaluate(gs, results)}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_a_non_finite_value_fails_against_every_operator(op, value):
    """NaN compares false with everything and != true: no operator may turn that into a pass."""
    results = _results({"kl_mean": value})
    for bound in ("0.01", "-1e308", "1e308"):
        (o,) = rules.evaluate(_gates(f'[gates]\nkl_mean = "{op} {bound}"\n'), results)
        assert o.status == "fail" and ci.show(o.value) == "NaN", (op, bound, o)
    base = _results({"kl_mean": value})
    (o,) = rules.evaluate(_gates(f'[gates]\nkl_mean = "{op} baseline + 1"\n', base), _results({"kl_mean": 0.001}))
    assert o.status == "fail" and "baseline value is NaN/null" in o.detail


def test_a_metric_a_broken_dtype_lacks_fails_instead_of_passing_or_blaming_the_name():
    """The bench leaves `acc/<task>` out for a dtype that answered nothing: that fails the gate (the
    reference has the name, so it is no typo); a name no dtype has is still a configuration error."""
    results = _results({"bench_nonfinite/zh_mc": 240}, bf16={"acc/zh_mc": 0.25})
    out = _outcomes(_gates('[gates]\n"acc/zh_mc" = ">= 0.2"\n'), results)
    assert out[("fp16", "acc/zh_mc >= 0.2")].status == "fail" and out[("bf16", "acc/zh_mc >= 0.2")].status == "pass"
    assert "240 questions of zh_mc had non-finite log-likelihoods" in out[("fp16", "acc/zh_mc >= 0.2")].detail
    lacking = _results({"kl_mean": 0.001}, bf16={"kl_mean": 0.001, "acc/zh_mc": 0.25})
    (o, _) = rules.evaluate(_gates('[gates]\n"acc/zh_mc" = ">= 0.2"\n'), lacking)
    assert o.status == "fail" and "fp16 has no acc/zh_mc (other dtypes of the run have it)" in o.detail
    with pytest.raises(UsageError, match="no metric 'acc/zh_mcc'"):
        rules.evaluate(_gates('[gates]\n"acc/zh_mcc" = ">= 0.2"\n'), results)


def test_issue_19_broken_fp16_no_longer_passes_benchmark_gates():
    """Gemma 3 270M: every FP16 answer NaN, yet acc 0.2417 (lm-eval's first choice) equal to FP32's.
    With `bench_nonfinite/zh_mc` the gates fail; a finite value does not make such a metric pass."""
    fp16 = {"acc/zh_mc": 0.2417, "flips/zh_mc": 0.225, "delta_acc/zh_mc": 0.0, "bench_nonfinite/zh_mc": 240}
    results = _results(fp16, bf16={"acc/zh_mc": 0.2417, "flips/zh_mc": 0.05, "bench_nonfinite/zh_mc": 0})
    gs = _gates('[gates]\n"acc/zh_mc" = ">= baseline - 0.01"\n"flips/zh_mc" = "<= 0.5"\n', baseline=results)
    out = _outcomes(gs, results)
    assert [o.status for k, o in out.items() if k[0] == "fp16"] == ["fail", "fail"]
    assert [o.status for k, o in out.items() if k[0] == "bf16"] == ["pass", "pass"]
    assert not rules.passed(tuple(out.values())) and rules.exit_code(tuple(out.values())) == 1
    table = ci.format_table(gs, tuple(out.values()))
    assert "fp16: 240 questions of zh_mc had non-finite log-likelihoods and no answer" in table
    assert "gates FAILED: 2 passed, 2 failed" in table


def test_results_from_before_the_metric_read_the_benchmarks_rows(tmp_path):
    """An older results.json has no `bench_nonfinite/<task>`; its benchmarks section counted them."""
    rows = [{"task": "zh_mc", "subject": None, "n": 240,
             "acc": {"fp32": {"acc": 0.2417, "nonfinite": 0}, "fp16": {"acc": 0.2417, "nonfinite": 240}}},
            {"task": "zh_mc", "subject": "s", "n": 40, "acc": {"bf16": {"nonfinite": 40}}}]
    path = tmp_path / "results.json"
    write_results(path, _results({"acc/zh_mc": 0.2417}, bf16={"acc/zh_mc": 0.25},
                                 sections={"benchmarks": {"rows": rows}}))
    out = _outcomes(_gates('[gates]\n"acc/zh_mc" = ">= 0.2"\n'), load_results(path))
    assert out[("fp16", "acc/zh_mc >= 0.2")].status == "fail"
    assert out[("bf16", "acc/zh_mc >= 0.2")].status == "pass"  # a subject row is not the task's count


def test_paired_metrics_also_fail_when_the_reference_had_no_answer():
    fp32 = {"acc/zh_mc": 0.25, "bench_nonfinite/zh_mc": 3}
    results = _results({"acc/zh_mc": 0.3, "flips/zh_mc": 0.1, "bench_nonfinite/zh_mc": 0}, fp32=fp32)
    out = _outcomes(_gates('[gates]\n"acc/zh_mc" = ">= 0.2"\n"flips/zh_mc" = "<= 0.5"\n'), results)
    assert out[("fp16", "acc/zh_mc >= 0.2")].status == "pass"  # fp16's own accuracy is measurable
    flips = out[("fp16", "flips/zh_mc <= 0.5")]
    assert flips.status == "fail" and flips.detail.startswith("fp32: 3 questions of zh_mc")


def test_the_count_itself_is_gated_like_any_metric():
    results = _results({"acc/zh_mc": 0.3, "bench_nonfinite/zh_mc": 2}, bf16={"bench_nonfinite/zh_mc": 0})
    out = _outcomes(_gates('[gates]\n"bench_nonfinite/zh_mc" = "== 0"\n'), results)
    assert [out[(n, "bench_nonfinite/zh_mc == 0")].status for n in ("fp16", "bf16")] == ["fail", "pass"]
    assert all(not o.detail for o in out.values())


def test_gate_without_a_file_uses_the_defaults_and_says_so(capsys, tmp_path):
    gs = gatefile.load_or_default(None)
    assert gs.source == "default_gates.toml" and gs.gates == gatefile.load("default").gates
    assert capsys.readouterr().err.strip() == f"evalsuite: {gatefile.DEFAULT_NOTE}"
    own = tmp_path / "g.toml"
    own.write_text('[gates]\nkl_mean = "<= 0.5"\n', encoding="utf-8")
    assert gatefile.load_or_default(str(own)).source == "g.toml" and capsys.readouterr().err == ""
    assert "docs/gates.md" in gatefile.DEFAULT_NOTE and "no --gate given" in gatefile.DEFAULT_NOTE


def test_gate_command_without_gate_checks_the_defaults(tmp_path, capsys):
    """`evalsuite gate RESULTS` (needs cli.py's cmd_gate to call gatefile.load_or_default)."""
    from evalsuite.cli import main

    good = {"kl_mean": 2e-4, "kl_p99": 7e-4, "top1_agreement": 0.97, "ppl_ratio": 1.0002, "nonfinite_logits": 0}
    path = tmp_path / "results.json"
    write_results(path, _results(good, bf16={**good, "kl_mean": 0.02}))
    rc = main(["gate", str(path)])
    out, err = capsys.readouterr()
    assert rc == 1 and gatefile.DEFAULT_NOTE in err and "Traceback" not in err
    assert "gates FAILED: 9 passed, 1 failed, 0 skipped (default_gates.toml)" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("bf16   kl_mean")] == ["FAIL"]
