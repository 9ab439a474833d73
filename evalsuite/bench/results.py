"""Benchmark answers -> each dtype's metrics, the `benchmarks` section and benchmarks.jsonl's text.

Metrics (flat, per --tasks name; docs/benchmarks.md): every dtype gets `acc/<task>`,
`acc_se/<task>` and `bench_nonfinite/<task>` (questions whose choices' log-likelihoods are not
all finite: they have no answer and are left out of every statistic); each test dtype also gets
`delta_acc/<task>` (with `delta_acc_ci_low/<task>`, `delta_acc_ci_high/<task>`), `flips/<task>`
(the share of questions whose correctness changed), `mcnemar_p/<task>`, `choice_kl/<task>` and
`choice_agreement/<task>`, over the questions both it and the reference answered (NaN when there
is none, so that no gate passes on them); every dtype scored in this run (or restored with its
time) gets `bench_questions_per_s`, over all tasks together: the tasks' requests share batches, so
a per-task time would only be an apportioned guess. The section repeats them per subject of a
group, with the flip counts, and lists the flipped questions, so the report can be rendered from
results.json alone; benchmarks.jsonl keeps every question with every dtype's answer. Nothing is
written here: `build` returns the file's text for the caller to write.
"""

from __future__ import annotations

import json
import math

import numpy as np

from evalsuite.bench import stats as bench_stats

RECORDS_FILE = "benchmarks.jsonl"
MAX_FLIPPED = 200  # flipped questions per test dtype kept in results.json; all are in benchmarks.jsonl


def _row(task: str, subject: str | None, idx: np.ndarray, answers: dict, ok: dict, ref: str | None,
         tests: list[str]) -> dict:
    """Accuracy per dtype over the questions of `idx` it answered (`ok[dtype]`, (Q,) bool), and the
    paired statistics per test dtype over those both it and the reference answered."""
    row = {"task": task, "subject": subject, "n": int(len(idx)), "acc": {}, "vs_reference": {}}
    for name, a in answers.items():
        sel = idx[ok[name][idx]]
        acc, se = bench_stats.accuracy(a.correct[sel])
        row["acc"][name] = {"acc": acc, "acc_se": se, "n": int(len(sel)),
                            "tied_top": int(bench_stats.tied_top(a.choice_ll[sel]).sum()),
                            "nonfinite": int(len(idx) - len(sel))}  # questions without an answer
    for name in tests:
        r, t = answers[ref], answers[name]
        sel = idx[ok[ref][idx] & ok[name][idx]]
        p = bench_stats.paired(r.correct[sel], t.correct[sel], r.choice_ll[sel], t.choice_ll[sel])
        row["vs_reference"][name] = {
            "n": p.n, "excluded": int(len(idx) - p.n),
            "delta_acc": p.delta_acc, "delta_acc_ci": list(p.delta_acc_ci), "correct_to_wrong": p.correct_to_wrong,
            "wrong_to_correct": p.wrong_to_correct, "flips": p.flips, "flip_rate": p.flip_rate,
            "mcnemar_p": p.mcnemar_p, "choice_kl": p.choice_kl, "choice_agreement": p.choice_agreement}
    return row


def _metrics(rows: list[dict], ref: str | None) -> dict[str, dict]:
    """The flat metric names of the rows for whole --tasks names (not their subjects)."""
    out: dict[str, dict] = {}
    for row in rows:
        if row["subject"] is not None:
            continue
        task = row["task"]
        for name, a in row["acc"].items():
            out.setdefault(name, {}).update({f"acc/{task}": a["acc"], f"acc_se/{task}": a["acc_se"],
                                             f"bench_nonfinite/{task}": a["nonfinite"]})
        for name, v in row["vs_reference"].items():
            out[name].update({f"delta_acc/{task}": v["delta_acc"], f"delta_acc_ci_low/{task}": v["delta_acc_ci"][0],
                              f"delta_acc_ci_high/{task}": v["delta_acc_ci"][1], f"flips/{task}": v["flip_rate"],
                              f"mcnemar_p/{task}": v["mcnemar_p"], f"choice_kl/{task}": v["choice_kl"],
                              f"choice_agreement/{task}": v["choice_agreement"]})
    return out


def _answer(a, i: int, n_choices: int, ok: bool) -> dict:
    """One dtype's answer to question i; a question without finite log-likelihoods has none
    (choice and correct null, `nonfinite` true) rather than np.argmax's first choice."""
    ll = a.choice_ll[i, :n_choices]  # the rest is padding
    return {"choice": int(np.argmax(ll)) if ok and n_choices else None, "correct": bool(a.correct[i]) if ok else None,
            "nonfinite": not ok, "loglik": [float(x) if math.isfinite(x) else None for x in ll]}  # None: ±inf or NaN


def records(plan, answers: dict, ok: dict) -> list[dict]:
    """One record per question: the question, its choices and gold, and every dtype's answer."""
    return [{"task": q.task, "subject": q.subject, "doc_id": q.doc_id, "question": q.question,
             "choices": list(q.choices), "gold": q.gold,
             "answers": {n: _answer(a, i, len(q.choices), bool(ok[n][i])) for n, a in answers.items()}}
            for i, q in enumerate(plan.questions)]


