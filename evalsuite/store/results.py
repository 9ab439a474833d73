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
from typing import TYPE_CHECKING, Any

from evalsuite.errors import ResultsError

if TYPE_CHECKING:
    import numpy as np

SCHEMA_VERSION = 2  # 2: results keyed by precision recipe, each with its resolved `recipe`
READABLE_VERSIONS = (1, 2)  # version 1 files (plain dtypes, no `recipe`) are read as they are

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


def from_dict(data: dict[str, Any]) -> RunResults:
    version = data.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ResultsError(
            f"results schema_version {version!r} is not supported (this evalsuite reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); re-run `evalsuite run` with this version"
        )
    try:
        dtypes = {name: DtypeResult(**d) for name, d in data["dtypes"].items()}
        core = {k: v for k, v in data.items() if k in _CORE_KEYS and k not in ("dtypes", "sections")}
        sections = {k: v for k, v in data.items() if k not in _CORE_KEYS}
        return RunResults(dtypes=dtypes, sections=sections, **core)
    except (KeyError, TypeError) as exc:
        raise ResultsError(f"results file is missing or has malformed fields ({exc}); re-run the evaluation") from exc


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
    if not isinstance(data, dict):
        raise ResultsError(f"results file {path} does not hold a JSON object; pass the results.json of a run")
    return from_dict(data)


def compact(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-token arrays for per_token.npz: int64 arrays whose values fit become int32.

    Why not np.savez_compressed: deflating 262,144 tokens' arrays took 1.35 s on a 2-core CPU
    (uncompressed: 0.03 s) for a file half the size; the float64 statistics barely compress.
    """
    import numpy as np  # here, not at the top: `evalsuite report` reads results without numpy

    def fits(a: np.ndarray) -> bool:
        return a.dtype == np.int64 and (a.size == 0 or (int(a.min()) >= -(2**31) and int(a.max()) < 2**31))

    return {k: a.astype(np.int32) if fits(a) else a for k, a in arrays.items()}
