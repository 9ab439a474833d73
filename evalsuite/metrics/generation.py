"""Where a greedy continuation parts from the reference's: per-prompt comparisons and their summary.

Plain numpy on token arrays, no torch. Conventions (docs/generation.md):
- The first divergence of a prompt is the first step whose token differs from the reference's.
  A prompt whose continuation equals the reference's (both ended at the same EOS, or both ran to
  the token limit N) never diverged; it is counted at N, so quantiles and the survival curve
  are defined even when nothing diverged: a median of N means at least half the prompts stayed
  identical for all N tokens.
- A step whose logits hold an inf or NaN (in either continuation) is a divergence at that step
  even if the argmax happened to match: the token came from garbage, not from the model.
- The survival curve S(t), t = 0..N, is the share of prompts whose first t tokens all equal the
  reference's, i.e. whose first divergence is at t or later; S(0) = 1, S(N) = identical share.
- At a first divergence d, the reference's margin there (its top-1 minus top-2 logit, nats) says
  whether the reference itself was nearly undecided: below `NEAR_TIE` it is a near-tie, which any
  rounding may flip; above, the test model changed a clear decision. A divergence caused by
  non-finite logits is never a near-tie and its token is never in the reference's top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Reference top-two margin (nats) under which a divergence counts as a near-tie. Why 0.1: BF16
# rounds a logit between 8 and 16 to a step of 0.0625 (and between 16 and 32 to 0.125), so a
# gap below about 0.1 can close from the rounding of the two logits alone, with no real change.
NEAR_TIE = 0.1


@dataclass(frozen=True)
class Comparison:
    """One continuation set against the reference's, per prompt (P prompts, horizon N)."""

    first_div: np.ndarray  # (P,) int64: first differing step, N where identical
    margin: np.ndarray  # (P,) float64: the reference's top-two margin at the divergence; NaN if none
    in_topk: np.ndarray  # (P,) float64: 1 if the test's token there is in the reference's top-k, 0 if not, NaN if no divergence
    nonfinite: np.ndarray  # (P,) bool: the divergence was caused by non-finite logits
    horizon: int

    @property
    def identical(self) -> np.ndarray:  # (P,) bool
        return self.first_div >= self.horizon


def first_divergence(ref: np.ndarray, test: np.ndarray, horizon: int, ref_bad: int = -1, test_bad: int = -1) -> int:
    """The first step where `test` parts from `ref` (token ids (n,), EOS included), `horizon` if never.

    `ref_bad`/`test_bad`: the first step with non-finite logits, -1 for none. Continuations of
    unequal length with one a prefix of the other part where the shorter ends.
    """
    n = min(len(ref), len(test))
    differs = np.flatnonzero(np.asarray(ref[:n]) != np.asarray(test[:n]))
    d = int(differs[0]) if differs.size else (n if len(ref) != len(test) else horizon)
    for bad in (ref_bad, test_bad):
        if bad >= 0:
            d = min(d, int(bad))
    return d


def compare(ref_tokens: list, ref_topk: np.ndarray, ref_margins: np.ndarray, ref_bad: np.ndarray,
            test_tokens: list, test_bad: np.ndarray, horizon: int) -> Comparison:
    """Per-prompt first divergence, reference margin and top-k membership there.

    ref_topk (P, N, k) ids, ref_margins (P, N), ref_bad/test_bad (P,) first non-finite step or -1.
    """
    p = len(ref_tokens)
    first = np.empty(p, np.int64)
    margin, in_topk, caused = np.full(p, np.nan), np.full(p, np.nan), np.zeros(p, bool)
    for i in range(p):
        r, t = ref_tokens[i], test_tokens[i]
        d = first_divergence(r, t, horizon, int(ref_bad[i]), int(test_bad[i]))
        first[i] = d
        if d >= horizon:
            continue
        caused[i] = d in (int(ref_bad[i]), int(test_bad[i]))
        if caused[i] or d >= min(len(r), len(t)):  # non-finite logits, or one continuation ended where the other goes on
            in_topk[i] = 0.0
        else:
            margin[i] = ref_margins[i, d]
            in_topk[i] = float(int(t[d]) in set(ref_topk[i, d].tolist()))
    return Comparison(first, margin, in_topk, caused, horizon)


def survival(first_div: np.ndarray, horizon: int) -> np.ndarray:
    """(horizon + 1,) S(t) = share of prompts whose first divergence is at step t or later."""
    first_div = np.asarray(first_div)
    if first_div.size == 0:
        return np.full(horizon + 1, np.nan)
    counts = np.bincount(np.minimum(first_div, horizon), minlength=horizon + 1)  # prompts diverging at each t
    alive = first_div.size - np.concatenate([[0], np.cumsum(counts)[:-1]])  # (horizon + 1,) prompts still identical
    return alive / first_div.size


def pooled_logprob(logprobs: list[np.ndarray]) -> float:
    """Mean log-probability per token over every token of every continuation (nats)."""
    n = sum(len(x) for x in logprobs)
    return float(sum(float(np.sum(x, dtype=np.float64)) for x in logprobs) / n) if n else math.nan


def answer_letter(text: str, choices) -> str | None:
    """A benchmark answer read from a continuation: its first non-space character if it is a choice."""
    stripped = text.lstrip()
    return stripped[0] if stripped and stripped[0] in set(choices) else None


def summary(c: Comparison, ref_lp: list[np.ndarray], test_lp: list[np.ndarray],
            answers: tuple[list, list] | None = None) -> dict[str, float | int | None]:
    """The flat metrics of one comparison (docs/results-schema.md, "Generation").

    ref_lp/test_lp: the reference's teacher-forced log-probabilities of its own and of the test's
    continuations, per prompt. answers: (reference letters, test letters) of the benchmark prompts.
    """
    diverged = ~c.identical
    n_div = int(diverged.sum())
    margins = c.margin[diverged]
    out: dict[str, float | int | None] = {
        "gen_prompts": int(len(c.first_div)),
        "gen_identical": float(np.mean(c.identical)) if len(c.first_div) else math.nan,
        "gen_first_div_median": float(np.median(c.first_div)) if len(c.first_div) else math.nan,
        "gen_first_div_p10": float(np.quantile(c.first_div, 0.1)) if len(c.first_div) else math.nan,
        "gen_near_tie_share": float(np.mean(np.nan_to_num(margins, nan=np.inf) < NEAR_TIE)) if n_div else math.nan,
        "gen_in_ref_topk": float(np.mean(c.in_topk[diverged])) if n_div else math.nan,
        "gen_nonfinite_prompts": int(c.nonfinite.sum()),
        "gen_ref_logprob": pooled_logprob(test_lp),
        "gen_ref_logprob_delta": pooled_logprob(test_lp) - pooled_logprob(ref_lp),
    }
    if answers is not None and answers[0]:
        ref_a, test_a = answers
        out["gen_answer_changed"] = float(np.mean([a != b for a, b in zip(ref_a, test_a, strict=True)]))
    return out
