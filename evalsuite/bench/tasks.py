"""Benchmark tasks resolved, loaded and turned into lm-eval requests once per run, before any model.

Why before: a typo in --tasks or a missing data directory then costs no model load, and the
requests (few-shot contexts included) do not depend on the dtype, so every dtype's pass reuses
them (benchmarks.py scores them, bench_lm.py runs them through lm-eval's HFLM).
lm-eval is imported only inside `prepare`, so a run with `--tasks none` never needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evalsuite.errors import EvalsuiteError, MissingExtraError, UsageError

TASKS_ENV = "EVALSUITE_TASKS_DIR"
DEFAULT_TASKS = ("zh_mc",)
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed: the same few-shot contexts as plain lm_eval
_NOISE = ("Custom kwargs can be passed", "`pretrained` model kwarg is not of type",
          "Passed an already-initialized model")


class BenchmarkError(EvalsuiteError):
    """A benchmark could not be prepared (e.g. a Hub dataset that cannot be downloaded)."""


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """--tasks as a tuple of names: 'none' (or empty) is no benchmarks; duplicates dropped."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if names in ([], ["none"]):
        return ()
    if "none" in names:
        raise UsageError("--tasks none cannot be combined with task names")
    return tuple(dict.fromkeys(names))


def tasks_dir() -> Path:
    """The project's task YAMLs: $EVALSUITE_TASKS_DIR, else the copy inside an installed wheel
    (evalsuite/tasks), else tasks/ at the root of a source checkout or editable install."""
    env = os.environ.get(TASKS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise UsageError(f"{TASKS_ENV}={env} is not a directory; point it at the tasks/ folder or unset it")
        return path
    here = Path(__file__).resolve().parents[1]  # the evalsuite package
    for path in (here / "tasks", here.parent / "tasks"):
        if (path / "csv_loaders.py").is_file():
            return path
    raise BenchmarkError(f"evalsuite's task folder is missing (looked in {here / 'tasks'} and {here.parent / 'tasks'}); "
                         f"set {TASKS_ENV} to the tasks/ folder of a checkout")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; its requests are plan.instances[start:stop] (one per choice,
    then any extra lm-eval asks for, e.g. unconditional ones for acc_mutual_info)."""

    task: str  # the name given to --tasks (a group or a task)
    subject: str  # the lm-eval task the question belongs to (a group's subtask)
    doc_id: int
    question: str  # the prompt of this question alone, without description or few-shot examples
    choices: tuple[str, ...]
    gold: int  # index into choices; -1 if lm-eval's target is not a single choice
    start: int
    stop: int


@dataclass(frozen=True)
class Plan:
    """Everything dtype-independent: questions, their lm-eval requests, and how they were built."""

    tasks: tuple[str, ...]
    questions: tuple[Question, ...]
    instances: tuple  # lm_eval Instance objects, in question order
    task_objs: dict  # subject -> lm_eval Task (its filters and process_results)
    settings: dict


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(s in str(record.msg) for s in _NOISE)


def _quiet_lm_eval() -> None:
    """Drop lm-eval's per-task warnings that are expected here (custom datasets, a passed-in model)."""
    for name in ("lm_eval.api.task", "lm_eval.models.huggingface"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


def _task_manager(names: tuple[str, ...], metadata: dict):
    """The project's tasks alone index in milliseconds; lm-eval's ~15k built-in names take seconds,
    so they are indexed only when a name is not one of ours."""
    from lm_eval.tasks import TaskManager

    local = tasks_dir()
    tm = TaskManager(include_path=str(local), include_defaults=False, metadata=metadata)
    if all(n in tm.all_tasks for n in names):
        return tm
    tm = TaskManager(include_path=str(local), metadata=metadata)
    for name in names:
        if name not in tm.all_tasks and not (name.endswith(".yaml") and Path(name).is_file()):
            import difflib

            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see `lm_eval ls tasks`"
            raise UsageError(f"unknown task {name!r} for --tasks ({hint}); or --tasks none to skip benchmarks")
    return tm


def list_tasks(include_lm_eval: bool = False) -> list[tuple[str, str, str]]:
    """(name, "group" | "task" | "tag", "evalsuite" | "lm-eval") for every name --tasks accepts, sorted."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise MissingExtraError("listing tasks needs lm-eval: pip install 'lm-eval>=0.4.13,<0.5'") from exc
    local = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    ours = set(local.all_tasks)
    tm = TaskManager(include_path=str(tasks_dir())) if include_lm_eval else local
    kinds = [(set(tm.all_groups), "group"), (set(tm.all_tags), "tag")]
    rows = []
    for name in tm.all_tasks:
        kind = next((k for names, k in kinds if name in names), "task")
        rows.append((name, kind, "evalsuite" if name in ours else "lm-eval"))
    return sorted(rows, key=lambda r: (r[2] != "evalsuite", r[0]))


def _load(tm, name: str) -> list:
    """The leaf Task objects of one --tasks name; load errors become one-line errors."""
    try:
        loaded = tm.load([name])
    except EvalsuiteError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BenchmarkError(f"cannot load task {name!r} ({type(exc).__name__}: {first}); Hub datasets need "
                             f"network access: the offline variants cmmlu_local and ceval-valid_local read "
                             f"local CSVs (docs/benchmarks.md)") from exc
    tasks = list(loaded["tasks"].values())
    for task in tasks:
        if task.OUTPUT_TYPE != "multiple_choice":
            raise UsageError(f"task {task.config.task!r} (from --tasks {name}) is a {task.OUTPUT_TYPE} task; "
                             f"evalsuite scores multiple-choice tasks only")
    return tasks


def _configure(task, num_fewshot: int | None) -> None:
    """--num-fewshot as lm-eval's simple_evaluate applies it: a task pinned to 0 shots stays at 0."""
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)


def _gold(task, doc, choices: list) -> int:
    target = task.doc_to_target(doc)
    if isinstance(target, str) and target in choices:
        return choices.index(target)
    if isinstance(target, int | np.integer) and 0 <= int(target) < len(choices):
        return int(target)
    return -1


def prepare(cfg) -> Plan:
    """Resolve, load and build every task of `cfg.tasks` once (no model needed)."""
    try:
        import lm_eval
        from lm_eval.evaluator_utils import get_sample_size
    except ImportError as exc:
        raise MissingExtraError(f"benchmarks need lm-eval, which cannot be imported ({exc}): "
                                f"pip install 'lm-eval>=0.4.13,<0.5', or pass --tasks none") from exc
    _quiet_lm_eval()
    metadata = {k: str(v) for k, v in (("cmmlu_dir", cfg.cmmlu_dir), ("ceval_dir", cfg.ceval_dir)) if v is not None}
    tm = _task_manager(cfg.tasks, metadata)
    questions, instances, task_objs, seen = [], [], {}, {}
    for name in cfg.tasks:
        for task in _load(tm, name):
            subject = task.config.task
            if subject in seen:
                raise UsageError(f"task {subject!r} is part of both {seen[subject]!r} and {name!r} in --tasks; give it once")
            seen[subject] = name
            _configure(task, cfg.num_fewshot)
            try:
                with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # one progress bar per task
                    task.build_all_requests(limit=get_sample_size(task, cfg.limit))
            except EvalsuiteError:
                raise
            except Exception as exc:
                raise UsageError(f"cannot build the requests of task {subject!r}: {type(exc).__name__}: {exc}") from exc
            task_objs[subject] = task
            by_doc = defaultdict(list)
            for inst in task.instances:
                by_doc[inst.doc_id].append(inst)
            for doc_id in sorted(by_doc):
                insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
                doc = insts[0].doc
                choices = [str(c) for c in task.doc_to_choice(doc)]
                questions.append(Question(name, subject, int(doc_id), str(task.doc_to_text(doc)).strip(),
                                          tuple(choices), _gold(task, doc, choices), len(instances),
                                          len(instances) + len(insts)))
                instances.extend(insts)
    settings = {"num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "fewshot_seed": FEWSHOT_SEED,
                "tasks_dir": str(tasks_dir()), "lm_eval_version": getattr(lm_eval, "__version__", None),
                **{k: v for k, v in metadata.items()}}
    return Plan(cfg.tasks, tuple(questions), tuple(instances), task_objs, settings)


def plan_signature(plan: Plan) -> str:
    """What a saved pass's answers must match to be reused: the settings and every question."""
    import hashlib
    import json

    questions = [(q.subject, q.doc_id, q.question, q.choices, q.gold) for q in plan.questions]
    text = json.dumps([plan.tasks, plan.settings, questions], ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
