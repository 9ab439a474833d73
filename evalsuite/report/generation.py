"""The `generation` section of results.json -> rows and a survival chart for the report's generation view.

Reads only the results dict (no torch, no numpy). Every field is optional: a missing one shows as
'-'. Continuations are model output and prompts are user or corpus text, so every string goes to
jinja2 with autoescape on; the chart escapes its own labels (charts.py).
"""

from __future__ import annotations

from evalsuite.fmt import fmt, is_number, pct
from evalsuite.report import charts

# Metric names the generation view shows; the report's "more metrics" table leaves them out.
METRIC_PREFIXES = ("gen_",)
NOISE = "noise"  # the key of the reference-against-itself comparison in the section


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _row(name: str, m: dict, floor: dict, dtype_metrics: dict) -> dict:
    """One table row: a comparison's statistics, with the floor's beside the ones it bounds."""
    def both(key: str, show) -> dict:
        return {"value": show(m.get(key)), "floor": show(floor.get(key)) if floor else "-"}

    steps = lambda v: fmt(v, 4)  # noqa: E731
    return {"name": name, "identical": both("gen_identical", pct), "median": both("gen_first_div_median", steps),
            "p10": both("gen_first_div_p10", steps), "near_tie": pct(m.get("gen_near_tie_share")),
            "in_topk": pct(m.get("gen_in_ref_topk")), "logprob_delta": fmt(m.get("gen_ref_logprob_delta"), 3),
            "answer": pct(m.get("gen_answer_changed")) if "gen_answer_changed" in m else "-",
            "nonfinite": fmt(m.get("gen_nonfinite_prompts")), "speed": fmt(dtype_metrics.get("gen_tokens_per_s"), 3),
            "within": dtype_metrics.get("gen_within_noise") is True}


def _survival_chart(survival: dict, horizon) -> object | None:
    series = []
    names = [n for n in survival if n != NOISE] + ([NOISE] if NOISE in survival else [])
    for i, name in enumerate(names):
        curve = survival.get(name)
        if not isinstance(curve, list):
            continue
        points = [(t, v) for t, v in enumerate(curve) if is_number(v)]
        if points:
            label = "noise floor (reference vs itself)" if name == NOISE else str(name)
            series.append({"name": label, "points": points, "dashed": name == NOISE,
                           "colour": len(charts.PALETTE) - 1 if name == NOISE else i})
    if not series:
        return None
    return charts.line_chart(series, title="Share of continuations still identical to the reference's",
                             x_label=f"tokens generated (of {fmt(horizon)})", y_label="share identical so far",
                             hlines=[(0.0, "")])  # the y axis from 0, even when every curve stays at 1


def _example(e: dict) -> dict:
    top = [f"{charts_token(t.get('token'))} {fmt(t.get('logprob'), 3)}" for t in e.get("reference_top") or []
           if isinstance(t, dict)]
    return {"origin": str(e.get("origin") or "-"), "prompt": str(e.get("prompt") or ""),
            "position": fmt(e.get("first_divergence")), "margin": fmt(e.get("margin"), 3),
            "in_topk": e.get("in_ref_topk") is True, "nonfinite": e.get("nonfinite") is True,
            "common": str(e.get("common") or ""), "reference_rest": str(e.get("reference_rest") or ""),
            "test_rest": str(e.get("test_rest") or ""), "top": " · ".join(top)}


def charts_token(token) -> str:
    """A token as readable text: whitespace made visible, nothing as '∅'."""
    token = "" if token is None else str(token)
    return token if token.strip() else token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def _setting(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
    return v if isinstance(v, str) else fmt(v)


def context(results: dict) -> dict:
    """Rows, chart and examples for the generation view; {} when the run has no `generation` section."""
    g = results.get("generation")
    if not isinstance(g, dict):
        return {}
    stats, settings, dtypes = _dict(g.get("stats")), _dict(g.get("settings")), _dict(results.get("dtypes"))
    floor = _dict(stats.get(NOISE))
    rows = [_row(str(n), _dict(stats.get(n)), floor, _dict(_dict(dtypes.get(n)).get("metrics")))
            for n in g.get("dtypes") or [] if isinstance(stats.get(n), dict)]
    examples = {str(n): [_example(e) for e in items if isinstance(e, dict)]
                for n, items in _dict(g.get("examples")).items() if isinstance(items, list)}
    return {
        "reference": str(g.get("reference") or "-"), "rows": rows,
        "floor": _row("noise floor", floor, {}, {}) if floor else None,
        "chart": _survival_chart(_dict(g.get("survival")), settings.get("tokens")),
        "examples": {n: rows_ for n, rows_ in examples.items() if rows_},
        "settings": [(str(k), _setting(v)) for k, v in settings.items()],
        "near_tie": fmt(settings.get("near_tie_nats"), 3), "top_k": fmt(settings.get("top_k")),
        "tokens": fmt(settings.get("tokens")), "records_file": str(g.get("records_file") or ""),
        "failed": [(str(k), str(v)) for k, v in _dict(g.get("failed")).items()],
    }
