"""The sections of one run's report: the results dict turned into the rows and chart strings of
each box of report.html, and `context`, which gathers them for the templates.

Apart from `render.py`, the page frame (which template, the comparison of two runs, reading
results.json and writing the page), so that a new section is a function here and one line in
`context`. Every section is built only when its key is present, so a run without benchmarks has
no benchmark box, and fields a later version adds still show up in the "all metrics" table and
the "other sections" dump.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evalsuite.fmt import fmt, pct, pm
from evalsuite.report import bench as bench_report
from evalsuite.report import charts
from evalsuite.report import generation as gen_report
from evalsuite.report import recipes as recipes_report
from evalsuite.report.bench import obj

# Top-level keys that have their own section; any other key is shown raw under "other sections".
KNOWN_KEYS = {"config", "provenance", "model", "corpus", "reference", "dtypes", "noise_floor", "noise_floor_detail",
              "kl_histograms", "worst_tokens", "created_utc", "evalsuite_version", "schema_version", "gates", "numerics",
              "recipe_attribution", "repair"}  # the last two: report/recipes.py
VERDICT_CLASS = {"ok": "ok", "degraded": "warn", "broken": "bad", "failed": "bad", "skipped": "skip"}
FP16_MAX = 65504.0
RAW_LIMIT = 20_000  # characters of an unknown section shown raw before it is cut
# Metrics the sections above already show; any other name is listed under "more metrics".
SHOWN_METRICS = {"ppl", "ppl_se", "mean_nll", "bits_per_byte", "n_tokens", "n_scored_tokens", "ppl_ratio",
                 "ppl_ratio_se", "delta_ppl", "delta_ppl_se", "delta_nll", "delta_nll_se", "kl_mean", "kl_mean_se",
                 "kl_median", "kl_p90", "kl_p99", "kl_p999", "kl_max", "top1_agreement", "delta_p_mean",
                 "delta_p_rms", "max_abs_dlogit", "nonfinite_logits", "nonfinite_tokens", "finite_only",
                 "tokens_per_s", "verdict", "verdict_reason", "verdict_reasons", "weights_overflow",
                 "weights_underflow_frac", "weights_rel_err_max", "min_headroom_bits", "modules_near_overflow",
                 "first_nonfinite_module", "layer_max_error_growth"}


def flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as ('a.b', value) rows; lists and scalars shown as compact text."""
    if not isinstance(d, dict):
        return [(prefix or "value", _text(d))]
    rows: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        rows += flatten(v, key) if isinstance(v, dict) and v else [(key, _text(v))]
    return rows


def _without_phases(prov: dict) -> dict:
    """Provenance without run_timing.phases: they are completed after the report is written (the
    report's own time is one of them), so the page shows the run's step timings only."""
    timing = prov.get("run_timing")
    if not isinstance(timing, dict) or "phases" not in timing:
        return prov
    return {**prov, "run_timing": {k: v for k, v in timing.items() if k != "phases"}}


def _nested(d: dict) -> tuple[list[tuple[str, str]], list[dict]]:
    """Scalar rows, plus one table per group of nested dicts with the same keys (e.g. reference
    and test numeric flags side by side)."""
    groups: dict[tuple, list[str]] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            groups.setdefault(tuple(v), []).append(str(k))
    scalars = [(str(k), _text(v)) for k, v in d.items() if not (isinstance(v, dict) and v)]
    tables = [{"columns": names, "rows": [(str(key), [_text(d[n].get(key)) for n in names]) for key in keys]}
              for keys, names in groups.items()]
    return scalars, tables


def _text(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int | float | bool) or v is None:
        return fmt(v, 6)
    return json.dumps(v, ensure_ascii=False)


def verdict(d: dict, reasons=None) -> dict:
    """The verdict shown for one dtype: `metrics.verdict` when a run has it, else `status`.

    `reasons` (from `numerics.verdicts.<dtype>.reasons`) go with `metrics.verdict`; else the message."""
    m = d.get("metrics") or {}
    word = m.get("verdict") if isinstance(m.get("verdict"), str) else d.get("status") or "unknown"
    reasons = reasons or m.get("verdict_reasons", m.get("verdict_reason")) or d.get("message") or ""
    if isinstance(reasons, list | tuple):
        reasons = "; ".join(str(r) for r in reasons)
    return {"word": word, "cls": VERDICT_CLASS.get(word, "unknown"), "reasons": str(reasons)}


