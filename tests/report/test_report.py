"""The HTML report: escaping, sections present only with their data, compare mode, the CLI.

Tested from hand-made results dicts (the schema of `evalsuite/store/results.py`), so no model runs.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

from sample_results import HOSTILE, make_results  # noqa: E402,F401
from sample_results import hist as one_hist  # noqa: E402

from evalsuite.cli import main  # noqa: E402
from evalsuite.report import charts  # noqa: E402
from evalsuite.report.render import render_compare, render_report  # noqa: E402


def _text(html: str) -> str:
    """The visible text roughly as a browser shows it: tags removed, entities left escaped."""
    return re.sub(r"<[^>]+>", "", re.sub(r"<style>.*?</style>", "", html, flags=re.S))


def test_hostile_strings_render_as_text():
    html = render_report(make_results(HOSTILE))
    assert "<script" not in html.lower()
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5  # model, corpus, device, context, token, message


def test_self_contained_no_external_references():
    html = render_report(make_results()) + render_compare(make_results(), make_results())
    refs = re.findall(r"""(?:src|href|url)\s*[=(]\s*["']?([^"')\s>]+)""", html)
    assert all(r.startswith(("#", "data:")) for r in refs), refs
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert "default-src 'none'" in html  # the CSP forbids fetching anything


def test_chart_labels_are_escaped():
    hist = {f"bf16{HOSTILE}": one_hist(1e-5)}
    svg = str(charts.kl_tail_chart(hist)) + str(charts.kl_density_chart(hist))
    assert "<script" not in svg and "&lt;script&gt;" in svg
    assert svg.count("<svg") == 2


@pytest.mark.parametrize("ys", [[0.0, 1e-3, 2.0], [1e-320, 1e308], [5.0, 5.0], [float("nan"), -1.0, 3.0, None]])
def test_chart_axes_enclose_data_and_drop_unplottable(ys):
    pts = [(i, y) for i, y in enumerate(ys)]
    svg = str(charts.line_chart([{"name": "s", "points": pts}], title="t", x_label="x", y_label="y", y_log=True))
    coords = [tuple(map(float, p.split(","))) for p in re.findall(r'points="([^"]+)"', svg)[0].split()] \
        if "<polyline" in svg else re.findall(r'cx="([\d.]+)" cy="([\d.]+)"', svg)
    assert coords and all(0 <= float(x) <= 560 and 0 <= float(y) <= 300 for x, y in coords)
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    for lo, hi in ((0, 17), (-3, 2.5), (0.1, 0.1)):
        ticks = [v for v, _ in charts.linear_ticks(lo, hi)]
        assert ticks[0] <= lo and ticks[-1] >= hi
    ticks = [v for v, _ in charts.log_ticks(1e-30, 1e5)]
    assert ticks[0] <= 1e-30 and ticks[-1] >= 1e5 and len(ticks) <= 8


def test_report_sections_and_numbers():
    html = render_report(make_results())
    for anchor in ("verdict", "provenance", "perplexity", "divergence", "kl", "worst", "metrics"):
        assert f'id="{anchor}"' in html
    assert "broken" in html and "non-finite" in html
    assert "0.00108 ± 3.6e-05" in _text(html)  # KL mean ± its standard error
    assert "96.58 %" in html  # top-1 agreement as a percentage
    assert "future_metric_xyz" in html and "0.125" in html  # unknown metrics still shown
    assert html.count("<svg") == 2 and "nats, log scale" in html
    assert "noise floor" in html


def test_compiled_test_passes_are_said_in_the_header():
    assert "ran compiled" not in _text(render_report(make_results()))
    r = make_results()
    r["provenance"]["compiled"] = {"backend": "inductor", "dtypes": {"bf16": {"modules": 9}, HOSTILE: {}}}
    text = _text(render_report(r))
    assert "The test models of" in text and "bf16\n    ran compiled" in text and "&lt;script&gt;" in text
    assert HOSTILE not in render_report(r)  # escaped like every other string


def test_absent_sections_are_absent():
    r = make_results()
    for key in ("kl_histograms", "worst_tokens", "noise_floor", "noise_floor_detail"):
        r.pop(key)
    r["dtypes"] = {"fp32": r["dtypes"]["fp32"]}
    html = render_report(r)
    for anchor in ("divergence", "kl", "worst", "gates", "layers", "headroom", "other"):
        assert f'id="{anchor}"' not in html and f'href="#{anchor}"' not in html
    assert "<svg" not in html
    assert "no noise floor was measured" in html


def test_gates_numerics_and_unknown_sections_render_when_present():
    r = make_results()
    r["gates"] = [{"dtype": "bf16", "metric": "kl_mean", "op": "<=", "bound": 0.01, "value": 0.00108, "passed": True},
                  {"dtype": "fp16", "metric": "kl_mean", "op": "<=", "bound": 0.01, "value": None, "passed": False},
                  {"metric": f"odd{HOSTILE}"}]  # missing fields are tolerated
    r["numerics"] = {"activation_headroom": {"fp16": [{"layer": i, "max_abs": 10.0 ** i} for i in range(6)]},
                     "layer_error": {"bf16": [1e-3, 2e-3, 4e-3]}}
    r["benchmarks"] = {"note": HOSTILE}
    html = render_report(r)
    assert 'id="gates"' in html and "not measurable" in html and ">fail<" in html and ">pass<" in html
    assert 'id="headroom"' in html and "FP16 max 65504" in html and 'id="layers"' in html
    assert 'id="other"' in html and "benchmarks" in html
    assert "<script" not in html.lower()


def test_verdict_prefers_metrics_verdict():
    r = make_results()
    r["dtypes"]["bf16"]["metrics"] |= {"verdict": "degraded", "verdict_reasons": ["KL p99 above 0.01"]}
    html = render_report(r)
    assert "degraded" in html and "KL p99 above 0.01" in html and "v-warn" in html


def test_compare_side_by_side():
    a, b = make_results(), make_results(HOSTILE)
    b["dtypes"]["bf16"]["metrics"]["kl_mean"] = 2.16e-3
    b["corpus"]["sha256"] = "cd" * 32
    html = render_compare(a, b, files=("a/results.json", f"b{HOSTILE}.json"))
    assert "<script" not in html.lower()
    assert "+0.00108 (×2)" in _text(html)  # B − A and the ratio B/A
    assert "different text" in html  # corpus hashes differ
    assert 'id="diffs"' in html and "model.source" in html
    assert "stroke-dasharray" in html  # B dashed in the KL tail chart


def _write(path: Path, results: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
    return path


def test_cli_report_writes_beside_results(tmp_path, capsys):
    res = _write(tmp_path / "run" / "results.json", make_results())
    assert main(["report", str(res)]) == 0
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and "org/model" in html


def test_cli_report_output_and_compare(tmp_path):
    a = _write(tmp_path / "a.json", make_results())
    b = _write(tmp_path / "b.json", make_results())
    out = tmp_path / "out" / "one.html"
    assert main(["report", str(a), "-o", str(out)]) == 0 and out.is_file()
    assert main(["report", str(a), str(b), "-o", str(tmp_path / "cmp.html")]) == 0
    assert main(["report", str(a), "--compare", str(b), "-o", str(tmp_path / "cmp2.html")]) == 0
    for name in ("cmp.html", "cmp2.html"):
        assert "Comparison" in (tmp_path / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"schema_version": 99}), "[1, 2]"])
