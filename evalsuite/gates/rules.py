"""Quality gates: bounds on a run's metrics, so CI stops a checkpoint or precision that loses quality.

A gate file is parsed at the edge into frozen `Gate`s (`gatefile.py`); evaluation, here, reads only
`RunResults`, so `evalsuite gate results.json` runs on a CI machine without torch or a GPU. Two rules
keep a gate from passing by accident: a metric no dtype of the results has is a configuration error
(a typo must not pass forever), and a value that is not measurable never passes: null/NaN/inf, a metric
a broken dtype lacks, or a per-task metric over questions that had no answer (`measurable.py`).
The format is in docs/gates.md; the terminal table, JUnit and Markdown are in `ci.py`, which
imports this module (never the other way).
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass

from evalsuite.errors import EXIT_GATE_FAILED, EXIT_OK, UsageError
from evalsuite.fmt import fmt
from evalsuite.gates.gatefile import Gate, GateSet
from evalsuite.gates.measurable import missing, why_not
from evalsuite.store.results import DtypeResult, RunResults, Scalar

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclass(frozen=True)
class Outcome:
    gate: Gate
    dtype: str
    status: str  # "pass" | "fail" | "skipped"
    value: Scalar = None
    bound: Scalar = None
    detail: str = ""  # why it failed or was skipped, or a warning that the bound is inside the noise floor


def check_dtypes(gs: GateSet, names: list[str]) -> None:
    """A gate for a dtype the run does not measure is a configuration error (checked before a run)."""
    for g in gs.gates:
        if g.dtype is not None and g.dtype not in names:
            raise UsageError(f"{g.where}: gates {g.dtype}, which this run does not have (it has "
                             f"{', '.join(names)}); add it to --dtypes or remove its gates")


def evaluate(gs: GateSet, results: RunResults) -> tuple[Outcome, ...]:
    """Every gate on every dtype it applies to, in the results' dtype order then the file's order."""
    check_dtypes(gs, list(results.dtypes))
    if not any(d.role == "test" for d in results.dtypes.values()) and any(g.dtype is None for g in gs.gates):
        raise UsageError(f"{gs.source}: the results have no test dtype for the all-dtype gates to check; "
                         "run with --dtypes fp16,bf16")
    return tuple(_check(g, d, gs, results) for d in results.dtypes.values() for g in gs.gates
                 if g.dtype == d.name or (g.dtype is None and d.role == "test"))


def _check(g: Gate, d: DtypeResult, gs: GateSet, results: RunResults) -> Outcome:
    if d.status == "skipped":
        return Outcome(g, d.name, "skipped", detail=f"{d.name} was skipped: {d.message or 'no reason given'}")
    if d.status == "failed":
        return Outcome(g, d.name, "fail", None, g.operand if g.baseline is None else None,
                       f"{d.name} failed to run, nothing to verify: {d.message}")
    ctx = f"{g.where}: {g.text} on {d.name}"
    present = g.metric in d.metrics
    unmeasurable = why_not(results, d, g.metric, present)
    if not present and unmeasurable is None:
        _lookup(d.metrics, g.metric, ctx, "results")  # a name no dtype has: a typo, raised as such
    value, bound = d.metrics.get(g.metric), _bound(g, d.name, gs, ctx)
    if unmeasurable or missing(value) or missing(bound):
        why = unmeasurable or (f"{d.name}: {d.message}" if missing(value) and d.message else
                               f"{d.name} {g.metric}: the {'value' if missing(value) else 'baseline value'} "
                               "is NaN/null, not measurable")
        return Outcome(g, d.name, "fail", value, bound, why)
    kinds = (_kind(value), _kind(bound))
    if kinds[0] != kinds[1]:
        raise UsageError(f"{ctx}: compares {g.metric} (a {kinds[0]}, {value!r}) with a {kinds[1]}; "
                         f"give a bound of the metric's type")
    if kinds[0] != "number" and g.op not in ("==", "!="):
        raise UsageError(f"{ctx}: {g.metric} is a {kinds[0]}, which only == and != can compare")
    noise = d.metrics.get(f"noise_{g.metric}")
    note = ""
    if kinds[0] == "number" and _kind(noise) == "number" and not missing(noise) and not OPS[g.op](noise, bound):
        note = (f"{d.name} {g.metric}: the reference against itself (noise_{g.metric} = {fmt(noise, 6)}) does "
                "not pass this bound, so it measures noise; loosen it")
    return Outcome(g, d.name, "pass" if OPS[g.op](value, bound) else "fail", value, bound, note)


def _lookup(metrics: dict, metric: str, ctx: str, what: str) -> Scalar:
    if metric in metrics:
        return metrics[metric]
    close = difflib.get_close_matches(metric, list(metrics), n=1)
    hint = f"did you mean '{close[0]}'?" if close else "check the name in results.json or run what produces it"
    raise UsageError(f"{ctx}: the {what} have no metric '{metric}'; {hint}")


def _bound(g: Gate, dtype: str, gs: GateSet, ctx: str) -> Scalar:
    if g.baseline is None:
        return g.operand
    assert gs.baseline is not None  # load() refuses relative gates without a baseline
    base = gs.baseline.dtypes.get(dtype)
    if base is None or base.status in ("skipped", "failed"):
        why = "has no" if base is None else f"{base.status} on"
        raise UsageError(f"{ctx}: the baseline {gs.baseline_source} {why} {dtype}; pass a baseline where {dtype} ran")
    if g.metric in base.metrics and why_not(gs.baseline, base, g.metric, True):
        return None  # over questions the baseline could not answer: not measurable, so the gate fails
    b = _lookup(base.metrics, g.metric, ctx, f"baseline {gs.baseline_source}")
    if not g.baseline or missing(b):
        return b
    if _kind(b) != "number":
        raise UsageError(f"{ctx}: the baseline's {g.metric} is {b!r}, not a number; compare it with == or != baseline")
    return _ARITH[g.baseline](b, g.operand)


def _kind(v) -> str:
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, int | float):
        return "number"
    return "text" if isinstance(v, str) else type(v).__name__


def passed(outcomes: tuple[Outcome, ...]) -> bool:
    """No gate failed and at least one was checked: all-skipped verifies nothing, so it is no pass."""
    return any(o.status == "pass" for o in outcomes) and not any(o.status == "fail" for o in outcomes)


def exit_code(outcomes: tuple[Outcome, ...]) -> int:
    return EXIT_OK if passed(outcomes) else EXIT_GATE_FAILED


def counts(outcomes: tuple[Outcome, ...]) -> dict[str, int]:
    return {s: sum(o.status == s for o in outcomes) for s in ("pass", "fail", "skipped")}


def section(gs: GateSet, outcomes: tuple[Outcome, ...]) -> dict:
    """The `gates` key of results.json (non-finite values become null when written)."""
    return {
        "passed": passed(outcomes), "source": gs.source, "baseline": gs.baseline_source, "counts": counts(outcomes),
        "outcomes": [{"dtype": o.dtype, "gate": o.gate.text, "metric": o.gate.metric, "op": o.gate.op,
                      "rhs": o.gate.rhs, "value": o.value, "bound": o.bound, "status": o.status, "detail": o.detail}
                     for o in outcomes],
    }
