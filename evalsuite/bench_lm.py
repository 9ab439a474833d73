"""lm-eval's HFLM around the resident model: tokenize once, score every dtype, grade the answers.

Two things here go past HFLM's public `loglikelihood`, both to avoid work that does not change
the answer:

* Tokenizing: `tokenize` runs HFLM's own `loglikelihood` up to the point where it hands the
  tokenized requests to `_loglikelihood_tokens`, and keeps them; every dtype then calls
  `_loglikelihood_tokens` with those tokens. The tokens depend on the tokenizer and the model
  config, which all dtypes share.
* Logits: HFLM asks the model for logits at every position of the padded batch and takes a
  log-softmax over the whole vocabulary at each, though it reads only the continuation's few
  positions (a 262k vocabulary makes that most of the work for a small model). `LastPositions`
  asks for the last `k` positions only (transformers' `logits_to_keep`), with `k` large enough
  for every row of the batch; HFLM already handles logits shorter than its input (its "virtual
  token" offset) and slices the same positions out. Any row it cannot identify, or a model
  without `logits_to_keep`, gets the full logits: never a wrong slice.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from evalsuite.benchmarks import Plan

CPU_BATCH = 8  # requests per forward on CPU when --batch-size is not given (on CUDA: lm-eval's "auto")


class _Captured(Exception):
    pass


def make_lm(model, tokenizer, batch_size):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=64)


def tokenize(lm, instances) -> list:
    """HFLM's own tokenization of the requests: [((context, continuation), context_ids, continuation_ids)]."""
    captured = []

    def capture(requests, **_):
        captured.append(requests)
        raise _Captured

    lm._loglikelihood_tokens = capture  # an instance attribute shadows the method for this call only
    try:
        lm.loglikelihood(list(instances), disable_tqdm=True)
    except _Captured:
        pass
    finally:
        del lm._loglikelihood_tokens
    return captured[0]


class LastPositions:
    """Replaces `lm._model_call`: logits for the last k positions of the batch that every row needs."""

    def __init__(self, lm, tokens: list):
        self.lm = lm
        self.full = lm._model_call  # the bound original
        n = lm.max_length + 1
        self.known = {tuple((ctx + cont)[-n:][:-1]) for _, ctx, cont in tokens}  # each request's model input
        self.max_cont = max((len(cont) for _, _, cont in tokens), default=0)
        params = inspect.signature(lm.model.forward).parameters
        self.enabled = lm.backend == "causal" and "logits_to_keep" in params
        self.trimmed = 0  # batches served with fewer positions (for the tests)

    def _row_length(self, row: list[int]) -> int | None:
        """The shortest known input that `row` is (right-padded with zeros), or None."""
        p = len(row)
        z = 0
        while z < p and row[p - 1 - z] == 0:
            z += 1
        for length in range(p - z, p + 1):
            if tuple(row[:length]) in self.known:
                return length
        return None

    def __call__(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if not self.enabled or attn_mask is not None or labels is not None:
            return self.full(inps, attn_mask, labels)
        p = inps.shape[1]
        lengths = [self._row_length(r) for r in inps.tolist()]  # (B,) on the host: one small copy
        if any(n is None for n in lengths):
            return self.full(inps)
        keep = p - min(lengths) + self.max_cont
        if keep >= p:
            return self.full(inps)
        self.trimmed += 1
        # Indices, not an int: transformers then gathers a contiguous copy of the hidden states; an int
        # slices a strided view, which sends CPU BF16 matmuls down a path ~80x slower.
        positions = torch.arange(p - keep, p, device=inps.device)
        with torch.no_grad():
            return self.lm.model(inps, logits_to_keep=positions).logits  # (B, keep, V)


def loglikelihoods(lm, tokens: list, progress: bool) -> list[tuple[float, bool]]:
    """(loglik, is_greedy) per request, in request order."""
    call = LastPositions(lm, tokens)
    lm._model_call = call
    try:
        return lm._loglikelihood_tokens(tokens, disable_tqdm=not progress)
    finally:
        del lm._model_call, call.lm, call.full


@dataclass(frozen=True)
class Answers:
    """One dtype's answers to every question of the plan."""

    correct: np.ndarray  # (Q,) bool: lm-eval's acc per question
    choice_ll: np.ndarray  # (Q, C) float64 log-likelihood of each choice; -inf pads questions with fewer
    seconds: float


def score(plan: Plan, results: list[tuple[float, bool]], seconds: float = 0.0) -> Answers:
    """Per-question answers from the flat (loglik, is_greedy) results, scored by each task's own
    filters and process_results, exactly as lm-eval's evaluator does."""
    for inst, res in zip(plan.instances, results, strict=True):
        inst.resps = [res]
    for task in plan.task_objs.values():
        task.apply_filters()
    width = max((len(q.choices) for q in plan.questions), default=0)
    correct = np.zeros(len(plan.questions), bool)
    choice_ll = np.full((len(plan.questions), width), -np.inf)
    for i, q in enumerate(plan.questions):
        insts = plan.instances[q.start : q.stop]
        key = next(iter(insts[0].filtered_resps))
        filtered = [inst.filtered_resps[key] for inst in insts]
        lls = np.array([r[0] if isinstance(r, tuple | list) else r for r in filtered[: len(q.choices)]], float)
        choice_ll[i, : len(lls)] = lls
        metrics = plan.task_objs[q.subject].process_results(insts[0].doc, filtered)
        correct[i] = bool(metrics["acc"]) if "acc" in metrics else int(np.argmax(lls)) == q.gold
    return Answers(correct, choice_ll, seconds)
