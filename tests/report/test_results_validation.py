"""A results file is validated before `evalsuite report` or `evalsuite gate` reads it (issue 19, item 3).

Malformed, foreign and newer files give one line and exit 2 (ResultsError), never a traceback;
schema versions 1 and 2 are read, unknown keys ignored. A mutation sweep replaces each part of a
valid file with a value of another JSON type: validation refuses it, or the report and the
gates read it without an exception outside the evalsuite family.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_report import make_results  # noqa: E402
from test_report_reliability import with_benchmarks  # noqa: E402

from evalsuite.cli import main  # noqa: E402
from evalsuite.errors import EvalsuiteError, ResultsError  # noqa: E402
from evalsuite.gates import ci, gatefile, rules  # noqa: E402
from evalsuite.report.render import render_compare, render_report  # noqa: E402
from evalsuite.store.results import from_dict, load_results  # noqa: E402

LM_EVAL = {"results": {"cmmlu": {"acc,none": 0.25}}, "configs": {}, "versions": {"cmmlu": 1}, "n-shot": {}}


def _broken(mutate) -> dict:
    r = make_results()
    mutate(r)
    return r


MALFORMED = {
    "issue 19": ({"schema_version": 1, "dtypes": []}, "dtypes is a list, not an object"),
    "lm-eval's JSON": (LM_EVAL, "is not an evalsuite results file (it has no schema_version"),
    "another program's versioned JSON": ({"schema_version": 1, "items": []}, "is not an evalsuite results file"),
    "version as text": (make_results() | {"schema_version": "1"}, "which no evalsuite writes"),
    "newer version": (make_results() | {"schema_version": 3}, "written by a newer evalsuite (this one reads 1 and 2)"),
    "no reference key": (_broken(lambda r: r.pop("reference")), "no key reference"),
    "dtype entry a list": (_broken(lambda r: r["dtypes"].update(fp16=[1])), "dtypes.fp16 is a list, not an object"),
    "entry without role": (_broken(lambda r: r["dtypes"]["fp16"].pop("role")), "no key dtypes.fp16.role"),
    "unknown role": (_broken(lambda r: r["dtypes"]["bf16"].update(role="baseline")), "dtypes.bf16.role is 'baseline'"),
    "metrics a list": (_broken(lambda r: r["dtypes"]["bf16"].update(metrics=[0.1])), "dtypes.bf16.metrics is a list"),
    "nested metric": (_broken(lambda r: r["dtypes"]["bf16"]["metrics"].update(kl_mean={"v": 1})),
                      "dtypes.bf16.metrics.kl_mean is an object"),
    "model a string": (_broken(lambda r: r.update(model="gemma")), "model is a string, not an object"),
    "no dtypes at all": (_broken(lambda r: r.update(dtypes={})), "dtypes is empty"),
    "histograms a list": (_broken(lambda r: r.update(kl_histograms=[1])), "kl_histograms is a list"),
}


@pytest.fixture
def gate_file(tmp_path) -> Path:
    path = tmp_path / "gates.toml"
    path.write_text('[gates]\nkl_mean = "<= 0.01"\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_results_are_one_line_exit_2(tmp_path, capsys, gate_file, case):
    data, said = MALFORMED[case]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    for argv in (["report", str(path)], ["gate", str(path), "--gate", str(gate_file)]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evalsuite: error: ") and said in lines[0], lines
        assert str(path) in lines[0]
        if "not an evalsuite results file" in said:
            assert "re-run" not in lines[0]  # another program's file: re-running evalsuite is no answer
    assert not (tmp_path / "report.html").exists()


def test_schema_2_with_recipes_and_unknown_keys_is_read(tmp_path):
    """Version 2 (the recipe work): dtypes keyed by recipe name, a `recipe` dict per entry, new keys."""
    r = make_results() | {"schema_version": 2, "recipes": {"bf16-fp32-attn": {"storage": "bf16"}}}
    entry = copy.deepcopy(r["dtypes"]["bf16"]) | {"name": "bf16-fp32-attn", "recipe": {"storage": "bf16",
                                                                                        "compute": "fp32"},
                                                  "future_field": [1, 2]}
    r["dtypes"]["bf16-fp32-attn"] = entry
    path = tmp_path / "results.json"
    path.write_text(json.dumps(r), encoding="utf-8")
    results = load_results(path)
    assert results.schema_version == 2 and results.dtypes["bf16-fp32-attn"].metrics["kl_mean"] == 1.08e-3
    assert "bf16-fp32-attn" in render_report(results.to_dict())
    gs = gatefile.GateSet("g", (gatefile.parse_expr("kl_mean", "<= 0.01", "bf16-fp32-attn"),))
    assert [o.status for o in rules.evaluate(gs, results)] == ["pass"]


def _paths(x, path=()):
    """Every key path of a nested dict (lists: their first element)."""
    yield path
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, (*path, k))
    elif isinstance(x, list) and x:
        yield from _paths(x[0], (*path, 0))


def _set(x, path, value):
    for p in path[:-1]:
        x = x[p]
    x[path[-1]] = value


WRONG = [None, "text", [], {}, -1, 1e308, True, ["x", {"y": None}], {"k": [1, "2"]}]


def test_every_part_of_a_results_file_replaced_by_another_type_never_crashes():
    """~300 parts, each replaced by a wrong value: refused by validation, or read by the report, compare and the gates."""
    base = with_benchmarks(n_broken_flips=2)
    base["numerics"] = {"first_nonfinite": {"fp16": {"module": "m", "reference_absmax": 7e4}},
                        "near_overflow": {"fp16": [{"module": "m"}]}, "verdicts": {"fp16": {"reasons": ["r"]}},
                        "layer_error": {"bf16": [1e-3]}, "activation_headroom": {"fp16": [{"layer": 0, "max_abs": 1.0}]}}
    base["gates"] = {"passed": False, "source": "g", "counts": {"pass": 1}, "outcomes": [
        {"dtype": "bf16", "gate": "kl_mean <= 0.01", "value": 0.001, "bound": 0.01, "status": "pass"}]}
    base["benchmarks"]["timing"] = {"fp32": {"score_s": 1.0, "batch_size": 8, "batch_size_start": 16, "ranks": 1}}
    base["benchmarks"]["settings"] = {"num_fewshot": 0}
    base["benchmarks"]["failed"] = {"bf16": "x"}
    gs = gatefile.GateSet("g", (gatefile.parse_expr("kl_mean", "<= 0.01"), gatefile.parse_expr("acc/zh_mc", ">= 0.2")))
    paths = [p for p in _paths(base) if p]
    checked = refused = 0
    for i, path in enumerate(paths):
        for value in (WRONG[i % len(WRONG)],):  # every kind of value over the parts; all of them: ~4,000 cases, 40 s
            data = copy.deepcopy(base)
            _set(data, path, copy.deepcopy(value))
            try:
                results = from_dict(data)
            except ResultsError:
                refused += 1
                continue
            try:
                render_report(results.to_dict())
                render_compare(results.to_dict(), base)
                outcomes = rules.evaluate(gs, results)
                ci.format_table(gs, outcomes) + ci.junit_xml(gs, outcomes) + ci.summary_markdown(gs, outcomes, results)
            except EvalsuiteError:
                pass  # a one-line error (e.g. a gate comparing a number with text) is the right answer
            except Exception as exc:  # noqa: BLE001 - the point: anything else is a traceback for a user
                raise AssertionError(f"{'.'.join(map(str, path))} = {value!r}: {type(exc).__name__}: {exc}") from exc
            checked += 1
    assert len(paths) > 250 and checked > 200 and refused > 50, (len(paths), checked, refused)
