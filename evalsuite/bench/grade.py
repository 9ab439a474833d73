"""Grading: one dtype's log-likelihoods of every choice turned into answers, by lm-eval's own rules.

Why through each task's filters and `process_results` rather than an argmax here: a task's YAML
decides what counts as correct (acc vs acc_norm, filters), and the answers must equal what
`lm_eval.simple_evaluate` would report for the same log-likelihoods (tests/bench/test_benchmarks.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from evalsuite.bench.tasks import Plan


@dataclass(frozen=True)
class Answers:
    """One dtype's answers to the questions of the plan (all, or one data-parallel rank's share)."""

    correct: np.ndarray  # (Q,) bool: lm-eval's acc per question
    choice_ll: np.ndarray  # (Q, C) float64 log-likelihood of each choice; -inf pads questions with fewer
    seconds: float


def choice_width(plan: Plan) -> int:
    """C: the most choices of any question of the plan (every rank pads to the same width)."""
    return max((len(q.choices) for q in plan.questions), default=0)


def _apply_filters(plan: Plan, questions) -> None:
    """Each task's filters over the requests of `questions` only: lm-eval's `task.apply_filters`
    runs them over all of a task's requests, but a rank holds responses for its own share."""
    by_task: dict[str, list] = {}
    for i in questions:
        q = plan.questions[i]
        by_task.setdefault(q.subject, []).extend(plan.instances[q.start : q.stop])
    for subject, insts in by_task.items():
        for f in getattr(plan.task_objs[subject], "_filters", ()):
            f.apply(insts)  # FilterEnsemble: per request, into inst.filtered_resps[f.name]


def score(plan: Plan, results: list[tuple[float, bool]], seconds: float = 0.0, questions=None) -> Answers:
    """Answers to `questions` (indices into plan.questions, default all; the answers' rows follow
    it) from the flat (loglik, is_greedy) results of their requests, in plan order, scored by each
    task's own filters and process_results, exactly as lm-eval's evaluator does."""
    questions = range(len(plan.questions)) if questions is None else [int(i) for i in questions]
    insts = [inst for i in questions for inst in plan.instances[plan.questions[i].start : plan.questions[i].stop]]
    for inst, res in zip(insts, results, strict=True):
        inst.resps = [res]
    _apply_filters(plan, questions)
    correct = np.zeros(len(questions), bool)
    choice_ll = np.full((len(questions), choice_width(plan)), -np.inf)
    for row, i in enumerate(questions):
        q = plan.questions[i]
        insts = plan.instances[q.start : q.stop]
        key = next(iter(insts[0].filtered_resps))
        filtered = [inst.filtered_resps[key] for inst in insts]
        lls = np.array([r[0] if isinstance(r, tuple | list) else r for r in filtered[: len(q.choices)]], float)
        choice_ll[row, : len(lls)] = lls
        metrics = plan.task_objs[q.subject].process_results(insts[0].doc, filtered)
        correct[row] = bool(metrics["acc"]) if "acc" in metrics else int(np.argmax(lls)) == q.gold
    return Answers(correct, choice_ll, seconds)