def _headline(d: dict, noise: dict) -> list[tuple[str, str, str]]:
    """(label, value, noise-floor value) rows for a verdict card."""
    m = d.get("metrics") or {}
    rows = [
        ("KL mean (nats)", pm(m.get("kl_mean"), m.get("kl_mean_se"), 3), fmt(noise.get("kl_mean"), 3)),
        ("KL p99 (nats)", fmt(m.get("kl_p99"), 3), fmt(noise.get("kl_p99"), 3)),
        ("KL max (nats)", fmt(m.get("kl_max"), 3), fmt(noise.get("kl_max"), 3)),
        ("top-1 agreement", pct(m.get("top1_agreement")), pct(noise.get("top1_agreement"))),
        ("PPL ratio", pm(m.get("ppl_ratio"), m.get("ppl_ratio_se"), 6), "1"),
        ("non-finite tokens", fmt(m.get("nonfinite_tokens")), "0"),
    ]
    return [r for r in rows if r[1] != "-"]  # a broken dtype has no KL: say so once, in its message


def _noise_note(results: dict) -> str:
    noise = results.get("noise_floor") or {}
    if not noise:
        return "no noise floor was measured (--noise-tokens 0): differences cannot be set against run-to-run noise"
    where = (f"the {results.get('reference', 'reference')} reference re-scored {fmt(noise.get('n_tokens'))} tokens "
             f"at batch size {fmt(noise.get('batch_size'))} instead of {fmt(noise.get('reference_batch_size'))}")
    if noise.get("kl_max") == 0:
        return f"Noise floor: {where}; the outputs were bit-identical (KL exactly 0)."
    return f"Noise floor: {where}; a test dtype is distinguishable from noise only above these values."


def _numerics(results: dict) -> dict:
    """Per-layer error and activation-headroom charts from a `numerics` section, when present."""
    num = results.get("numerics")
    num = num if isinstance(num, dict) else {}
    charts_ = {"layer_error": charts.layer_chart(num.get("layer_error"), ("rel_error", "error", "value"),
                                                 "relative error of the layer output"),
               "activation_headroom": charts.layer_chart(num.get("activation_headroom"), ("max_abs", "value"),
                                                         "largest |activation|", (FP16_MAX, "FP16 max 65504"))}
    return {k: v for k, v in {**charts_, "table": _numerics_table(results, num)}.items() if v}


def _verdict_reasons(results: dict, name: str) -> list | None:
    num = results.get("numerics")
    v = obj(obj(num).get("verdicts")).get(name)
    return v.get("reasons") if isinstance(v, dict) and isinstance(v.get("reasons"), list) else None


def _numerics_table(results: dict, num: dict) -> list[dict]:
    """One row per test dtype with numerics metrics: where it breaks and how close it comes."""
    rows = []
    for name, d in (results.get("dtypes") or {}).items():
        m = d.get("metrics") or {}
        if d.get("role") != "test" or "min_headroom_bits" not in m:
            continue
        ff = (num.get("first_nonfinite") or {}).get(name) or {}
        near = ((num.get("near_overflow") or {}).get(name) or [{}])[0]
        rows.append({"dtype": name, "first": str(m.get("first_nonfinite_module") or "none"),
                     "ref_absmax": fmt(ff.get("reference_absmax"), 3), "headroom": fmt(m.get("min_headroom_bits"), 3),
                     "near": fmt(m.get("modules_near_overflow")), "tightest": str(near.get("module") or "-"),
                     "w_overflow": fmt(m.get("weights_overflow")), "w_underflow": pct(m.get("weights_underflow_frac"), 3),
                     "w_rel_err": fmt(m.get("weights_rel_err_max"), 3), "growth": fmt(m.get("layer_max_error_growth"))})
    return rows


def _gates(results: dict) -> dict:
    """Gate outcomes from `gates`: a list of outcomes or a dict with `outcomes`, `passed`, `counts`.

    Each outcome may give `passed` (bool) or `status` ("pass"/"fail"/"skipped"); missing fields show '-'.
    """
    gates = results.get("gates")
    summary = gates if isinstance(gates, dict) else {}
    items = summary.get("outcomes", summary.get("results")) if summary else gates
    rows = []
    for g in items if isinstance(items, list) else []:
        if not isinstance(g, dict):
            continue
        passed = g.get("passed")
        result = str(g.get("status") or ("pass" if passed is True else "fail" if passed is False else "-"))
        rule = g.get("gate") or f"{g.get('metric', '')} {g.get('op', '')} {_text(g['bound']) if 'bound' in g else ''}"
        value = "not measurable" if "value" in g and g["value"] is None and result != "skipped" else _text(g.get("value"))
        rows.append({"dtype": str(g.get("dtype", "-")), "rule": str(rule).strip() or "-", "value": value,
                     "bound": _text(g.get("bound")), "result": result, "detail": str(g.get("detail") or "")})
    if not rows:
        return {}
    ok = summary.get("passed")
    if not isinstance(ok, bool):
        ok = not any(r["result"] == "fail" for r in rows)
    counts = summary.get("counts") if isinstance(summary.get("counts"), dict) else \
        {r["result"]: sum(x["result"] == r["result"] for x in rows) for r in rows}
    return {"rows": rows, "passed": ok, "counts": counts, "source": str(summary.get("source") or ""),
            "baseline": str(summary.get("baseline") or "")}


