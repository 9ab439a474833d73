"""Gates end to end: gate files, hand-made and real results files, the tiny model, JUnit read back.

Most tests write a results.json by hand (so each case, NaN or a failed dtype, is exact) and call
`evalsuite.cli.main` the way CI does; one runs the tiny model through `evalsuite run --gate`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from evalsuite.cli import main
from evalsuite.errors import UsageError
from evalsuite.gates import ci, gatefile
from evalsuite.gates import rules as gates
from evalsuite.store.results import DtypeResult, RunResults, load_results, write_results

DATA = Path(__file__).parents[1] / "data"
GEMMA = DATA / "gates_gemma270m_cpu.json"  # a real run: FP16 is all NaN on Gemma 3 270M, BF16 is fine

GOOD = {"kl_mean": 2e-4, "kl_p99": 7e-4, "top1_agreement": 0.97, "ppl_ratio": 1.0002, "nonfinite_logits": 0,
        "noise_kl_mean": 0.0, "noise_top1_agreement": 1.0, "verdict": "ok", "acc/cmmlu": 0.60}


def results_file(path: Path, **tests: dict) -> Path:
    """A results.json with an fp32 reference and test dtypes `name={"status":..., "metrics":...}`."""
    dtypes = {"fp32": DtypeResult("fp32", "reference", "ok", metrics={"ppl": 10.0, "nonfinite_logits": 0})}
    for name, spec in tests.items():
        dtypes[name] = DtypeResult(name, "test", spec.get("status", "ok"), spec.get("message"), spec.get("metrics", {}))
    results = RunResults(config={}, provenance={}, model={"source": "hand-made"}, corpus={"n_tokens": 1000},
                         reference="fp32", dtypes=dtypes)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(path, results)
    return path


def toml(tmp_path: Path, text: str, name: str = "gates.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def gate_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["gate", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err: str) -> str:
    """The one error line (a run also says progress on stderr, as "evalsuite: ..." lines)."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("evalsuite: error: "), err
    return lines[0]


@pytest.fixture
def good(tmp_path) -> Path:
    return results_file(tmp_path / "run" / "results.json", fp16={"metrics": GOOD},
                        bf16={"metrics": {**GOOD, "kl_mean": 2e-3, "top1_agreement": 0.96}})


# -- parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, op, operand, baseline", [
    ("<= 0.01", "<=", 0.01, None), (">=0.98", ">=", 0.98, None), ("== 0", "==", 0, None),
    ("< 1e-3", "<", 1e-3, None), ('!= "broken"', "!=", "broken", None), ("== 'ok'", "==", "ok", None),
    ("== false", "==", False, None), (">= baseline - 0.01", ">=", 0.01, "-"), ("<= baseline*1.5", "<=", 1.5, "*"),
    ("== baseline", "==", None, ""), ("> -2", ">", -2, None),
])
def test_parse_expr(text, op, operand, baseline):
    g = gatefile.parse_expr("m", text)
    assert (g.op, g.operand, g.baseline) == (op, operand, baseline)


