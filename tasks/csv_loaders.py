"""Datasets for the offline task YAMLs in this folder (lm-eval calls these via `custom_dataset`).

lm-eval calls `load_*(**metadata, **dataset_kwargs)`: `subject` comes from each task YAML's
`dataset_kwargs`, the data directory from the run's metadata (`cmmlu_dir`, `ceval_dir`: evalsuite's
`--cmmlu-dir`/`--ceval-dir`, or `lm_eval --metadata '{"cmmlu_dir": "DIR"}'`) or an environment
variable (`EVALSUITE_CMMLU_DIR`, `EVALSUITE_CEVAL_DIR`). Rows are read with the csv module and kept
as strings, exactly as the Hub copies hold them, so the prompts equal lm-eval's own `cmmlu` and
`ceval-valid` tasks.

This file must not need evalsuite (plain `lm_eval --include_path tasks/` uses it), but when
evalsuite is importable its errors join evalsuite's family, so `evalsuite run` reports them as
one line with exit code 2 instead of a traceback.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

try:
    from evalsuite.errors import UsageError as _Base
except ImportError:  # plain lm-eval without evalsuite
    _Base = ValueError

HERE = Path(__file__).resolve().parent
LETTERS = ("A", "B", "C", "D")
CMMLU_COLUMNS = ("Question", "A", "B", "C", "D", "Answer")
CEVAL_COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")
ZH_MC_COLUMNS = ("id", "subject", "split", "question", "A", "B", "C", "D", "answer")
ZH_MC_FILE = HERE / "zh_mc" / "zh_mc.csv"


class TaskDataError(_Base):
    """A task's local data is missing or malformed; the message names the file and the fix."""


def read_rows(path: Path, columns: tuple[str, ...], answer: str) -> list[dict[str, str]]:
    """The rows of one CSV as dicts of the named columns; errors name the file and the row."""
    if not path.is_file():
        raise TaskDataError(f"task data file {path} does not exist")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise TaskDataError(f"{path} lacks column(s) {', '.join(missing)} (expected {','.join(columns)}; "
                                    f"found {','.join(header) or 'no header'})")
            rows = [{c: row[c] for c in columns} for row in reader]
    except UnicodeDecodeError as exc:
        raise TaskDataError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise TaskDataError(f"{path} is not a readable CSV ({exc})") from exc
    for i, row in enumerate(rows, start=2):
        if any(v is None for v in row.values()):
            raise TaskDataError(f"{path} line {i} has fewer fields than the header")
        if row[answer].strip() not in LETTERS:
            raise TaskDataError(f"{path} line {i}: answer {row[answer]!r} is not one of A, B, C, D")
        row[answer] = row[answer].strip()
    if not rows:
        raise TaskDataError(f"{path} has no rows")
    return rows


def data_dir(key: str, env: str, what: str, given=None) -> Path:
    """The directory from metadata, else the environment; a one-line error naming both ways."""
    value = given or os.environ.get(env)
    how = (f"pass evalsuite --{key.replace('_', '-')} DIR, set {env}=DIR, "
           f"or lm_eval --metadata '{{\"{key}\": \"DIR\"}}'")
    if not value:
        raise TaskDataError(f"no {what} data directory given: {how}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise TaskDataError(f"{what} data directory {path} does not exist: {how}")
    return path


def _dataset(splits: dict[str, list[dict[str, str]]]):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def load_cmmlu(subject: str, cmmlu_dir: str | None = None, **_):
    """CMMLU in the authors' layout: dev/<subject>.csv (few-shot) and test/<subject>.csv."""
    root = data_dir("cmmlu_dir", "EVALSUITE_CMMLU_DIR", "CMMLU", cmmlu_dir)
    return _dataset({split: read_rows(root / split / f"{subject}.csv", CMMLU_COLUMNS, "Answer")
                     for split in ("dev", "test")})


def load_ceval(subject: str, ceval_dir: str | None = None, **_):
    """C-Eval in the authors' layout: dev/<subject>_dev.csv (few-shot) and val/<subject>_val.csv."""
    root = data_dir("ceval_dir", "EVALSUITE_CEVAL_DIR", "C-Eval", ceval_dir)
    return _dataset({split: read_rows(root / split / f"{subject}_{split}.csv", CEVAL_COLUMNS, "answer")
                     for split in ("dev", "val")})


def load_zh_mc(subject: str, **_):
    """The project's own questions (zh_mc/zh_mc.csv): one subject's dev and test rows."""
    rows = read_rows(ZH_MC_FILE, ZH_MC_COLUMNS, "answer")
    splits = {split: [r for r in rows if r["subject"] == subject and r["split"] == split] for split in ("dev", "test")}
    if not splits["test"]:
        raise TaskDataError(f"{ZH_MC_FILE} has no test rows for subject {subject!r}")
    return _dataset(splits)
