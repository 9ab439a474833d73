"""Multiple-choice benchmarks through lm-eval at each dtype, on the model the run already loaded.

Work that does not depend on the dtype is done once: `prepare` (before any model loads, so a
typo in --tasks or a missing data directory costs no model load) resolves the task names, loads
the datasets and builds every request, few-shot contexts included. The runner then calls the
observer's `pass_finished` with each dtype's model resident; the observer hands that model to
lm-eval's `HFLM` (no second load, no cast, no move) and asks for the log-likelihood of every
choice (evalsuite/bench_lm.py). The requests are tokenized once, by HFLM's own code on the first
dtype, and reused. `finish` turns the per-question answers into metrics (evalsuite/bench_results.py).

lm-eval is imported only here and only when tasks are asked for, so a run with `--tasks none`
never needs it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from evalsuite.bench_lm import Answers, choice_width, score
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
    here = Path(__file__).resolve().parent
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


class BenchmarkObserver:
    """Runner observer: scores the plan with each dtype's resident model, keeps only numbers.

    Data-parallel (world > 1): this rank scores the questions with index % world == rank (all
    requests of a question together) and snapshots that share; rank 0 `restore`s every other
    rank's snapshots, which merge into its answers, so that `finish` sees every question.
    """

    def __init__(self, plan: Plan, cfg, *, rank: int = 0, world: int = 1):
        if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world):
            raise UsageError(f"benchmark shard rank {rank!r} of world {world!r}: need 0 <= rank < world")
        self.plan, self.cfg, self.rank, self.world = plan, cfg, rank, world
        self.mine = np.arange(rank, len(plan.questions), world)  # (q,) the question indices this rank scores
        self.answers: dict[str, Answers] = {}  # (Q,) rows; only those in self.scored hold answers
        self.scored: dict[str, np.ndarray] = {}  # (Q,) bool per dtype: questions answered (own or merged)
        self.runs: dict[str, dict[int, dict]] = {}  # dtype -> rank -> {seconds, batch_size, batch_size_start, n}
        self.roles: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self._tokenizer = None  # a private copy: HFLM may set a pad token on the one it gets
        self._schedule = None  # bench_lm.Schedule: this rank's requests tokenized, grouped, sorted (first dtype)
        self.signature = plan_signature(plan)

    def _instances(self) -> list:
        """This rank's requests, question by question in plan order."""
        qs = self.plan.questions
        return [inst for i in self.mine for inst in self.plan.instances[qs[i].start : qs[i].stop]]

    def pass_finished(self, ctx) -> None:
        if ctx.segment != 0:
            return
        from evalsuite.runner import say

        name = ctx.precision.name
        shard = f" (rank {self.rank} of {self.world}: {len(self.mine)} questions)" if self.world > 1 else ""
        say(f"{name}: {len(self.plan.questions)} benchmark questions ({len(self.plan.instances)} requests){shard}")
        try:
            answers, run = self._score(ctx)
            self._merge(name, ctx.role, self.mine, answers.correct, answers.choice_ll, self.rank, run)
            say(f"{name}: benchmark batch size {run['batch_size']}"
                + (f" (from {run['batch_size_start']} after out-of-memory)"
                   if run["batch_size"] != run["batch_size_start"] else "")
                + f", {len(self.mine) / max(run['seconds'], 1e-9):.1f} questions/s")
        except Exception as exc:  # benchmarks are a part of the run: the perplexity results go on
            self.failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            say(f"{name} benchmarks failed: {self.failed[name]}")

    def _score(self, ctx) -> tuple[Answers, dict]:
        """This rank's answers with the resident model, and how they were computed. The clock
        starts after the one-time tokenizing, so every dtype's questions/s counts the same work."""
        from evalsuite import bench_lm

        if self._tokenizer is None:
            self._tokenizer = copy.deepcopy(ctx.tokenizer)
        lm = bench_lm.make_lm(ctx.model, self._tokenizer)
        try:
            if self._schedule is None:
                self._schedule = bench_lm.schedule(lm, bench_lm.tokenize(lm, self._instances()))
            t0 = time.perf_counter()
            start = self.cfg.batch_size or bench_lm.start_batch(ctx.model, self._schedule, ctx.device)
            out = bench_lm.loglikelihoods(lm, self._schedule, start, self.cfg.progress)
            answers = score(self.plan, out.results, questions=self.mine)
            seconds = time.perf_counter() - t0
        finally:
            del lm  # no reference to the model outlives this pass
        return answers, {"seconds": seconds, "batch_size": out.batch_size, "batch_size_start": out.batch_size_start,
                         "n": len(self.mine)}

    def _merge(self, name: str, role: str, idx: np.ndarray, correct, choice_ll, rank: int, run: dict) -> None:
        """Write the answers to questions `idx` ((q,), (q,), (q, C)) into this dtype's (Q,) rows."""
        q, width = len(self.plan.questions), choice_width(self.plan)
        if name not in self.answers:
            self.answers[name] = Answers(np.zeros(q, bool), np.full((q, width), -np.inf), 0.0)
            self.scored[name] = np.zeros(q, bool)
        a = self.answers[name]
        a.correct[idx], a.choice_ll[idx], self.scored[name][idx] = correct, choice_ll, True
        self.runs.setdefault(name, {})[rank] = run
        self.roles[name] = role

    def snapshot(self, ctx) -> dict | None:
        """This rank's answers of this dtype, saved with its pass so that a resumed run need not score
        it again, and sent to rank 0 in a data-parallel run (restore merges them there)."""
        name = ctx.precision.name
        if ctx.segment != 0:
            return None
        shard = {"rank": self.rank, "world": self.world, "questions": self.mine.tolist()} if self.world > 1 else {}
        if name in self.failed:
            return {"signature": self.signature, "failed": self.failed[name], **shard}
        a, run = self.answers.get(name), self.runs.get(name, {}).get(self.rank)
        if a is None or run is None:
            return None
        return {"signature": self.signature, "correct": a.correct[self.mine].astype(int).tolist(),
                "choice_ll": a.choice_ll[self.mine].tolist(),  # json keeps -Infinity and NaN
                "seconds": run["seconds"], "batch_size": run["batch_size"],
                "batch_size_start": run["batch_size_start"], **shard}

    def restore(self, ctx, snap) -> None:
        """A saved pass's answers (a resumed run), or another rank's share (data-parallel rank 0):
        a snapshot with `questions` merges into this dtype's answers, one without replaces them.
        A snapshot of other benchmark settings is not used."""
        name = ctx.precision.name
        if ctx.segment != 0 or not isinstance(snap, dict):
            return
        rank = snap.get("rank", 0)
        where = f"rank {rank}: " if rank != self.rank else ""
        if snap.get("signature") != self.signature:
            self.failed[name] = (f"{where}its saved pass was scored with other --tasks/--limit/--num-fewshot; "
                                 "rerun with --fresh to score it again")
            return
        if "failed" in snap:
            self.failed[name] = where + str(snap["failed"])
            return
        try:
            idx, correct, choice_ll = self._unpack(snap)
            rank = int(rank)
        except (TypeError, ValueError, KeyError) as exc:
            self.failed[name] = f"{where}its saved benchmark answers do not fit the plan ({exc}); rerun with --fresh"
            return
        if "questions" not in snap:  # a whole run's answers: they replace whatever was there
            for held in (self.answers, self.scored, self.runs):
                held.pop(name, None)
        run = {"seconds": float(snap.get("seconds", 0.0)), "batch_size": snap.get("batch_size"),
               "batch_size_start": snap.get("batch_size_start", snap.get("batch_size")), "n": len(idx)}
        self._merge(name, ctx.role, idx, correct, choice_ll, rank, run)

    def _unpack(self, snap: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(question indices (q,), correct (q,), choice_ll (q, C)) of a snapshot, checked against the plan."""
        q, width = len(self.plan.questions), choice_width(self.plan)
        idx = np.array(snap["questions"], np.int64) if "questions" in snap else np.arange(q)
        correct = np.array(snap["correct"], bool)
        choice_ll = np.array(snap["choice_ll"], float).reshape(len(correct), width)
        if idx.ndim != 1 or len(idx) != len(correct) or (len(idx) and (idx.min() < 0 or idx.max() >= q)):
            raise ValueError(f"{len(correct)} answers for {len(idx)} of {q} questions")
        return idx, correct, choice_ll

    def _complete(self) -> tuple[dict[str, Answers], dict[str, str]]:
        """The dtypes whose every question has an answer; the others join `failed` (a rank's share
        that never arrived would otherwise pass for the whole benchmark)."""
        answers, failed = {}, dict(self.failed)
        for name, a in self.answers.items():
            if name in failed:
                continue
            missing = int((~self.scored[name]).sum())
            if missing:
                ranks = sorted(set(range(self.world)) - set(self.runs.get(name, {})))
                failed[name] = (f"{missing} of {len(self.plan.questions)} questions have no answers (no share from "
                                f"rank(s) {', '.join(map(str, ranks)) or '?'})")
            else:
                answers[name] = replace(a, seconds=self.timing(name)["score_s"])
        return answers, failed

    def timing(self, name: str) -> dict:
        """One dtype's scoring time and batch size: over ranks, the slowest time (the wall time of
        the data-parallel pass) and the smallest batch size."""
        runs = list(self.runs.get(name, {}).values())
        seconds = max((r["seconds"] for r in runs), default=0.0)
        sizes = [r["batch_size"] for r in runs if isinstance(r.get("batch_size"), int)]
        starts = [r["batch_size_start"] for r in runs if isinstance(r.get("batch_size_start"), int)]
        out = {"score_s": seconds, "questions_per_s": len(self.plan.questions) / seconds if seconds > 0 else None,
               "batch_size": min(sizes) if sizes else None, "batch_size_start": max(starts) if starts else None,
               "ranks": len(runs)}
        if len(runs) > 1:
            out["by_rank"] = {str(r): v for r, v in sorted(self.runs[name].items())}
        return out

    def finish(self, metrics_by_dtype: dict) -> tuple[dict, dict]:
        from evalsuite.bench_results import build

        answers, failed = self._complete()
        roles = {n: r for n, r in self.roles.items() if n in answers}
        return build(self.plan, answers, roles, failed, self.cfg, timing={n: self.timing(n) for n in answers})
