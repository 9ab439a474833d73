"""lm-eval's HFLM around the resident model: tokenize once, batch and score every dtype (grading: bench_grade.py).

Three things here go past HFLM's public `loglikelihood`, all to avoid work that does not change
the answer:

* Tokenizing and ordering: `tokenize` runs HFLM's own `loglikelihood` up to the point where it
  hands the tokenized requests to `_loglikelihood_tokens`, and keeps them; `schedule` then groups
  and sorts them as HFLM's `Collator` does (requests sharing a model input are one row, longest
  row first). Both depend on the tokenizer and the model config, which all dtypes share, so they
  are computed for the first dtype and reused.
* Batching: `loglikelihoods` cuts the rows into batches itself and hands HFLM one batch per
  `_loglikelihood_tokens` call, so that an out-of-memory error costs one batch (the batch size
  halves and the batch is redone, as in the perplexity pass) instead of the dtype's benchmark.
  Without --batch-size the first size is estimated from free memory and the rows' lengths
  (`start_batch`). HFLM's own batch_size="auto" is not used: it probes with rows of ones that
  `LastPositions` cannot match, so it measures the full (B, T, V) logits this adapter never
  computes and picks a batch far too small; on CPU it cannot fail, so it always picks its maximum
  after five full-size forwards; and a later batch that runs out of memory still fails the run.
  With a fixed batch size the batches are exactly those of one HFLM call with that batch size.
* Logits: HFLM asks the model for logits at every position of the padded batch and takes a
  log-softmax over the whole vocabulary at each, though it reads only the continuation's few
  positions (a 262k vocabulary makes that most of the work for a small model). `LastPositions`
  asks for the last `k` positions only (transformers' `logits_to_keep`), with `k` large enough
  for every row of the batch; HFLM already handles logits shorter than its input (its "virtual
  token" offset) and slices the same positions out. Any row it cannot identify, or a model
  without `logits_to_keep`, gets the full logits: never a wrong slice. Where the model's logits
  are its LM head applied to its decoder's output (checked bit for bit on a probe: bench/positions.py),
  the head runs only at each row's own last `max_cont` positions, gathered, and the rest of the
  (B, k, V) logits stay zero: in a batch whose rows differ in length k spans all of their
  continuations, and on the embedded demo (a 262k vocabulary on a CPU) the head over all k
  positions was a fifth of the benchmarks' time. HFLM reads only the positions computed.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch

from evalsuite.bench.positions import LastPositions
from evalsuite.model.loading import text_config

MAX_BATCH = 128  # rows per forward at most when the batch size is found automatically
CPU_TOKENS = 4096  # padded tokens per forward on CPU (automatic size): more only costs memory there
MEMORY_SHARE = 0.6  # share of the free memory a batch may take by `_batch_bytes`
# Per padded position, live activations in units of (hidden size, MLP width) of the model's dtype;
# per kept logit position, vocabulary-sized copies (logits, log-softmax, a soft-capping temporary).
# Measured on an H200 (tests/bench/test_bench_gpu.py): the real peak stayed below the estimate.
ACTIVATIONS = (8, 3)
LOGIT_COPIES = 3


class _Captured(Exception):
    pass


def make_lm(model, tokenizer, batch_size: int = 1, prefix: int | None = None):
    """HFLM around the resident model (`loglikelihoods` sets each call's batch size); `prefix`: the
    token id before an empty context (evalsuite/bench/prefix.py), None for lm-eval's own rule."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, prefix_token_id=prefix)


def tokenize(lm, instances) -> list:
    """HFLM's own tokenization of the requests: [((context, continuation), context_ids, continuation_ids)]."""
    if not instances:  # a data-parallel rank with no questions: HFLM would not reach the capture
        return []
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


@dataclass(frozen=True)
class Schedule:
    """The dtype-independent part of HFLM's `_loglikelihood_tokens`: which requests share one model
    row (same context + continuation[:-1], e.g. the choices ' A' ... ' D' after one prompt: HFLM's
    logits cache) and the order of the rows (longest first, HFLM's own sort key). Consecutive rows
    make a batch, so batches of a fixed size are exactly HFLM's."""

    tokens: list  # [((context, continuation), context_ids, continuation_ids)] per request
    rows: tuple[tuple[int, ...], ...]  # request indices per model row, longest row first
    lengths: tuple[int, ...]  # (R,) model input length of each row (non-increasing)
    known: frozenset  # every request's model input, for LastPositions to recognise batch rows
    max_cont: int  # longest continuation in tokens


def _model_input(lm, ctx: list[int], cont: list[int]) -> list[int]:
    """What HFLM feeds the model for one request: truncated from the left, last token dropped."""
    return (ctx + cont)[-(lm.max_length + 1) :][:-1]


def schedule(lm, tokens: list) -> Schedule:
    """Group and sort the requests as HFLM's Collator would, once for every dtype."""
    grouped = lm.backend == "causal" and lm.logits_cache  # HFLM's condition for group_by="contexts"
    groups: dict = {}
    for i, (_, ctx, cont) in enumerate(tokens):
        groups.setdefault(tuple(ctx + cont[:-1]) if grouped else i, []).append(i)
    # HFLM runs the request with the longest continuation of a group (the first such on ties)
    reps = {k: max(members, key=lambda i: len(tokens[i][2])) for k, members in groups.items()}

    def key(k):
        _, ctx, cont = tokens[reps[k]]
        return -len(ctx + cont), tuple(ctx + cont)

    order = sorted(groups, key=key)  # stable, as HFLM's
    rows = tuple(tuple(groups[k]) for k in order)
    lengths = tuple(len(_model_input(lm, *tokens[reps[k]][1:])) for k in order)
    known = frozenset(tuple(_model_input(lm, ctx, cont)) for _, ctx, cont in tokens)
    return Schedule(tokens, rows, lengths, known, max((len(c) for _, _, c in tokens), default=0))


def _free_bytes(device: torch.device) -> int:
    """Memory a batch may use: the GPU's free memory plus what torch's allocator holds unused; on
    CPU the kernel's MemAvailable, shared by the ranks of one host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
        free = kib * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")  # torchrun: ranks on this host
    return free // (int(local) if local.isdigit() and int(local) > 0 else 1)


@dataclass(frozen=True)
class _Costs:
    """Bytes per padded position and per kept logit position of one row, from the model config."""

    per_token: int
    per_logit: int
    per_token_and_position: int  # attention scores held as (heads, T, T): they grow with the length T
    trimmed: bool  # LastPositions can ask for the last positions only (else logits at every position)


def _holds_scores(cfg, model, device: torch.device) -> bool:
    """Whether attention materialises its (heads, T, T) scores and their softmax: eager attention
    does; SDPA does too where it falls back to its math kernel (FP32 on CUDA: no flash kernel; on
    CPU the kernel depends on the build, so count them). Flash attention never does."""
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if impl == "eager":
        return True
    if "flash" in impl:
        return False
    return device.type != "cuda" or next(model.parameters()).dtype == torch.float32


def _costs(model, device: torch.device) -> _Costs:
    cfg = text_config(model.config)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    width = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
    size = next(model.parameters()).element_size()
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    return _Costs(per_token=size * (ACTIVATIONS[0] * hidden + ACTIVATIONS[1] * width),
                  per_logit=int(getattr(cfg, "vocab_size", 0) or 0) * size * LOGIT_COPIES,
                  per_token_and_position=2 * size * heads if _holds_scores(cfg, model, device) else 0,
                  trimmed="logits_to_keep" in inspect.signature(model.forward).parameters)


def _batch_bytes(costs: _Costs, sched: Schedule, first: int, rows: int) -> int:
    """Estimated peak bytes of the forward over rows [first, first + rows): activations at every
    padded position, logits only at the positions LastPositions keeps."""
    p = sched.lengths[first]  # padded length: the batch's first row is its longest
    shortest = sched.lengths[min(first + rows, len(sched.lengths)) - 1]
    keep = min(p, p - shortest + sched.max_cont) if costs.trimmed else p
    return rows * (p * (costs.per_token + costs.per_token_and_position * p) + keep * costs.per_logit)


def start_batch(model, sched: Schedule, device: torch.device) -> int:
    """Rows per forward when --batch-size is not given: the largest size (up to MAX_BATCH) whose
    every batch fits MEMORY_SHARE of the free memory by `_batch_bytes`; on CPU also at most
    CPU_TOKENS padded tokens in the first batch, since a CPU gains little from more and an
    overcommitted host kills the process instead of raising out-of-memory."""
    if not sched.rows:
        return 1
    budget = MEMORY_SHARE * _free_bytes(device)
    costs = _costs(model, device)
    cap = min(MAX_BATCH, len(sched.rows))
    if device.type != "cuda":
        cap = min(cap, max(1, CPU_TOKENS // max(1, sched.lengths[0])))
    best = 1
    for rows in range(2, cap + 1):
        if max(_batch_bytes(costs, sched, i, rows) for i in range(0, len(sched.rows), rows)) > budget:
            break
        best = rows
    return best


@dataclass(frozen=True)
class Scored:
    """One dtype's log-likelihoods and the batch sizes that produced them."""

    results: list  # [(loglik, is_greedy)] per request, in request order
    batch_size: int  # rows per forward at the end of the pass (after any halving)
    batch_size_start: int  # rows per forward it started with


def _forward(lm, requests: list) -> list[tuple[float, bool]]:
    """One model call: HFLM's own loop over exactly these requests (whole rows), its batch size
    set to hold them all, so that it makes one forward and returns them in the order given."""
    lm.batch_size_per_gpu = len(requests)
    return lm._loglikelihood_tokens(requests, disable_tqdm=True)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def loglikelihoods(lm, sched: Schedule, batch_size: int, progress: bool) -> Scored:
    """(loglik, is_greedy) per request of the schedule, `batch_size` rows per forward; on
    out-of-memory the size halves and the batch is redone (nothing of it was kept)."""
    from tqdm.auto import tqdm

    from evalsuite.bench.tasks import BenchmarkError

    call = LastPositions(lm, sched)
    lm._model_call = call
    out: list = [None] * len(sched.tokens)
    start, i = batch_size, 0
    bar = tqdm(total=len(sched.tokens), desc="benchmark requests", unit="req", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        while i < len(sched.rows):
            rows = sched.rows[i : i + batch_size]
            idx = [k for row in rows for k in row]
            try:
                results = _forward(lm, [sched.tokens[k] for k in idx])
            except torch.OutOfMemoryError as exc:
                if batch_size == 1:
                    raise BenchmarkError(f"out of memory at benchmark batch size 1 (a {sched.lengths[i]}-token "
                                         f"request): use fewer --num-fewshot or a larger device") from exc
                results = None
            if results is None:  # outside the except block: the error's frames (and tensors) are gone
                batch_size = max(1, batch_size // 2)
                _empty_cache(lm.device)
                bar.set_postfix(batch=batch_size)
                continue
            for k, r in zip(idx, results, strict=True):
                out[k] = r
            i += len(rows)
            bar.update(len(idx))
    finally:
        bar.close()
        del lm._model_call, call.lm, call.full
    return Scored(out, batch_size, start)
