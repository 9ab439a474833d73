"""Frozen result records and their versioned JSON form (the contract for reports and gates).

The report and the gates read only `results.json`, so they run on any machine without torch.
Each dtype's `metrics` is a flat dict of scalars; later features add names to it, never nest.
Non-finite floats are written as `null` (strict JSON has no NaN) and read back as None: a
metric that is None is "not measurable", which a gate must treat as a failure, never a pass.
See docs/results-schema.md for every field.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evalsuite.errors import ResultsError

SCHEMA_VERSION = 2  # 2: results keyed by precision recipe, each with its resolved `recipe`

Scalar = float | int | str | bool | None


@dataclass(frozen=True)
class DtypeResult:
    name: str  # the recipe's normalised text: "fp32", "fp16", "bf16@fp16", "fp16+res32:7"
    role: str  # "reference" | "test"
    status: str  # "ok" | "broken" (non-finite outputs) | "skipped" (hardware) | "failed" (error)
    message: str | None = None  # why a dtype is broken/skipped/failed, in words a user can act on
    metrics: dict[str, Scalar] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None  # Precision.describe(): storage chain, compute, islands, ... (None in v1)


@dataclass(frozen=True)
class RunResults:
    config: dict[str, Any]
    provenance: dict[str, Any]
    model: dict[str, Any]
    corpus: dict[str, Any]
    reference: str
    dtypes: dict[str, DtypeResult]
    noise_floor: dict[str, Scalar] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)  # numerics, benchmarks, gates, ...
    created_utc: str = ""
    evalsuite_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        sections = out.pop("sections")
        out.update(sections)
        return _finite_or_none(out)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


_CORE_KEYS = {f for f in RunResults.__dataclass_fields__}
_DTYPE_KEYS = {f for f in DtypeResult.__dataclass_fields__}  # other keys of an entry (v2's `recipe`) are ignored
READABLE_VERSIONS = (1, 2)  # 2: dtypes keyed by recipe name, an entry may carry a `recipe` dict

# What a reader relies on (docs/results-schema.md); every other key is optional, unknown ones are fine.
_TOP = {"config": dict, "provenance": dict, "model": dict, "corpus": dict, "reference": str, "dtypes": dict}
_TOP_OPTIONAL = {"noise_floor": dict, "created_utc": str, "evalsuite_version": str, "kl_histograms": dict,
                 "worst_tokens": dict, "numerics": dict, "benchmarks": dict, "gates": (dict, list)}
_ENTRY = {"name": str, "role": str, "status": str}
_ENTRY_OPTIONAL = {"message": (str, type(None)), "metrics": dict, "timing": dict, "recipe": (dict, type(None))}
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "true/false",
               int | float: "a number"}


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _kind(v) -> str:
    return next((name for t, name in _TYPE_NAMES.items() if isinstance(v, t)), type(v).__name__)


def _typed(data: dict, required: dict, optional: dict, where: str) -> list[str]:
    """Problems with the keys of one object: a required key missing, a key of the wrong JSON type."""
    absent = [f"{where}{k}" for k in required if k not in data]
    out = [f"{'no key' if len(absent) == 1 else 'no keys'} {', '.join(absent)}"] if absent else []
    for k, t in {**required, **optional}.items():
        if k in data and not isinstance(data[k], t):
            want = " or ".join(_TYPE_NAMES[x] for x in (t if isinstance(t, tuple) else (t,)))
            out.append(f"{where}{k} is {_kind(data[k])}, not {want}")
    return out


def _entry_problems(name: str, d) -> list[str]:
    where = f"dtypes.{name}."
    if not isinstance(d, dict):
        return [f"dtypes.{name} is {_kind(d)}, not an object"]
    out = _typed(d, _ENTRY, _ENTRY_OPTIONAL, where)
    if isinstance(d.get("role"), str) and d["role"] not in ("reference", "test"):
        out.append(f"{where}role is {d['role'][:40]!r}, not 'reference' or 'test'")
    for part in ("metrics", "timing"):
        bad = [k for k, v in (d.get(part) or {}).items() if not _is_scalar(v)] if isinstance(d.get(part), dict) else []
        out += [f"{where}{part}.{bad[0]} is {_kind(d[part][bad[0]])}, not a number, string, true/false or null"] if bad else []
    return out


def problems(data: dict) -> list[str]:
    """Everything that keeps `data` from being read as evalsuite results; [] when it can be.

    Checks what the report and the gates index into, so that what passes here cannot fail them
    with a KeyError or AttributeError; the version is checked first by `check_version`."""
    out = _typed(data, _TOP, _TOP_OPTIONAL, "")
    for name, d in (data["dtypes"] if isinstance(data.get("dtypes"), dict) else {}).items():
        out += _entry_problems(str(name), d)
    if isinstance(data.get("dtypes"), dict) and not data["dtypes"]:
        out.append("dtypes is empty (a run has at least its reference)")
    return out


def check_version(data: dict, source: str) -> None:
    """A file another program wrote, or another evalsuite version, is refused saying which it is."""
    if "schema_version" not in data:
        keys = ", ".join(sorted(map(str, data))[:6]) or "none"
        raise ResultsError(f"{source} is not an evalsuite results file (it has no schema_version; its keys: {keys}); "
                           "pass the results.json that `evalsuite run` wrote")
    version = data["schema_version"]
    readable = " and ".join(map(str, READABLE_VERSIONS))
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ResultsError(f"{source} has schema_version {str(version)[:40]!r}, which no evalsuite writes: it is not "
                           "an evalsuite results file; pass the results.json that `evalsuite run` wrote")
    if version not in READABLE_VERSIONS:
        raise ResultsError(f"{source} has schema_version {version}, written by a newer evalsuite (this one reads "
                           f"{readable}); upgrade evalsuite (pip install -U evalsuite) to read it")


def from_dict(data: dict[str, Any], source: str = "the results file") -> RunResults:
    """Validated results (ResultsError, one line, saying what is wrong when they are not)."""
    if not isinstance(data, dict):
        raise ResultsError(f"{source} does not hold a JSON object; pass the results.json of a run")
    check_version(data, source)
    if not any(k in data for k in _TOP):
        raise ResultsError(f"{source} is not an evalsuite results file (it has none of the keys {', '.join(_TOP)}); "
                           "pass the results.json that `evalsuite run` wrote")
    found = problems(data)
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise ResultsError(f"{source} is not a valid evalsuite results file: {'; '.join(found[:3])}{more}; "
                           "was it edited or cut short? Pass the results.json that `evalsuite run` wrote")
    dtypes = {name: DtypeResult(**{k: v for k, v in d.items() if k in _DTYPE_KEYS}) for name, d in data["dtypes"].items()}
    core = {k: v for k, v in data.items() if k in _CORE_KEYS and k not in ("dtypes", "sections")}
    sections = {k: v for k, v in data.items() if k not in _CORE_KEYS}
    return RunResults(dtypes=dtypes, sections=sections, **core)


def atomic_write(path: Path, write, durable: bool = True) -> None:
    """Call `write(binary_file)` on a temporary file, fsync, then rename over `path`.

    A kill at any moment leaves either the old file or the new one, never half of one.
    `durable=False` skips the fsync (gigabytes of logits that are verified when read back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shared reports unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_results(path: Path, results: RunResults) -> None:
    text = json.dumps(results.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def load_results(path: Path) -> RunResults:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ResultsError(f"results file {path} does not exist; pass the results.json of a run") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"results file {path} is not valid JSON ({exc}); it may be truncated") from exc
    return from_dict(data, f"results file {path}")