def flipped(recs: list[dict], ref: str, test: str) -> list[dict]:
    """The records whose correctness differs between the reference and `test` (both answered),
    marked with the direction."""
    out = []
    for r in recs:
        a, b = r["answers"][ref], r["answers"][test]
        if not (a["nonfinite"] or b["nonfinite"]) and a["correct"] != b["correct"]:
            out.append({**{k: r[k] for k in ("task", "subject", "doc_id", "question", "choices", "gold")},
                        "direction": "correct→wrong" if a["correct"] else "wrong→correct",
                        "reference_choice": a["choice"], "test_choice": b["choice"],
                        "reference_loglik": a["loglik"], "test_loglik": b["loglik"]})
    return out


def _timing(answers: dict, n_questions: int, timing: dict | None) -> dict[str, dict]:
    """Per dtype: scoring seconds, questions/s and batch sizes (see BenchmarkObserver.timing);
    without `timing`, from the answers' seconds alone."""
    out = {}
    for name, a in answers.items():
        t = dict((timing or {}).get(name) or {})
        seconds = float(t.get("score_s", a.seconds) or 0.0)
        out[name] = {"score_s": seconds, "questions_per_s": n_questions / seconds if seconds > 0 else None,
                     "batch_size": t.get("batch_size"), "batch_size_start": t.get("batch_size_start"),
                     "ranks": t.get("ranks", 1), **({"by_rank": t["by_rank"]} if "by_rank" in t else {})}
    return out


def _speed_metrics(metrics: dict[str, dict], timing: dict[str, dict]) -> None:
    """`bench_questions_per_s` per dtype, where its scoring time is known."""
    for name, t in timing.items():
        if t["questions_per_s"] is not None:
            metrics.setdefault(name, {})["bench_questions_per_s"] = t["questions_per_s"]


def _error(failed: dict[str, str]) -> str | None:
    """One line for every failed dtype, dtypes with the same reason named together."""
    by_reason: dict[str, list[str]] = {}
    for name, why in failed.items():
        by_reason.setdefault(why, []).append(name)
    return "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items()) or None


def build(plan, answers: dict, roles: dict, failed: dict, timing: dict | None = None,
          prefix: dict | None = None) -> tuple[dict, dict, dict[str, str]]:
    """(metric additions by dtype, {"benchmarks": section}, {RECORDS_FILE: its text}).
    `timing`: per dtype, {score_s, batch_size, batch_size_start, ranks[, by_rank]} (the observer's);
    `prefix`: the token lm-eval put before an empty context (bench_lm.prefix_token)."""
    from evalsuite.log import say

    ref = next((n for n, r in roles.items() if r == "reference"), None)
    tests = [n for n, r in roles.items() if r == "test"] if ref else []
    n_choices = np.array([len(q.choices) for q in plan.questions], np.int64)
    ok = {n: bench_stats.answerable(a.choice_ll, n_choices) for n, a in answers.items()}  # (Q,) bool
    task_of = np.array([q.task for q in plan.questions], dtype=object)
    subject_of = np.array([q.subject for q in plan.questions], dtype=object)
    rows = []
    for task in plan.tasks:
        idx = np.flatnonzero(task_of == task)
        rows.append(_row(task, None, idx, answers, ok, ref, tests))
        subjects = list(dict.fromkeys(subject_of[idx]))
        if subjects != [task]:
            rows += [_row(task, s, np.flatnonzero(subject_of == s), answers, ok, ref, tests) for s in subjects]
    recs = records(plan, answers, ok)
    flips = {t: flipped(recs, ref, t) for t in tests}
    error = _error(failed)
    section = {
        "status": "failed" if error else "ok", **({"error": error} if error else {}),
        "tasks": list(plan.tasks), "reference": ref, "dtypes": list(answers), "settings": plan.settings,
        "bootstrap": {"method": "exact", "level": 0.95}, "prefix_token": prefix,
        "records_file": RECORDS_FILE, "n_questions": len(plan.questions), "rows": rows,
        "flipped": {t: f[:MAX_FLIPPED] for t, f in flips.items()}, "n_flipped": {t: len(f) for t, f in flips.items()},
        "timing": _timing(answers, len(plan.questions), timing), "failed": failed,
    }
    for row in rows:
        if row["subject"] is None:
            say(_summary(row, ref))
    metrics = _metrics(rows, ref)
    _speed_metrics(metrics, section["timing"])
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    return metrics, {"benchmarks": section}, {RECORDS_FILE: text}


def _summary(row: dict, ref: str | None) -> str:
    parts = [f"{n} acc {a['acc']:.4f} ± {a['acc_se']:.4f}" if a["n"] else f"{n} acc -"
             for n, a in row["acc"].items()]
    parts = [p + (f" ({a['nonfinite']} without finite log-likelihoods, left out)" if a["nonfinite"] else "")
             for p, a in zip(parts, row["acc"].values(), strict=True)]
    for n, v in row["vs_reference"].items():
        if not v["n"]:
            parts.append(f"{n} vs {ref}: no question both answered")
            continue
        lo, hi = v["delta_acc_ci"]
        parts.append(f"{n} vs {ref}: Δacc {v['delta_acc']:+.4f} [{lo:+.4f}, {hi:+.4f}], {v['flips']} flips "
                     f"({v['correct_to_wrong']} correct→wrong), McNemar p {v['mcnemar_p']:.3g}")
    return f"{row['task']} ({row['n']} questions): " + "; ".join(parts)
