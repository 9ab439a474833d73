"""The gate file: TOML text parsed into frozen `Gate`s, and loaded with its baseline into a `GateSet`.

Everything a file alone can get wrong is found here, before a run starts and before any model
loads (a typo must not cost a GPU run), and each error points at the file's line to fix. Apart
from `rules.py`, which evaluates a `GateSet` against `RunResults` and never reads a gate file's
text. The format is in docs/gates.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from evalsuite.errors import UsageError
from evalsuite.log import say
from evalsuite.store.results import RunResults, Scalar, load_results

_OPS_HELP = "use <, <=, >, >=, ==, !="
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
