"""The generation step (--generate): greedy continuations at the reference and each test precision.

Runs after the scoring passes, one model resident at a time (docs/generation.md):
1. the reference, under `exact_fp32()`: decode every prompt in batches of `batch` prompts sorted
   by length (composition A), keeping per step its top-k log-probabilities and top-two margin;
   then decode them again in composition B, the same prompts in reverse order in batches of
   half the size (2 when A's was 1): the noise floor, what batch layout alone changes;
2. each test precision: decode in composition A;
3. the reference again: the teacher-forced log-probabilities of every distinct continuation
   (its own, the floor's and each test's), one forward per batch.
Why load the reference a third time instead of scoring in step 1: the test continuations do not
exist yet then, and two models never share the device. It costs one more reference load and a
forward over each distinct continuation (identical ones are scored once); docs/generation.md
has the measured cost. The step is not saved for a resume: a rerun computes it again (it is small
next to the scoring passes). Data-parallel runs generate on rank 0 only, after the gather.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from evalsuite.errors import EvalsuiteError
from evalsuite.log import say
from evalsuite.model.decode import Decoded, eos_ids, greedy, pad_id, teacher_forced
from evalsuite.model.loading import unload
from evalsuite.model.precision import exact_fp32, unsupported_reason
from evalsuite.store import corpus as corpus_mod
from evalsuite.store import prompts as prompts_mod

DEFAULTS = {"cuda": (64, 128)}  # device type -> (prompts, tokens per continuation); others: CPU_DEFAULTS
CPU_DEFAULTS = (8, 32)  # small, so that the embedded main job with --generate stays quick on a CPU
BATCH = {"cuda": 64}  # prompts per decoding batch (halved on out-of-memory); others: CPU_BATCH; --batch-size fixes it
CPU_BATCH = 8
PREFIX_TOKENS = 32  # tokens of a corpus prefix prompt


def settings(cfg, device) -> tuple[int, int, int]:
    """(prompts, tokens per continuation, batch) for this device and the options."""
    count, tokens = DEFAULTS.get(device.type, CPU_DEFAULTS)
    return cfg.gen_count or count, cfg.gen_tokens or tokens, cfg.batch_size or BATCH.get(device.type, CPU_BATCH)


def build_prompts(cfg, tokenizer, observers, count: int) -> list[prompts_mod.Prompt]:
    """The user's file, else benchmark contexts (half, when --tasks are on) and corpus prefixes."""
    if cfg.gen_prompts is not None:
        found = prompts_mod.file_prompts(cfg.gen_prompts, cfg.gen_column, tokenizer, count)
    else:
        found = []
        plan = next((o.plan for o in observers if hasattr(o, "plan") and hasattr(o.plan, "questions")), None)
        if plan is not None and plan.questions:
            contexts = [str(plan.instances[q.start].args[0]) for q in plan.questions]
            found = prompts_mod.benchmark_prompts(plan.questions, contexts, tokenizer, count // 2, cfg.seed)
        texts, _ = corpus_mod.load_texts(cfg.corpus)
        found += prompts_mod.corpus_prompts(texts, tokenizer, count - len(found), cfg.seed, PREFIX_TOKENS)
    return [p for p in found if p.ids]


@dataclass
class GenerationStep:
    """Everything decoded, kept until the results are built (`finish`, the observers' interface)."""

    cfg: object
    tokenizer: object
    reference: str
    prompts: list
    horizon: int
    batch: int
    noise_batch: int
    decoded: dict[str, Decoded] = field(default_factory=dict)  # reference name, "noise", each test name
    logprobs: dict[str, list] = field(default_factory=dict)  # same keys: reference's log-probs of each continuation
    timing: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    eos: tuple[int, ...] = ()  # the tokens that end a continuation
    part: str = "generation"  # how a failure is named (passes/observers.py)
    files: dict[str, str] = field(default_factory=dict)  # after finish: generations.jsonl
    failures: list[str] = field(default_factory=list)  # after finish: what could not be decoded or scored
    failure_traceback: str | None = None

    def finish(self, metrics_by_dtype: dict) -> tuple[dict, dict]:
        from evalsuite.passes.gen_results import build

        additions, sections, self.files = build(self)
        self.failures = [f"{name}: {why}" for name, why in self.failed.items()]
        return additions, sections


def generate(s, loop, observers=()) -> GenerationStep:
    """Decode the prompts at the reference (twice: the floor) and at each test precision, then
    score every continuation by the reference. `s` is the runner's Setup, `loop` the finished
    pass loop (its `_load` places models as the passes did)."""
    cfg, tokenizer, device = s.cfg, s.tokenizer, s.device
    count, horizon, batch = settings(cfg, device)
    prompts = build_prompts(cfg, tokenizer, observers, count)
    ref_name = cfg.reference.name
    noise_batch = max(1, batch // 2) if batch > 1 else 2
    step = GenerationStep(cfg, tokenizer, ref_name, prompts, horizon, batch, noise_batch)
    if not prompts:
        step.failed[ref_name] = "no prompts"
        return step
    ids = [list(p.ids) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # composition A: similar lengths together
    say(f"generation: {len(ids)} prompts x {horizon} tokens, batch {batch} (noise floor: reversed, batch {noise_batch})")
    try:
        model, load_s = loop._load(cfg.reference)
        step.eos = eos_ids(model, tokenizer)
        pad = pad_id(tokenizer, step.eos)
        with exact_fp32():
            step.decoded[ref_name] = _decode(step, ref_name, model, ids, order, batch, pad, device, load_s)
            step.decoded["noise"] = _decode(step, "noise", model, ids, order[::-1], noise_batch, pad, device, 0.0)
    except EvalsuiteError as exc:  # the scoring passes' results still stand
        step.failed[ref_name] = str(exc)
        say(f"generation failed at the reference: {exc}")
        return step
    finally:
        model = None
        unload(model)
    for p in s.tests:
        if p.name in loop.failed or unsupported_reason(p, device):
            continue
        try:
            model, load_s = loop._load(p)
            step.decoded[p.name] = _decode(step, p.name, model, ids, order, batch, pad, device, load_s)
        except EvalsuiteError as exc:  # e.g. out of memory even at one prompt: the others go on
            step.failed[p.name] = str(exc)
            say(f"{p.name} generation failed: {exc}; the other dtypes go on")
        model = None
        unload(model)
    try:
        _score(step, loop, ids, device)
    except EvalsuiteError as exc:  # the decoding results stand; only the log-probabilities are missing
        step.failed["scoring"] = str(exc)
        say(f"generation: scoring the continuations failed: {exc}")
        step.logprobs = {name: [np.zeros(0)] * len(ids) for name in step.decoded}
    return step


def _decode(step: GenerationStep, name: str, model, ids, order, batch, pad, device, load_s: float) -> Decoded:
    d = greedy(model, ids, order, batch, step.horizon, step.eos, pad, device)
    step.timing[name] = {"load_s": load_s, "decode_s": d.seconds, "tokens": d.n_tokens, "batch_size": d.batch_size,
                         "tokens_per_s": d.n_tokens / d.seconds if d.seconds > 0 else None}
    say(f"{name}: generated {d.n_tokens} tokens in {d.seconds:.1f} s ({d.n_tokens / max(d.seconds, 1e-9):.0f} tokens/s)")
    return d


def scored_part(d: Decoded, i: int) -> tuple[int, ...]:
    """The tokens of continuation i the reference scores: those before its first non-finite step."""
    t = d.tokens[i]
    return tuple(int(x) for x in (t[: d.first_nonfinite[i]] if d.first_nonfinite[i] >= 0 else t))


def _score(step: GenerationStep, loop, ids: list, device) -> None:
    """The reference's teacher-forced log-probabilities of every distinct (prompt, continuation)."""
    pairs = {(i, scored_part(d, i)) for d in step.decoded.values() for i in range(len(ids))}
    pairs = sorted(pairs)
    t0 = time.perf_counter()
    model, load_s = loop._load(step.cfg.reference)
    try:
        with exact_fp32():
            lps = teacher_forced(model, [(ids[i], c) for i, c in pairs], step.batch, device)
    finally:
        model = None
        unload(model)
    by_pair = dict(zip(pairs, lps, strict=True))
    for name, d in step.decoded.items():
        step.logprobs[name] = [by_pair[(i, scored_part(d, i))] for i in range(len(ids))]
    step.timing["scoring"] = {"load_s": load_s, "score_s": time.perf_counter() - t0 - load_s,
                              "continuations": len(pairs), "tokens": int(sum(len(c) for _, c in pairs))}


def letters(step: GenerationStep, d: Decoded) -> list:
    """The answer letter of each benchmark prompt's continuation (None where it gives none)."""
    from evalsuite.metrics.generation import answer_letter

    return [answer_letter(step.tokenizer.decode(d.tokens[i].tolist(), skip_special_tokens=True), p.choices)
            for i, p in enumerate(step.prompts) if p.source == "benchmark"]
