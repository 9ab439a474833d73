"""results.json -> one self-contained HTML report (or a side-by-side comparison of two runs).

Reads only the results dict, never torch or the model, so `evalsuite report` re-renders on any
machine. `sections.py` turns the dict into plain rows and chart strings; the jinja2
templates in `evalsuite/report/templates/` lay them out with autoescape on, so every string from the
data (corpus lines, model names, tokens) is escaped. Charts come from `evalsuite.report.charts`,
which escapes its own labels. This module is the page frame: the template of each page, the
rows that set two runs side by side, and reading results.json and writing the page.
"""

from __future__ import annotations

from pathlib import Path

from evalsuite.fmt import fmt, pct, pm
from evalsuite.fmt import is_number as _finite
from evalsuite.report import charts
from evalsuite.report.html import env as _env
from evalsuite.report.html import signed
from evalsuite.report.sections import context, flatten


def render_report(results: dict) -> str:
    """The HTML report of one run, from its results dict alone."""
    return _env().get_template("report.html").render(c=context(results))


# (label, metric, its standard error or None, format: "pct" or significant digits) rows of the comparison
COMPARE_ROWS = [("PPL", "ppl", "ppl_se", 4), ("PPL ratio", "ppl_ratio", "ppl_ratio_se", 6),
                ("KL mean (nats)", "kl_mean", "kl_mean_se", 3), ("KL p99 (nats)", "kl_p99", None, 3),
                ("KL max (nats)", "kl_max", None, 3), ("top-1 agreement", "top1_agreement", None, "pct"),
                ("Δp rms", "delta_p_rms", None, 3), ("non-finite tokens", "nonfinite_tokens", None, 4),
                ("tokens/s", "tokens_per_s", None, 3)]


def _change(a, b, kind) -> str:
    """B relative to A: a signed difference (percentage points for shares) and a ratio."""
    if not (_finite(a) and _finite(b)):
        return "-"
    if kind == "pct":
        return f"{signed((b - a) * 100)} pp"
    ratio = f" (×{fmt(b / a, 3)})" if a > 0 and b >= 0 else ""
    return signed(b - a) + ratio


def _show(m: dict, key: str, se: str | None, kind) -> str:
    return pct(m.get(key)) if kind == "pct" else pm(m.get(key), m.get(se) if se else None, kind)


def compare_context(a: dict, b: dict, labels: tuple[str, str], files: tuple[str, str] = ("", "")) -> dict:
    """Both runs' contexts plus the rows that set them side by side."""
    ca, cb = context(a, labels[0], files[0]), context(b, labels[1], files[1])
    names = list(ca["dtypes"]) + [n for n in cb["dtypes"] if n not in ca["dtypes"]]
    rows = {}  # dtype -> its metric rows
    for name in names:
        ma = (ca["dtypes"].get(name) or {}).get("metrics") or {}
        mb = (cb["dtypes"].get(name) or {}).get("metrics") or {}
        rows[name] = [{"metric": label, "a": _show(ma, key, se, kind), "b": _show(mb, key, se, kind),
                       "change": _change(ma.get(key), mb.get(key), kind)}
                      for label, key, se, kind in COMPARE_ROWS if key in ma or key in mb]
    hists, dashed, colours = {}, set(), {}  # one colour per dtype; run B dashed
    for i, r in enumerate((a, b)):
        for n, h in (r.get("kl_histograms") or {}).items():
            key = f"{n} ({labels[i]})"
            hists[key], colours[key] = h, names.index(n) if n in names else len(names)
            dashed |= {key} if i else set()
    fa, fb = (dict(flatten({k: r.get(k) for k in ("model", "corpus", "config", "provenance")})) for r in (a, b))
    diffs = [(k, fa.get(k, "-"), fb.get(k, "-")) for k in list(fa) + [k for k in fb if k not in fa]
             if fa.get(k) != fb.get(k)]
    sha = [(r.get("corpus") or {}).get("sha256") for r in (a, b)]
    return {"a": ca, "b": cb, "labels": labels, "names": names, "rows": {k: v for k, v in rows.items() if v}, "diffs": diffs,
            "same_corpus": sha[0] == sha[1],
            "kl_tail": charts.kl_tail_chart(hists, dashed=dashed, colours=colours) if hists else None,
            "title": f"{ca['title']} ({labels[0]}) vs {cb['title']} ({labels[1]})"}


def render_compare(a: dict, b: dict, labels: tuple[str, str] = ("A", "B"), files: tuple[str, str] = ("", "")) -> str:
    """Two runs side by side: verdicts, headline metrics with their change, KL tails, what differs."""
    return _env().get_template("compare.html").render(k=compare_context(a, b, labels, files))


def load(path: Path) -> dict:
    """The results dict of a results.json, validated by `results.load_results` (ResultsError if bad)."""
    from evalsuite.store.results import load_results

    return load_results(Path(path)).to_dict()


def write_report(out: Path, html: str) -> None:
    """Write atomically; an unwritable path is the user's to fix, so it is a UsageError."""
    from evalsuite.errors import UsageError
    from evalsuite.store.results import atomic_write_text

    try:
        atomic_write_text(Path(out), html)
    except OSError as exc:
        raise UsageError(f"cannot write the report to {out} ({exc.strerror or exc}); pass a writable -o") from exc