def _worst(results: dict) -> dict[str, list[dict]]:
    out = {}
    for name, items in (results.get("worst_tokens") or {}).items():
        rows = [{"kl": fmt(t.get("kl"), 3), "position": fmt(t.get("position")),
                 "context": str(t.get("context") or ""), "target": _visible(t.get("target")),
                 "reference_top": _visible(t.get("reference_top")), "test_top": _visible(t.get("test_top")),
                 "p": f"{fmt(t.get('p_ref'), 3)} → {fmt(t.get('p_test'), 3)}",
                 "flipped": t.get("reference_top") != t.get("test_top")}
                for t in items if isinstance(t, dict)] if isinstance(items, list) else []
        if rows:
            out[str(name)] = rows
    return out


def _visible(token) -> str:
    """A token as readable text: whitespace-only tokens made visible, None as '-'."""
    token = "-" if token is None else str(token)
    return token if token.strip() else token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def _all_metrics(dtypes: dict, only_unknown: bool = False) -> list[tuple[str, list[str]]]:
    """(name, value per dtype) rows of every metric, or of those no section above shows."""
    names: list[str] = []
    for d in dtypes.values():
        names += [k for k in (d.get("metrics") or {}) if k not in names]
    if only_unknown:
        hidden = ("noise_", *bench_report.METRIC_PREFIXES, *gen_report.METRIC_PREFIXES)  # their views show those
        names = [k for k in names if k not in SHOWN_METRICS and not k.startswith(hidden)]
    return [(k, [_text((d.get("metrics") or {}).get(k)) if k in (d.get("metrics") or {}) else ""
                 for d in dtypes.values()]) for k in names]


def _title(model: dict) -> str:
    """The model as results.json names it; the report needs no model package to say which it was."""
    source = str(model.get("source") or "unknown model")
    if model.get("is_demo") is True:  # source is then the cached conversion's directory
        return f"{model.get('name') or Path(source).name}, the embedded default model"
    return source


def _other_sections(results: dict) -> list[tuple[str, str]]:
    known = KNOWN_KEYS | ({"benchmarks"} if bench_report.context(results) else set()) | \
        ({"generation"} if gen_report.context(results) else set())  # else shown raw
    raw = {k: json.dumps(v, indent=2, ensure_ascii=False) for k, v in results.items() if k not in known}
    return [(k, t if len(t) <= RAW_LIMIT else t[:RAW_LIMIT] + "\n… (cut; see results.json)") for k, t in raw.items()]


def context(results: dict, label: str = "", file: str = "") -> dict:
    """Everything the templates need for one run, as plain rows and chart strings."""
    dtypes = results.get("dtypes") or {}
    noise = results.get("noise_floor") or {}
    hists = results.get("kl_histograms") or {}
    model = results.get("model") or {}
    return {
        "label": label, "file": file, "results": results, "dtypes": dtypes, "noise": noise, "title": _title(model),
        "noise_note": _noise_note(results),
        "verdicts": {n: verdict(d, _verdict_reasons(results, n)) for n, d in dtypes.items()},
        "headline": {n: _headline(d, noise) for n, d in dtypes.items() if d.get("role") == "test"},
        "kl_density": charts.kl_density_chart(hists, noise.get("kl_max")) if hists else None,
        "kl_tail": charts.kl_tail_chart(hists, noise.get("kl_max")) if hists else None,
        "zero_kl": {n: h.get("n_zero") for n, h in hists.items() if isinstance(h, dict) and h.get("n_zero")},
        "numerics": _numerics(results), "gates": _gates(results), "worst": _worst(results),
        "benchmarks": bench_report.context(results), "recipes": recipes_report.context(results),
        "generation": gen_report.context(results),
        "all_metrics": _all_metrics(dtypes), "more_metrics": _all_metrics(dtypes, only_unknown=True),
        "provenance": _nested(_without_phases(results.get("provenance") or {})), "model_rows": flatten(model),
        "corpus_rows": flatten(results.get("corpus") or {}), "config_rows": flatten(results.get("config") or {}),
        "other": _other_sections(results),
    }
