"""Quality gates: bounds on a run's metrics, so CI stops a checkpoint or precision that loses quality.

A gate file is parsed at the edge into frozen `Gate`s; evaluation reads only `RunResults`, so
`evalsuite gate results.json` runs on a CI machine without torch or a GPU. Two rules keep a gate
from passing by accident: a metric no dtype of the results has is a configuration error (a typo
must not pass forever), and a value that is not measurable never passes: null/NaN/inf, a metric
a broken dtype lacks, or a per-task metric over questions that had no answer (`measurable.py`).
The format is in docs/gates.md; the terminal table, JUnit and Markdown are in `ci.py`, which
imports this module (never the other way).
"""

from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from evalsuite.errors import EXIT_GATE_FAILED, EXIT_OK, UsageError
from evalsuite.fmt import fmt
from evalsuite.gates.measurable import missing, why_not
from evalsuite.log import say
from evalsuite.store.results import DtypeResult, RunResults, Scalar, load_results

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
_OPS_HELP = "use <, <=, >, >=, ==, !="
_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_BASELINE = re.compile(rf"baseline(?:\s*([-+*])\s*({_NUMBER}))?")
_EXPR = re.compile(r"\s*(<=|>=|==|!=|<|>)\s*(.*?)\s*")


@dataclass(frozen=True)
class Gate:
    """One bound `metric op rhs`, on one dtype or (dtype None) on every test dtype of a run."""

    metric: str
    op: str
    rhs: str  # the bound as written, e.g. "0.01", '"broken"', "baseline - 0.01"
    operand: Scalar  # the constant; for a baseline bound, the number after + - * (None for plain baseline)
    baseline: str | None = None  # None: constant bound; "": the baseline's value; "+" "-" "*": arithmetic on it
    dtype: str | None = None
    where: str = ""  # "gates.toml line 3": every error points at the line to fix

    @property
    def text(self) -> str:
        return f"{self.metric} {self.op} {self.rhs}"


@dataclass(frozen=True)
class GateSet:
    """The parsed gate file and the baseline its relative bounds read, loaded before any run starts."""

    source: str
    gates: tuple[Gate, ...]
    baseline: RunResults | None = None
    baseline_source: str | None = None


@dataclass(frozen=True)
class Outcome:
    gate: Gate
    dtype: str
    status: str  # "pass" | "fail" | "skipped"
    value: Scalar = None
    bound: Scalar = None
    detail: str = ""  # why it failed or was skipped, or a warning that the bound is inside the noise floor


def parse_expr(metric: str, text: str, dtype: str | None = None, where: str = "gates") -> Gate:
    """One bound such as "<= 0.01"; every type rule a file alone can break is checked here, before a run."""
    m = _EXPR.fullmatch(text)
    if not m:
        bad = re.match(r"\s*([<>=!~]+)", text)
        if bad:
            raise UsageError(f"{where}: unknown operator '{bad.group(1)}' ({_OPS_HELP})")
        raise UsageError(f"{where}: bound {text!r} for {metric} has no operator; write e.g. \"<= 0.01\" ({_OPS_HELP})")
    op, rhs = m.groups()
    baseline = None
    if len(rhs) >= 2 and rhs[0] == rhs[-1] and rhs[0] in "\"'":
        operand: Scalar = rhs[1:-1]
    elif rhs in ("true", "false"):
        operand = rhs == "true"
    elif b := _BASELINE.fullmatch(rhs):
        baseline, operand = b.group(1) or "", _number(b.group(2)) if b.group(2) else None
    elif re.fullmatch(_NUMBER, rhs):
        operand = _number(rhs)
    else:
        raise UsageError(f"{where}: cannot read bound {rhs!r} for {metric} (write a number, \"text\", "
                         "true/false, or baseline [+ - *] number)")
    if isinstance(operand, str | bool) and op not in ("==", "!="):
        raise UsageError(f"{where}: {metric} {op} {rhs}: text and true/false can only be compared with == or !=")
    return Gate(metric, op, rhs, operand, baseline, dtype, where)


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)


