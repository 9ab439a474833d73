"""Issue 19 on the report side: unanswerable flips collapsed, control bytes shown, CJK fonts, the
terminal table's non-finite column, and the report's imports (issue 14).

Hand-made results dicts (the schema of docs/results-schema.md), so no model runs.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from sample_results import make_results  # noqa: E402

from evalsuite.report.render import render_report  # noqa: E402
from evalsuite.report.table import format_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what may never reach report.html raw


def _flip(i: int, test_ll: list) -> dict:
    return {"task": "zh_mc", "subject": "zh_mc", "doc_id": i, "question": f"问题{i}", "choices": ["A", "B", "C", "D"],
            "gold": 1, "direction": "correct→wrong", "reference_choice": 1, "test_choice": 0,
            "reference_loglik": [-2.0, -0.5, -3.0, -4.0], "test_loglik": test_ll}


def with_benchmarks(n_broken_flips: int = 200, n_fine_flips: int = 2, nonfinite_metric: int | None = 240) -> dict:
    """FP16 unanswerable on every question of zh_mc (its log-likelihoods null), BF16 fine."""
    r = make_results()
    acc = {n: {"acc": 0.25, "acc_se": 0.028, "tied_top": 0, "nonfinite": 0} for n in ("fp32", "fp16", "bf16")}
    vs = {n: {"delta_acc": None, "delta_acc_ci": [None, None], "flips": None, "flip_rate": None, "mcnemar_p": None}
          for n in ("fp16", "bf16")}
    broken = [_flip(i, [None, None, None, None]) for i in range(n_broken_flips)]
    fine = [_flip(1000 + i, [-0.1, -2.0, -3.0, -4.0]) for i in range(n_fine_flips)]
    r["benchmarks"] = {"tasks": ["zh_mc"], "reference": "fp32", "dtypes": ["fp32", "fp16", "bf16"],
                       "records_file": "benchmarks.jsonl",
                       "rows": [{"task": "zh_mc", "subject": None, "n": 240, "acc": acc, "vs_reference": vs}],
                       "flipped": {"fp16": broken + fine[:1], "bf16": fine},
                       "n_flipped": {"fp16": n_broken_flips + 1, "bf16": n_fine_flips}}
    if nonfinite_metric is not None:
        r["dtypes"]["fp16"]["metrics"]["bench_nonfinite/zh_mc"] = nonfinite_metric
    return r


def wide_results() -> dict:
    """The widest tables a run makes: numerics with long module names, benchmarks with a long subject."""
    r = with_benchmarks(n_broken_flips=20)
    for n in ("fp16", "bf16"):
        r["dtypes"][n]["metrics"] |= {"min_headroom_bits": -0.5, "modules_near_overflow": 3, "weights_overflow": 0,
                                      "first_nonfinite_module": "model.layers.5.mlp.down_proj", "weights_rel_err_max": 3.9e-3,
                                      "weights_underflow_frac": 1.2e-5, "layer_max_error_growth": 17}
    r["numerics"] = {"first_nonfinite": {"fp16": {"module": "model.layers.5.mlp.down_proj", "reference_absmax": 70123.4}},
                     "near_overflow": {"fp16": [{"module": "model.language_model.layers.17.self_attn.o_proj"}]}}
    b = r["benchmarks"]
    vs = {"delta_acc": -0.0125, "delta_acc_ci": [-0.0312, 0.0062], "flips": 54, "correct_to_wrong": 27,
          "wrong_to_correct": 27, "flip_rate": 0.225, "mcnemar_p": 0.0123, "choice_kl": 0.0123, "choice_agreement": 0.99}
    b["rows"][0]["vs_reference"] = {"fp16": vs, "bf16": vs}
    b["rows"].append({**b["rows"][0], "subject": "cmmlu_local_college_engineering_hydrology", "n": 40})
    return r


def _flip_rows(html: str, dtype: str) -> int:
    view = html.split(f"Flipped questions: {dtype}</h3>")[1].split("<h3>")[0]
    return len(re.findall(r'<td class="text">zh_mc #', view))


def test_unanswerable_flips_collapse_into_one_line():
    html = render_report(with_benchmarks())
    assert _flip_rows(html, "fp16") == 1  # only the one flip with finite log-likelihoods is listed
    assert _flip_rows(html, "bf16") == 2
    assert re.search(r"200 flips between fp32 and fp16\s+are\s+on questions whose log-likelihoods are not finite", html)
    assert "fp16: 240 of 240 questions of zh_mc had non-finite log-likelihoods" in html
    assert html.count("questions of zh_mc had non-finite log-likelihoods") == 1  # bf16 answered every one
    assert "bench_nonfinite/zh_mc</code>" not in html.split("every metric in results.json")[0].split('id="metrics"')[1]


def test_unanswerable_count_from_rows_of_older_results():
    """Results written before `bench_nonfinite/<task>`: the task row's `nonfinite` count says it."""
    r = with_benchmarks(n_broken_flips=3, nonfinite_metric=None)
    r["benchmarks"]["rows"][0]["acc"]["fp16"]["nonfinite"] = 240
    html = render_report(r)
    assert "fp16: 240 of 240 questions of zh_mc had non-finite log-likelihoods" in html
    assert _flip_rows(html, "fp16") == 1 and "3 flips between fp32 and fp16" in html


