"""The `benchmarks` section of results.json -> rows for the report's benchmark view.

Reads only the results dict (no torch, no lm-eval). Every field is optional: a missing one
shows as '-'. The strings go to jinja2 with autoescape on, so question text from a dataset
(which may hold `<`, `&` or markup) is shown as text.
"""

from __future__ import annotations

from evalsuite.fmt import fmt, is_number, pct, pm

# Metric names the benchmark view shows; the report's "more metrics" table leaves them out.
METRIC_PREFIXES = ("acc/", "acc_se/", "delta_acc/", "delta_acc_ci_low/", "delta_acc_ci_high/", "flips/",
                   "mcnemar_p/", "choice_kl/", "choice_agreement/", "bench_questions_per_s", "bench_nonfinite/")
NONFINITE = "bench_nonfinite/"  # + task: questions whose log-likelihoods at that dtype are not finite


def obj(v) -> dict:
    """`v` if it is a JSON object, else {}: a damaged file's wrong type reads as a missing part."""
    return v if isinstance(v, dict) else {}


def _pp(v) -> str:
    """A difference of shares in percentage points, signed."""
    return f"{'+' if v > 0 else ''}{fmt(v * 100, 3)} pp" if is_number(v) else "-"


def _ci(ci) -> str:
    if not (isinstance(ci, list | tuple) and len(ci) == 2 and all(is_number(x) for x in ci)):
        return "-"
    return f"[{_pp(ci[0])}, {_pp(ci[1])}]"


def _row(row: dict, tests: list[str], names: list[str]) -> dict:
    acc = row.get("acc") if isinstance(row.get("acc"), dict) else {}
    vs = row.get("vs_reference") if isinstance(row.get("vs_reference"), dict) else {}
    out = {"label": str(row.get("subject") or row.get("task") or "-"), "subject": row.get("subject") is not None,
           "n": fmt(row.get("n")), "acc": {}, "vs": {}}
    for name in names:
        a = acc.get(name) if isinstance(acc.get(name), dict) else {}
        out["acc"][name] = pm(a.get("acc"), a.get("acc_se"), 4) if a else "-"
    for name in tests:
        v = vs.get(name) if isinstance(vs.get(name), dict) else {}
        out["vs"][name] = {
            "delta": _pp(v.get("delta_acc")), "ci": _ci(v.get("delta_acc_ci")),
            "flips": fmt(v.get("flips")), "c2w": fmt(v.get("correct_to_wrong")), "w2c": fmt(v.get("wrong_to_correct")),
            "rate": pct(v.get("flip_rate"), 3), "p": fmt(v.get("mcnemar_p"), 3), "kl": fmt(v.get("choice_kl"), 3),
            "agree": pct(v.get("choice_agreement")),
            "significant": is_number(v.get("mcnemar_p")) and v["mcnemar_p"] < 0.05}
    return out


def _choice(choices: list, i) -> str:
    return str(choices[i]) if isinstance(i, int) and 0 <= i < len(choices) else "-"


def _flipped(items, limit: int = 10_000) -> list[dict]:
    out = []
    for f in items if isinstance(items, list) else []:
        if not isinstance(f, dict):
            continue
        choices = f.get("choices") if isinstance(f.get("choices"), list) else []
        lls = [f.get("reference_loglik"), f.get("test_loglik")]
        out.append({"task": str(f.get("subject") or f.get("task") or "-"), "doc_id": fmt(f.get("doc_id")),
                    "question": str(f.get("question") or ""), "direction": str(f.get("direction") or "-"),
                    "worse": str(f.get("direction", "")).startswith("correct"), "gold": _choice(choices, f.get("gold")),
                    "reference": _choice(choices, f.get("reference_choice")), "test": _choice(choices, f.get("test_choice")),
                    "loglik": [" ".join(f"{c}:{fmt(x, 4)}" for c, x in zip(choices, ll, strict=False))
                               if isinstance(ll, list) else "-" for ll in lls]})
        if len(out) >= limit:
            break
    return out


def _no_answer(f: dict) -> bool:
    """A flip between answers one side never gave: some log-likelihood of its choices is not finite."""
    lls = [f.get("reference_loglik"), f.get("test_loglik")]
    return any(isinstance(ll, list) and not all(is_number(x) for x in ll) for ll in lls)


