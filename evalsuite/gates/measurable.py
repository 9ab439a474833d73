"""Which metric values a gate may judge: the rule that keeps a broken dtype from passing.

A value is not measurable when it is null/NaN/inf (results.json writes NaN and inf as null),
when the dtype lacks a metric that other dtypes of the run have (a broken dtype's benchmark
leaves it out), or when it is a per-task metric `<name>/<task>` of a task on which the dtype,
or the reference it is paired with, had questions whose log-likelihoods were not finite: such
a question has no answer, so an accuracy or a flip count over that task says nothing a gate can
trust (lm-eval would have taken the first choice, which is how a broken FP16 once "passed").
The count comes from the metric `bench_nonfinite/<task>`; results written before that metric
existed give it in the `benchmarks` section's rows (`acc.<dtype>.nonfinite`).
"""

from __future__ import annotations

import math

from evalsuite.fmt import is_number
from evalsuite.store.results import DtypeResult, RunResults

NONFINITE = "bench_nonfinite/"


def missing(v) -> bool:
    """None is how results.json stores NaN and inf; both mean 'not measurable'."""
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def _section_count(results: RunResults, dtype: str, task: str) -> int:
    """Questions of `task` with NaN log-likelihoods at `dtype`, from the benchmarks section's task row."""
    bench = results.sections.get("benchmarks")
    rows = bench.get("rows") if isinstance(bench, dict) else None
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and row.get("task") == task and row.get("subject") is None:
            acc = row.get("acc") if isinstance(row.get("acc"), dict) else {}
            n = (acc.get(dtype) if isinstance(acc.get(dtype), dict) else {}).get("nonfinite")
            return int(n) if is_number(n) and n > 0 else 0
    return 0


def unanswerable(results: RunResults, d: DtypeResult, task: str) -> int:
    """Questions of `task` that `d` could not answer (their log-likelihoods were not finite)."""
    n = d.metrics.get(NONFINITE + task)
    return int(n) if is_number(n) and n > 0 else _section_count(results, d.name, task)


def why_not(results: RunResults, d: DtypeResult, metric: str, present: bool) -> str | None:
    """Why `metric` of `d` cannot be gated on, or None when its value (if finite) can be."""
    name, _, task = metric.partition("/")
    if task and name + "/" != NONFINITE:
        ref = results.dtypes.get(results.reference)
        paired = name not in ("acc", "acc_se") and d.role == "test"  # the others compare with the reference
        pairs = [d] + ([ref] if paired and ref is not None and ref is not d else [])
        for x in pairs:
            if k := unanswerable(results, x, task):
                return (f"{x.name}: {k} question{'s' if k != 1 else ''} of {task} had non-finite log-likelihoods "
                        f"and no answer, so {d.name} {metric} is not measurable")
    if not present and any(metric in x.metrics for x in results.dtypes.values()):
        return f"{d.name} has no {metric} (other dtypes of the run have it): not measurable"
    return None