def test_a_broken_dtype_without_listed_flips_says_no_change_only_when_true():
    r = with_benchmarks(n_broken_flips=5, n_fine_flips=0)
    html = render_report(r)
    fp16 = html.split("Flipped questions: fp16</h3>")[1].split("<h3>")[0]
    assert "No question changed correctness" not in fp16 and "5 flips" in fp16
    assert "No question changed correctness" in html.split("Flipped questions: bf16</h3>")[1]


def test_control_characters_are_shown_never_written_raw():
    r = make_results()
    r["worst_tokens"]["bf16"][0] |= {"target": "\x00", "test_top": "a\x1ab", "context": "ctx\x1b[31m\x7f\x85 and\ttab\n"}
    r["dtypes"]["bf16"]["message"] = "bell\x07"
    html = render_report(r)
    assert not RAW_CONTROL.search(html), RAW_CONTROL.findall(html)
    assert "<mark>␀</mark>" in html and "a␚b" in html and "ctx␛[31m␡\\x85 and\ttab" in html and "bell␇" in html


def test_font_stack_names_cjk_families_before_the_generic_one():
    css = (ROOT / "evalsuite" / "report" / "templates" / "style.css").read_text(encoding="utf-8")
    cjk = ['"Noto Sans CJK SC"', '"PingFang SC"', '"Microsoft YaHei"', '"Source Han Sans SC"']
    body = re.search(r"body\s*{[^}]*font:\s*[^;]*?,\s*([^;]+);", re.sub(r"/\*.*?\*/", "", css, flags=re.S)).group(1)
    families = [f.strip() for f in body.split(",")]
    assert families[-5:] == [*cjk, "sans-serif"], families
    code = re.search(r"code\s*{\s*font-family:([^;]+);", css).group(1)
    assert [f.strip() for f in code.split(",")][-5:] == [*cjk, "monospace"]


def test_wide_tables_wrap_headers_and_scroll_inside_their_box():
    """What keeps ten numeric columns inside 1280 px (the browser test measures it): headers wrap,
    and a table still too wide scrolls inside its `.scroll` box, never the page."""
    css = (ROOT / "evalsuite" / "report" / "templates" / "style.css").read_text(encoding="utf-8").split("@media")[0]
    assert re.search(r"thead th\s*{[^}]*white-space:\s*normal", css)  # at every width, not only a phone's
    assert re.search(r"\.scroll\s*{[^}]*overflow-x:\s*auto", css)
    html = render_report(with_benchmarks())
    for section in ("divergence", "benchmarks"):
        body = html.split(f'<section id="{section}">')[1].split("</section>")[0]
        assert body.count("<table") == body.count('<div class="scroll"><table'), section


def test_terminal_table_counts_non_finite_tokens_like_the_report():
    table = format_table(make_results())
    header, _, *rows = table.splitlines()
    assert "non-finite tok" in header
    fp16 = next(r for r in rows if r.startswith("fp16"))
    column = header.index("non-finite tok")
    assert fp16[column:].split()[0] == "1,024"  # nonfinite_tokens, not the 268,435,456 logits
    assert "268,435,456" not in table


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_report_and_gates_import_graph_points_one_way():
    """report/ and gates/ import only the base layer (fmt, errors, log, store.results), never a cycle."""
    files = sorted((ROOT / "evalsuite" / "report").glob("*.py")) + sorted((ROOT / "evalsuite" / "gates").glob("*.py"))
    allowed = ("evalsuite.report", "evalsuite.gates", "evalsuite.fmt", "evalsuite.errors", "evalsuite.log",
               "evalsuite.store.results", "evalsuite.__version__")
    graph = {}
    for f in files:
        name = f"evalsuite.{f.parent.name}.{f.stem}"
        mods = {m for m in _imports(f) if m.startswith("evalsuite")}
        bad = [m for m in mods if m != "evalsuite" and not m.startswith(allowed)]
        assert not bad, f"{name} imports {bad}"
        graph[name] = {m for m in mods if m in {f"evalsuite.{g.parent.name}.{g.stem}" for g in files}}
    assert "evalsuite.gates.ci" not in graph["evalsuite.gates.rules"]  # ci reads rules, never the reverse
    done: set[str] = set()

    def visit(n: str, path: tuple[str, ...]) -> None:
        assert n not in path, f"import cycle: {' -> '.join((*path, n))}"
        if n not in done:
            for m in graph.get(n, ()):
                visit(m, (*path, n))
            done.add(n)

    for n in graph:
        visit(n, ())


def test_reading_results_pulls_no_framework_and_no_upper_layer(tmp_path):
    """Rendering a demo run's report and gating it load no numpy/torch/transformers, nor the model,
    passes, metrics, numerics, bench or config modules (the report's title reads results.json)."""
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); from sample_results import make_results\n"
        "from evalsuite.report.render import render_report\n"
        "from evalsuite.gates import ci, gatefile, rules\n"
        "from evalsuite.store.results import from_dict\n"
        "r = make_results() | {'model': {'source': '/c/evalsuite/gemma-3-270m-fp32', 'is_demo': True}}\n"
        "html = render_report(r); assert 'gemma-3-270m-fp32, the embedded default model' in html\n"
        "gs = gatefile.load('default'); ci.format_table(gs, rules.evaluate(gs, from_dict(r)))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('numpy', 'torch', 'transformers') or "
        "m.startswith(('evalsuite.passes', 'evalsuite.model', 'evalsuite.metrics', 'evalsuite.numerics', "
        "'evalsuite.bench', 'evalsuite.config'))]\n"
        "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[1])], check=True, timeout=120)