def _flips(items, total) -> dict:
    """The flips worth reading, one by one; those without an answer collapse into a count (a broken
    dtype's would otherwise fill the report with rows of first choices and '-' log-likelihoods)."""
    items = [f for f in items if isinstance(f, dict)] if isinstance(items, list) else []
    answered = [f for f in items if not _no_answer(f)]
    rows = _flipped(answered)
    total = total if isinstance(total, int) and not isinstance(total, bool) else len(items)
    return {"rows": rows, "total": fmt(total), "no_answer": len(items) - len(answered),
            "cut": len(rows) + len(items) - len(answered) < total}


def _unanswerable(results: dict, rows: list, names: list[str]) -> list[dict]:
    """One entry per (dtype, task) with questions that had no answer: `bench_nonfinite/<task>`, or in
    results written before that metric, the task row's `nonfinite` count."""
    dtypes = results.get("dtypes") if isinstance(results.get("dtypes"), dict) else {}
    tasks = {str(r.get("task")): r for r in rows if isinstance(r, dict) and r.get("subject") is None}
    out = []
    for n in names:
        m = (dtypes.get(n) or {}).get("metrics") if isinstance(dtypes.get(n), dict) else None
        m = m if isinstance(m, dict) else {}
        for task, row in tasks.items():
            k = m.get(NONFINITE + task)
            if not is_number(k):
                a = ((row.get("acc") if isinstance(row.get("acc"), dict) else {}).get(n))
                k = a.get("nonfinite") if isinstance(a, dict) else None
            if is_number(k) and k > 0:
                out.append({"dtype": n, "task": task, "count": fmt(int(k)), "n": fmt(row.get("n"))})
    return out


def _count(rows: list, names: list[str], key: str) -> dict[str, int]:
    """A per-dtype count summed over the whole-task rows (subjects are part of them)."""
    out = {}
    for n in names:
        values = [obj(obj(r.get("acc")).get(n)).get(key) for r in rows
                  if isinstance(r, dict) and r.get("subject") is None]
        out[n] = sum(int(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool))
    return out


def _batch(t: dict) -> str:
    """The batch size used, and where an out-of-memory error halved it, the one it started from."""
    size, start = t.get("batch_size"), t.get("batch_size_start")
    if not isinstance(size, int):
        return "-"
    return f"{fmt(size)} (from {fmt(start)})" if isinstance(start, int) and start != size else fmt(size)


def _speed(timing: dict) -> list[dict]:
    """One row per dtype: scoring seconds, questions/s, batch size, ranks (data-parallel)."""
    return [{"name": str(n), "seconds": fmt(t.get("score_s"), 3), "rate": fmt(t.get("questions_per_s"), 3),
             "batch": _batch(t), "ranks": fmt(t.get("ranks")) if isinstance(t.get("ranks"), int) else "-"}
            for n, t in timing.items() if isinstance(t, dict)]


def context(results: dict) -> dict:
    """Rows for the benchmark view; {} when the run has no `benchmarks` section."""
    b = results.get("benchmarks")
    if not isinstance(b, dict) or not isinstance(b.get("rows"), list):
        return {}
    names = [str(n) for n in b.get("dtypes")] if isinstance(b.get("dtypes"), list) else []
    ref = b.get("reference")
    tests = [n for n in names if n != ref]
    rows = [_row(r, tests, names) for r in b["rows"] if isinstance(r, dict)]
    flipped = b.get("flipped") if isinstance(b.get("flipped"), dict) else {}
    counts = b.get("n_flipped") if isinstance(b.get("n_flipped"), dict) else {}
    settings = b.get("settings") if isinstance(b.get("settings"), dict) else {}
    timing = b.get("timing") if isinstance(b.get("timing"), dict) else {}
    return {
        "reference": str(ref or "-"), "names": names, "tests": tests, "rows": rows,
        "flipped": {str(t): _flips(items, counts.get(t)) for t, items in flipped.items()},
        "records_file": str(b.get("records_file") or ""),
        "settings": [(str(k), fmt(v) if not isinstance(v, str) else v) for k, v in settings.items()],
        "speed": _speed(timing),
        "ties": _count(b["rows"], names, "tied_top"), "unanswerable": _unanswerable(results, b["rows"], names),
        "failed": [(str(k), str(v)) for k, v in (b.get("failed") or {}).items()] if isinstance(b.get("failed"), dict) else [],
    }
