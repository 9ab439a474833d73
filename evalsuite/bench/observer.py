"""Multiple-choice benchmarks through lm-eval at each dtype, on the model the run already loaded.

Work that does not depend on the dtype is done once: `bench_tasks.prepare` (before any model
loads, so a typo in --tasks or a missing data directory costs no model load) resolves the task
names, loads the datasets and builds every request, few-shot contexts included. The runner calls the
observer's `pass_finished` with each dtype's model resident; the observer hands that model to
lm-eval's `HFLM` (no second load, no cast, no move) and asks for the log-likelihood of every
choice (evalsuite/bench/lm.py). The requests are tokenized once, by HFLM's own code on the first
dtype, and reused. `finish` turns the per-question answers into metrics (evalsuite/bench/results.py)
and writes nothing: the per-question records come back in `files` for the caller to write, and
every failure in `failures` (one line each; `failure_traceback` keeps the caught tracebacks for
--debug), so that the run can exit non-zero.

lm-eval is imported only here and only when tasks are asked for, so a run with `--tasks none`
never needs it.
"""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import replace

import numpy as np

from evalsuite.bench.grade import Answers, choice_width, score
from evalsuite.bench.tasks import Plan, plan_signature
from evalsuite.errors import UsageError


class BenchmarkObserver:
    """Runner observer: scores the plan with each dtype's resident model, keeps only numbers.

    Data-parallel (world > 1): this rank scores the questions with index % world == rank (all
    requests of a question together) and snapshots that share; rank 0 `restore`s every other
    rank's snapshots, which merge into its answers, so that `finish` sees every question.
    """

    part = "benchmarks"  # how a failure of this observer is named (passes/observers.py)

    def __init__(self, plan: Plan, cfg, *, rank: int = 0, world: int = 1):
        if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world):
            raise UsageError(f"benchmark shard rank {rank!r} of world {world!r}: need 0 <= rank < world")
        self.plan, self.cfg, self.rank, self.world = plan, cfg, rank, world
        self.mine = np.arange(rank, len(plan.questions), world)  # (q,) the question indices this rank scores
        self.answers: dict[str, Answers] = {}  # (Q,) rows; only those in self.scored hold answers
        self.scored: dict[str, np.ndarray] = {}  # (Q,) bool per dtype: questions answered (own or merged)
        self.runs: dict[str, dict[int, dict]] = {}  # dtype -> rank -> {seconds, batch_size, batch_size_start, n}
        self.roles: dict[str, str] = {}
        self.failed: dict[str, str] = {}  # dtype -> one line
        self.tracebacks: dict[str, str] = {}  # dtype -> the caught exception's traceback (for --debug)
        self.failures: list[str] = []  # set by finish: one line per failed part, empty when all went well
        self.files: dict[str, str] = {}  # set by finish: file name in --out -> its UTF-8 text
        self.prefix: dict | None = None  # bench_prefix.Prefix.to_dict() of the token before an empty context
        self._tokenizer = None  # a private copy: HFLM may set a pad token on the one it gets
        self._schedule = None  # bench_lm.Schedule: this rank's requests tokenized, grouped, sorted (first dtype)
        self._prefix_id: int | None = None  # chosen with the private tokenizer, before HFLM adds a pad token
        self.signature = plan_signature(plan)

    def _instances(self) -> list:
        """This rank's requests, question by question in plan order."""
        qs = self.plan.questions
        return [inst for i in self.mine for inst in self.plan.instances[qs[i].start : qs[i].stop]]

    def pass_finished(self, ctx) -> None:
        if ctx.segment != 0:
            return
        from evalsuite.log import say

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
            self.failed[name] = _one_line(exc)
            self.tracebacks[name] = traceback.format_exc()
            say(f"{name} benchmarks failed: {self.failed[name]}")

    def _score(self, ctx) -> tuple[Answers, dict]:
        """This rank's answers with the resident model, and how they were computed. The clock
        starts after the one-time tokenizing, so every dtype's questions/s counts the same work."""
        from evalsuite.bench import lm as bench_lm
        from evalsuite.bench import prefix as bench_prefix

        if self._tokenizer is None:
            tokenizer = _private(ctx.tokenizer)
            prefix = bench_prefix.prefix_token(tokenizer, bench_prefix.embedding_rows(ctx.model))
            self._tokenizer, self._prefix_id, self.prefix = tokenizer, prefix.id, prefix.to_dict()
        lm = bench_lm.make_lm(ctx.model, self._tokenizer, prefix=self._prefix_id)
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
                "batch_size_start": run["batch_size_start"], "prefix": self.prefix, **shard}

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
        if self.prefix is None and isinstance(snap.get("prefix"), dict):
            self.prefix = snap["prefix"]
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
        """(metric additions by dtype, {"benchmarks": section}); sets `files` (benchmarks.jsonl's
        text, for the caller to write into --out) and `failures` (one line per failed dtype, or for
        scoring that failed as a whole; the section then has status "failed" and `error`)."""
        from evalsuite.bench.results import build

        answers, failed = self._complete()
        roles = {n: r for n, r in self.roles.items() if n in answers}
        try:
            metrics, sections, self.files = build(self.plan, answers, roles, failed, prefix=self.prefix,
                                                  timing={n: self.timing(n) for n in answers})
        except Exception as exc:  # a bug here must not cost the perplexity results, nor pass silently
            self.tracebacks["(all)"] = traceback.format_exc()
            error = f"scoring the answers failed: {_one_line(exc)}"
            metrics, sections, self.files = {}, {"benchmarks": {"status": "failed", "error": error,
                                                               "tasks": list(self.plan.tasks), "failed": failed}}, {}
            failed = {**failed, "(all)": error}
        self.failures = [f"benchmarks {name}: {why}" if name != "(all)" else f"benchmarks: {why}"
                         for name, why in failed.items()]
        return metrics, sections

    @property
    def failure_traceback(self) -> str | None:
        """Every traceback caught in this process, for --debug (failures restored from a saved pass
        or another rank have none)."""
        return "\n".join(f"benchmarks {name}:\n{tb}" for name, tb in self.tracebacks.items()) or None


def _one_line(exc: BaseException) -> str:
    """`Type: first line of the message` (or the type alone)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _private(tokenizer):
    """The tokenizer HFLM may change: a copy only where it would (lm-eval's configure_pad_token sets a
    pad token where there is none; its padding_side changes are undone within each call).

    Why not always a copy: deep-copying a 262,144-entry tokenizer (Gemma 3) takes several seconds
    of Python object copying on a CPU, once per run, for nothing when it has a pad token.
    """
    if getattr(tokenizer, "pad_token_id", None) is not None or getattr(tokenizer, "pad_token", None):
        return tokenizer
    return copy.deepcopy(tokenizer)