def test_cli_report_bad_results_is_exit_2(tmp_path, capsys, content):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evalsuite: error:") and "\n" not in err
    assert not (tmp_path / "report.html").exists()


def test_cli_report_usage_errors(tmp_path, capsys):
    a = _write(tmp_path / "a.json", make_results())
    assert main(["report", str(a), str(a), str(a)]) == 2
    assert main(["report", str(a), str(a), "--compare", str(a)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_report_tolerates_sparse_results():
    r = copy.deepcopy(make_results())
    r["dtypes"]["bf16"]["metrics"] = {}
    r["dtypes"]["bf16"]["timing"] = {}
    r["dtypes"]["fp16"] = {"name": "fp16", "role": "test", "status": "skipped", "message": "no FP16 here",
                           "metrics": {}, "timing": {}}
    r["kl_histograms"] = {"bf16": {"edges": [], "counts": [], "n_zero": 5}}
    r["worst_tokens"] = {"bf16": []}
    html = render_report(r)
    assert "skipped" in html and "no FP16 here" in html and 'id="kl"' not in html


def test_run_writes_report_beside_results(tiny_llama, tmp_path):
    """`evalsuite run` writes report.html next to results.json, from the same results."""
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_llama), "--device", "cpu", "--out", str(out), "--seq-len", "64",
            "--max-tokens", "256", "--noise-tokens", "128", "--no-progress"]
    assert main(argv) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert str(tiny_llama) in html and results["created_utc"] in html
    assert html == render_report(results)


def test_report_never_imports_torch(tmp_path):
    """`evalsuite report` must run where torch is absent: rendering imports neither torch nor transformers."""
    import subprocess

    res = _write(tmp_path / "results.json", make_results() | {"model": {"source": "x", "is_demo": True}})
    code = ("import sys; from evalsuite.cli import main; rc = main(['report', sys.argv[1]]); "
            "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "assert rc == 0 and not bad, (rc, bad)")
    subprocess.run([sys.executable, "-c", code, str(res)], check=True, timeout=120)