@pytest.mark.parametrize("text, message", [
    ("=> 0.01", "unknown operator '=>' (use <, <=, >, >=, ==, !=)"),
    ("= 0", "unknown operator '='"),
    ("0.01", "has no operator"),
    ("<= zero", "cannot read bound 'zero'"),
    ("<= nan", "cannot read bound 'nan'"),
    ('<= "broken"', "only be compared with == or !="),
    ("<=", "cannot read bound ''"),
])
def test_parse_expr_errors(text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gatefile.parse_expr("kl_mean", text)


def test_parse_tables_lines_and_lists():
    text = ('# comment\n[gates]\nkl_mean = "<= 0.01"\nppl_ratio = ["<= 1.01", ">= 0.99"]\n\n'
            '[gates.fp16]\n"acc/cmmlu" = ">= baseline - 0.01"\n')
    parsed = gatefile.parse(text, "g.toml")
    assert [(g.dtype, g.text, g.where) for g in parsed] == [
        (None, "kl_mean <= 0.01", "g.toml line 3"), (None, "ppl_ratio <= 1.01", "g.toml line 4"),
        (None, "ppl_ratio >= 0.99", "g.toml line 4"), ("fp16", "acc/cmmlu >= baseline - 0.01", "g.toml line 7")]


def test_pyproject_table(tmp_path, good, capsys):
    path = toml(tmp_path, '[project]\nname = "x"\n\n[tool.evalsuite.gates]\nkl_mean = "<= 1e-9"\n', "pyproject.toml")
    rc, out, _ = gate_cli(capsys, good, "--gate", path)
    assert rc == 1 and "kl_mean <= 1e-9" in out


@pytest.mark.parametrize("text, message", [
    ('[gates]\nkl_mean = "<= 0.01"\ntop1 = "=> 0.9"\n', "gates.toml line 3: unknown operator '=>'"),
    ("[gates]\nkl_mean = <= 0.01\n", "gates.toml: not valid TOML"),
    ("[gates]\nkl_mean = 0.01\n", "gates.toml line 2: kl_mean = 0.01 is not a bound"),
    ('[gate]\nkl_mean = "<= 0.01"\n', "gates.toml has no [gates] table"),
    ("[gates]\n", "declares no gates"),
    ('[gates.fp16.kl]\nmean = "<= 1"\n', "kl = a table is not a bound"),
])
def test_malformed_gate_file_is_one_line_exit_2(tmp_path, good, capsys, text, message):
    rc, out, err = gate_cli(capsys, good, "--gate", toml(tmp_path, text))
    assert rc == 2 and out == ""
    assert message in one_line_error(err)


def test_missing_gate_file_and_results(tmp_path, good, capsys):
    rc, _, err = gate_cli(capsys, good, "--gate", tmp_path / "nope.toml")
    assert rc == 2 and "does not exist" in one_line_error(err)
    rc, _, err = gate_cli(capsys, tmp_path / "none.json", "--gate", "default")
    assert rc == 2 and "does not exist" in one_line_error(err)


# -- evaluation ------------------------------------------------------------------------------------

def test_passing_gates_print_every_gate(tmp_path, good, capsys):
    path = toml(tmp_path, '[gates]\nkl_mean = "<= 0.01"\nnonfinite_logits = "== 0"\nverdict = \'!= "broken"\'\n'
                          '[gates.fp16]\ntop1_agreement = ">= 0.965"\n')
    rc, out, _ = gate_cli(capsys, good.parent, "--gate", path)  # a run directory stands for its results.json
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if line.startswith(("fp16 ", "bf16 "))]
    assert len(rows) == 7 and all(r[-1] == "pass" for r in rows)
    assert "gates PASSED: 7 passed, 0 failed, 0 skipped" in out


def test_failing_gate_exit_1(tmp_path, good, capsys):
    path = toml(tmp_path, '[gates]\nkl_mean = "<= 0.001"\n')
    rc, out, _ = gate_cli(capsys, good, "--gate", path)
    assert rc == 1
    assert [line.split()[-1] for line in out.splitlines() if line.startswith(("fp16", "bf16"))] == ["pass", "FAIL"]
    assert "gates FAILED: 1 passed, 1 failed" in out


def test_missing_metric_is_a_configuration_error(tmp_path, good, capsys):
    rc, out, err = gate_cli(capsys, good, "--gate", toml(tmp_path, '[gates]\nkl_maen = "<= 0.01"\n'))
    line = one_line_error(err)
    assert rc == 2 and out == ""
    assert "gates.toml line 2: kl_maen <= 0.01 on fp16" in line and "did you mean 'kl_mean'?" in line
    rc, _, err = gate_cli(capsys, good, "--gate", toml(tmp_path, '[gates.bf16]\n"flips/cmmlu" = "<= 0.03"\n'))
    assert rc == 2 and "'flips/cmmlu'" in one_line_error(err) and "on bf16" in err


@pytest.mark.parametrize("op", ["<= 0.01", ">= 0", "!= 0", "== 0"])
def test_nan_never_passes(tmp_path, capsys, op):
    path = results_file(tmp_path / "r.json", fp16={"status": "broken", "message": "FP16 gives non-finite logits",
                                                   "metrics": {**GOOD, "kl_mean": float("nan")}})
    assert json.loads(path.read_text())["dtypes"]["fp16"]["metrics"]["kl_mean"] is None  # NaN is stored as null
    rc, out, _ = gate_cli(capsys, path, "--gate", toml(tmp_path, f'[gates]\nkl_mean = "{op}"\n'))
    assert rc == 1
    row = next(line for line in out.splitlines() if line.startswith("fp16"))
    assert "NaN" in row and row.endswith("FAIL")
    assert "fp16: FP16 gives non-finite logits" in out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None])
def test_non_finite_in_memory_fails(value):
    """`run --gate` evaluates the in-memory results, where NaN/inf have not yet become null."""
    results = RunResults({}, {}, {}, {}, "fp32", {"fp16": DtypeResult("fp16", "test", "ok", None, {"ppl": value})})
    gs = gatefile.GateSet("g", gatefile.parse('[gates]\nppl = ">= 0"\n'))
    (o,) = gates.evaluate(gs, results)
    assert o.status == "fail" and ci.show(o.value) == "NaN"