def parse(text: str, name: str = "gates.toml") -> tuple[Gate, ...]:
    """Gates from TOML text: `[gates]` (or `[tool.evalsuite.gates]`), with one sub-table per dtype."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{name}: not valid TOML ({str(exc).splitlines()[0]}); fix the syntax there") from exc
    prefix, table = "gates", data.get("gates")
    if table is None:
        tool = data.get("tool") if isinstance(data.get("tool"), dict) else {}
        own = tool.get("evalsuite") if isinstance(tool.get("evalsuite"), dict) else {}
        prefix, table = "tool.evalsuite.gates", own.get("gates")
    if not isinstance(table, dict):
        raise UsageError(f"{name} has no [gates] table (nor [tool.evalsuite.gates], as in a pyproject.toml); "
                         "see docs/gates.md for the format")
    gates: list[Gate] = []
    for key, value in table.items():
        if isinstance(value, dict):
            for metric, bound in value.items():
                gates += _bounds(metric, bound, key, _where(text, name, f"{prefix}.{key}", metric))
        else:
            gates += _bounds(key, value, None, _where(text, name, prefix, key))
    if not gates:
        raise UsageError(f"{name}: [{prefix}] declares no gates; add one such as kl_mean = \"<= 0.01\"")
    return tuple(gates)


def _bounds(metric: str, value, dtype: str | None, where: str) -> list[Gate]:
    exprs = value if isinstance(value, list) else [value]
    if isinstance(value, dict) or not exprs or not all(isinstance(e, str) for e in exprs):
        what = "a table" if isinstance(value, dict) else repr(value)
        raise UsageError(f"{where}: {metric} = {what} is not a bound; write a string such as "
                         f"{metric} = \"<= 0.01\" (or a list of them)")
    return [parse_expr(metric, e, dtype, where) for e in exprs]


def _where(text: str, name: str, table: str, key: str) -> str:
    """'gates.toml line N' for the line declaring `key` in `[table]` (TOML parsers give no positions)."""
    current = ""
    for n, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\s*([^\[\]]*?)\s*\]\s*(#.*)?$", line)
        if header:
            current = re.sub(r"[\s\"']", "", header.group(1))
        elif current == table and re.match(rf"""\s*(["']?){re.escape(key)}\1\s*=""", line):
            return f"{name} line {n}"
    return f"{name} [{table}] {key}"


def results_path(path: str | Path) -> Path:
    """A run directory stands for its results.json."""
    path = Path(path)
    return path / "results.json" if path.is_dir() else path


def load(spec: str, baseline: str | Path | None = None) -> GateSet:
    """Parse the gate file ('default' = the shipped defaults) and load the baseline, failing fast."""
    name = "default_gates.toml" if spec == "default" else Path(spec).name
    try:
        if spec == "default":
            text = resources.files("evalsuite.gates").joinpath(name).read_text(encoding="utf-8")
        else:
            text = Path(spec).read_text(encoding="utf-8")
    except FileNotFoundError:
        if spec == "default":
            raise UsageError("this installation of evalsuite lacks evalsuite/gates/default_gates.toml; reinstall it, "
                             "or pass --gate FILE") from None
        raise UsageError(f"gate file {spec} does not exist; pass a gates TOML file, a pyproject.toml "
                         "with [tool.evalsuite.gates], or --gate default") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read gate file {spec} ({getattr(exc, 'strerror', None) or exc}); "
                         "pass a readable UTF-8 TOML file") from None
    gates = parse(text, name)
    relative = [g for g in gates if g.baseline is not None]
    if relative and baseline is None:
        raise UsageError(f"{relative[0].where}: '{relative[0].text}' is relative to a baseline; "
                         "pass --baseline OLD/results.json")
    if baseline is None:
        return GateSet(name, gates)
    base_path = results_path(baseline)
    return GateSet(name, gates, load_results(base_path), str(base_path))


DEFAULT_NOTE = "no --gate given: using the default gates (docs/gates.md)"


def load_or_default(spec: str | None, baseline: str | Path | None = None) -> GateSet:
    """`load(spec)`, or with no gate file the shipped defaults, saying so (`evalsuite gate RESULTS`)."""
    if spec is None:
        say(DEFAULT_NOTE)
        spec = "default"
    return load(spec, baseline)


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