def test_type_mismatch_is_a_configuration_error(tmp_path, good, capsys):
    rc, _, err = gate_cli(capsys, good, "--gate", toml(tmp_path, '[gates]\nverdict = "<= 0.5"\n'))
    assert rc == 2 and "compares verdict (a text, 'ok') with a number" in one_line_error(err)


def test_verdict_text_gate_fails_on_broken(tmp_path, capsys):
    path = results_file(tmp_path / "r.json", fp16={"metrics": {**GOOD, "verdict": "broken"}}, bf16={"metrics": GOOD})
    rc, out, _ = gate_cli(capsys, path, "--gate", toml(tmp_path, '[gates]\nverdict = \'!= "broken"\'\n'))
    assert rc == 1 and 'verdict != "broken"  "broken"' in out


def test_skipped_and_failed_dtypes(tmp_path, capsys):
    path = results_file(tmp_path / "r.json", fp16={"metrics": GOOD},
                        bf16={"status": "skipped", "message": "this GPU has no bf16"})
    gate = toml(tmp_path, '[gates]\nkl_mean = "<= 0.01"\n')
    rc, out, _ = gate_cli(capsys, path, "--gate", gate)
    assert rc == 0 and "bf16 was skipped: this GPU has no bf16" in out and "1 passed, 0 failed, 1 skipped" in out
    only_skipped = results_file(tmp_path / "s.json", bf16={"status": "skipped", "message": "no bf16"})
    rc, out, _ = gate_cli(capsys, only_skipped, "--gate", gate)
    assert rc == 1 and "nothing was checked" in out  # all-skipped verifies nothing: no green CI
    failed = results_file(tmp_path / "f.json", fp16={"metrics": GOOD}, bf16={"status": "failed", "message": "OOM"})
    rc, out, _ = gate_cli(capsys, failed, "--gate", gate)
    assert rc == 1 and "bf16 failed to run, nothing to verify: OOM" in out


def test_gate_on_absent_dtype_and_reference(tmp_path, good, capsys):
    rc, _, err = gate_cli(capsys, good, "--gate", toml(tmp_path, '[gates.int8]\nkl_mean = "<= 1"\n'))
    assert rc == 2 and "gates int8, which this run does not have (it has fp32, fp16, bf16)" in one_line_error(err)
    rc, out, _ = gate_cli(capsys, good, "--gate", toml(tmp_path, '[gates.fp32]\nnonfinite_logits = "== 0"\n'))
    assert rc == 0 and out.startswith("dtype") and "fp32   nonfinite_logits == 0" in out


def test_noise_floor_warning(tmp_path, capsys):
    path = results_file(tmp_path / "r.json", fp16={"metrics": {**GOOD, "kl_mean": 1e-7, "noise_kl_mean": 1e-6}})
    rc, out, _ = gate_cli(capsys, path, "--gate", toml(tmp_path, '[gates]\nkl_mean = "<= 5e-7"\n'))
    assert rc == 0 and "noise_kl_mean = 1.00000e-06" in out and "measures noise" in out


# -- baseline --------------------------------------------------------------------------------------

def test_baseline_bounds(tmp_path, good, capsys):
    old = results_file(tmp_path / "old" / "results.json", fp16={"metrics": {**GOOD, "acc/cmmlu": 0.605}},
                       bf16={"metrics": {**GOOD, "acc/cmmlu": 0.65}})
    gate = toml(tmp_path, '[gates]\n"acc/cmmlu" = ">= baseline - 0.01"\n[gates.fp16]\nkl_mean = "<= baseline * 1.5"\n')
    rc, out, _ = gate_cli(capsys, good, "--gate", gate, "--baseline", old)
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.startswith(("fp16", "bf16"))}
    assert rc == 1
    assert rows[("fp16", "acc/cmmlu")][-2:] == ["0.595", "pass"]  # 0.60 >= 0.605 - 0.01
    assert rows[("bf16", "acc/cmmlu")][-2:] == ["0.64", "FAIL"]  # 0.60 < 0.65 - 0.01
    assert rows[("fp16", "kl_mean")][-2:] == ["3.00000e-04", "pass"]
    rc, _, err = gate_cli(capsys, good, "--gate", gate)
    assert rc == 2 and "is relative to a baseline; pass --baseline" in one_line_error(err)


def test_baseline_missing_metric_nan_and_dtype(tmp_path, good, capsys):
    gate = toml(tmp_path, '[gates]\n"acc/cmmlu" = ">= baseline - 0.01"\n')
    no_metric = results_file(tmp_path / "a.json", fp16={"metrics": {"kl_mean": 0.1}}, bf16={"metrics": GOOD})
    rc, _, err = gate_cli(capsys, good, "--gate", gate, "--baseline", no_metric)
    assert rc == 2 and "baseline" in one_line_error(err) and "no metric 'acc/cmmlu'" in err
    nan = results_file(tmp_path / "b.json", fp16={"metrics": {"acc/cmmlu": float("nan")}}, bf16={"metrics": GOOD})
    rc, out, _ = gate_cli(capsys, good, "--gate", gate, "--baseline", nan)
    assert rc == 1 and "baseline value is NaN/null" in out
    no_dtype = results_file(tmp_path / "c.json", fp16={"metrics": GOOD})
    rc, _, err = gate_cli(capsys, good, "--gate", gate, "--baseline", no_dtype)
    assert rc == 2 and "has no bf16" in one_line_error(err)


# -- output files ----------------------------------------------------------------------------------

def test_junit_and_markdown(tmp_path, capsys):
    path = results_file(tmp_path / "r.json", fp16={"metrics": {**GOOD, "kl_mean": float("nan")}},
                        bf16={"metrics": GOOD}, int8={"status": "skipped", "message": "no <int8> & no luck"})
    gate = toml(tmp_path, '[gates]\nkl_mean = "<= 0.01"\ntop1_agreement = ">= 0.98"\n')
    junit, md = tmp_path / "out" / "gates.xml", tmp_path / "summary.md"
    junit.parent.mkdir()
    rc, _, _ = gate_cli(capsys, path, "--gate", gate, "--junit", junit, "--summary-md", md)
    assert rc == 1
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert (root.tag, suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("testsuites", "6", "3", "2")
    cases = {(c.get("classname"), c.get("name")): c for c in suite.iter("testcase")}
    assert len(cases) == 6
    nan_case = cases[("evalsuite.gates.fp16", "kl_mean <= 0.01")]
    assert "kl_mean = NaN, needs <= 0.01" in nan_case.find("failure").text
    assert cases[("evalsuite.gates.bf16", "top1_agreement >= 0.98")].find("failure") is not None
    assert cases[("evalsuite.gates.bf16", "kl_mean <= 0.01")].find("failure") is None
    assert cases[("evalsuite.gates.int8", "kl_mean <= 0.01")].find("skipped").get("message").endswith("no luck")
    text = md.read_text(encoding="utf-8")
    assert text.startswith("### ❌ evalsuite gates FAILED: 1 passed, 3 failed, 2 skipped")
    assert "| ❌ **FAIL** | fp16 | `kl_mean <= 0.01` | NaN | 0.01 |" in text
    assert "| ⏭ skipped | int8 | `kl_mean <= 0.01` | - | - |" in text


def test_output_flags_need_gate(tmp_path, capsys):
    rc = main(["run", "--model", str(tmp_path), "--out", str(tmp_path / "out"), "--junit", str(tmp_path / "j.xml")])
    assert rc == 2 and "--junit needs --gate" in one_line_error(capsys.readouterr().err)


# -- shipped defaults and a real results file --------------------------------------------------

def test_default_gates_on_real_gemma_results(capsys):
    """Gemma 3 270M measured on CPU: FP16 overflows to NaN everywhere, BF16 is within every bound."""
    rc, out, _ = gate_cli(capsys, GEMMA, "--gate", "default")
    assert rc == 1
    rows = [line.split() for line in out.splitlines() if line.startswith(("fp16", "bf16"))]
    assert {r[-1] for r in rows if r[0] == "fp16"} == {"FAIL"} and {r[-1] for r in rows if r[0] == "bf16"} == {"pass"}
    assert [r[1] for r in rows if r[0] == "bf16"] == ["nonfinite_logits", "kl_mean", "kl_p99", "top1_agreement",
                                                      "ppl_ratio"]


def test_default_gates_only_use_metrics_that_exist_today():
    parsed = gatefile.load("default").gates
    assert {g.metric for g in parsed} == {"kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "nonfinite_logits"}
    assert all(g.dtype is None and g.baseline is None for g in parsed)


def test_documented_gate_files_parse():
    """The TOML in docs/gates.md and the commented gate files in the CI example stay valid."""
    root = Path(__file__).parents[2]
    doc = (root / "docs" / "gates.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in doc.split("```toml\n")[1:]]
    example = (root / "examples" / "github-actions-evalsuite.yml").read_text(encoding="utf-8")
    files: list[str] = []
    inside = False
    for line in example.splitlines():  # blocks of "#   " lines headed by "#   .github/evalsuite-*.toml"
        if line.startswith("#   .github/evalsuite-"):
            files.append("")
            inside = True
        elif inside and line.startswith("#   "):
            files[-1] += line[4:] + "\n"
        else:
            inside = False
    assert len(blocks) == 1 and len(files) == 2
    for text in blocks + files:
        assert gatefile.parse(text)


def test_gate_command_does_not_import_torch(tmp_path, good):
    """`evalsuite gate` runs where only the base install is: no torch, numpy or transformers."""
    gate = toml(tmp_path, '[gates]\nkl_mean = "<= 0.01"\n')
    code = (f"import sys; from evalsuite.cli import main; rc = main(['gate', {str(good)!r}, '--gate', {str(gate)!r}]);"
            "bad = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]; "
            "assert not bad, f'imported {bad}'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- the whole path on the tiny model ------------------------------------------------------------

RUN = ["--device", "cpu", "--seq-len", "64", "--max-tokens", "512", "--noise-tokens", "256", "--no-progress"]


def test_run_with_gates_on_tiny_model(tiny_llama, tmp_path, capsys):
    gate = toml(tmp_path, '[gates]\nnonfinite_logits = "== 0"\nkl_mean = "<= 0.01"\n'
                          '[gates.fp16]\ntop1_agreement = ">= 0.9"\n')
    out_dir, junit, md = tmp_path / "run", tmp_path / "j.xml", tmp_path / "s.md"
    rc = main(["run", "--model", str(tiny_llama), "--out", str(out_dir), *RUN, "--gate", str(gate),
               "--junit", str(junit), "--summary-md", str(md)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "gates PASSED: 5 passed, 0 failed, 0 skipped" in out
    section = load_results(out_dir / "results.json").sections["gates"]
    assert section["passed"] is True and section["counts"] == {"pass": 5, "fail": 0, "skipped": 0}
    assert {(o["dtype"], o["gate"]) for o in section["outcomes"]} >= {("fp16", "top1_agreement >= 0.9")}
    assert len(ET.parse(junit).getroot().find("testsuite").findall("testcase")) == 5
    assert md.read_text(encoding="utf-8").startswith("### ✅")

    # the same results, gated again without the model: a failing bound, and a baseline bound on itself
    strict = toml(tmp_path, '[gates.bf16]\nkl_mean = "<= 1e-12"\nppl = "<= baseline"\n', "strict.toml")
    rc, out, _ = gate_cli(capsys, out_dir, "--gate", strict, "--baseline", out_dir / "results.json")
    assert rc == 1 and "bf16   kl_mean <= 1e-12" in out and "FAIL" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("bf16")] == ["FAIL", "pass"]

    # NaN in a results file read back (as `run` writes it: null) fails the gate
    data = json.loads((out_dir / "results.json").read_text())
    data["dtypes"]["fp16"]["metrics"]["kl_mean"] = None
    (tmp_path / "nan.json").write_text(json.dumps(data))
    rc, out, _ = gate_cli(capsys, tmp_path / "nan.json", "--gate", gate)
    row = next(line for line in out.splitlines() if line.startswith("fp16   kl_mean"))
    assert rc == 1 and row.split()[-3:] == ["NaN", "0.01", "FAIL"]


def test_run_rejects_a_bad_gate_file_before_loading_the_model(tiny_llama, tmp_path, capsys):
    out_dir = tmp_path / "run"
    for text, message in [('[gates]\nkl_mean = "=> 0.01"\n', "gates.toml line 2: unknown operator '=>'"),
                          ('[gates.bf16]\nkl_mean = "<= 1"\n', "gates bf16, which this run does not have")]:
        rc = main(["run", "--model", str(tiny_llama), "--out", str(out_dir), "--dtypes", "fp16", *RUN,
                   "--gate", str(toml(tmp_path, text))])
        assert rc == 2 and message in one_line_error(capsys.readouterr().err)
    assert not out_dir.exists()  # checked before the output directory, let alone a model


def test_run_missing_metric_exit_2_after_results(tiny_llama, tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc = main(["run", "--model", str(tiny_llama), "--out", str(out_dir), "--dtypes", "bf16", *RUN,
               "--gate", str(toml(tmp_path, '[gates]\n"acc/cmmlu" = ">= 0.5"\n'))])
    assert rc == 2 and "no metric 'acc/cmmlu'" in one_line_error(capsys.readouterr().err)
    assert "gates" not in json.loads((out_dir / "results.json").read_text())  # the run's results are kept
