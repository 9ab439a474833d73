"""Batched greedy decoding with a KV cache, and teacher-forced scoring of given continuations.

Why our own loop and not `model.generate(do_sample=False)`: it is the same computation (the
model's own forward on a left-padded batch with an attention mask, position ids counted from
each row's first real token, a KV cache the model makes itself, argmax of the float32 logits,
finished rows fed the pad token), so the tokens are the same; `tests/model/test_decode.py`
checks that token for token. What `generate` does not give cheaply is what we keep per step:
the top-k log-probabilities and the margin between the top two tokens, computed on the device
and copied to the host once per batch; and `generate` reads its stop flag on the host every
step, where we check for "every row has ended" every `CHECK_EVERY` steps only (a finished row
is fed pad tokens, which are dropped, so the extra steps change no token). A checkpoint's
generation_config (a repetition penalty, say) is never applied: this is plain greedy decoding.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from evalsuite.errors import EvalsuiteError
from evalsuite.model.loading import model_part, text_config

TOP_K = 5  # reference log-probabilities kept per step
CHECK_EVERY = 8  # steps between host reads of "has every row ended"
SCORE_LOGITS = 2**26  # float32 logits elements per teacher-forced batch (256 MiB)


@dataclass(frozen=True)
class Decoded:
    """Greedy continuations of P prompts, N = the token limit; rows past a continuation's end are padding."""

    tokens: list[np.ndarray]  # P arrays (n_i,) int64: the continuation, its EOS included when it stopped there
    topk_ids: np.ndarray  # (P, N, k) int64: the k most likely tokens at each step
    topk_logprobs: np.ndarray  # (P, N, k) float64: their log-probabilities (log-softmax in float64)
    margins: np.ndarray  # (P, N) float64: top-1 minus top-2 logit (nats) at each step, NaN past the end
    first_nonfinite: np.ndarray  # (P,) int64: first step whose logits hold an inf/NaN, -1 if none
    seconds: float  # decoding time, prefill included
    batch_size: int  # rows per batch it ended with (halved on out-of-memory)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    """The tokens that end a continuation: the generation config's EOS ids and the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        ids += [source] if isinstance(source, int) else list(source or [])
    return tuple(dict.fromkeys(int(i) for i in ids))


def pad_id(tokenizer, eos: Sequence[int]) -> int:
    """What left-pads a batch and follows a finished row (masked out, so any id does)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(eos[0]) if eos else 0


class _Forward:
    """The model's forward called with the names this transformers version uses (`cache` in 5.x,
    `past_key_values` before) and, where supported, logits for the last positions only."""

    def __init__(self, model, device: torch.device):
        params = inspect.signature(model.forward).parameters
        self.model, self.device = model, device
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep = "logits_to_keep" in params
        emb = model_part(model, "get_input_embeddings")
        self.input_device = emb.weight.device if emb is not None and emb.weight.device.type != "meta" else device

    def __call__(self, ids, mask, pos, cache=None, keep: int = 1):
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": cache is not False}
        if cache not in (None, False):
            kwargs[self.cache_kw] = cache
        if self.keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(**kwargs)
        return out.logits[:, -keep:].to(self.device), out.get(self.cache_kw)


def _left_pad(prompts: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, L), mask (B, L), position ids (B, L)) of a left-padded batch, positions as `generate` counts them."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device), pos.to(device)


@torch.no_grad()
def _decode_batch(fwd: _Forward, prompts, max_new: int, eos: Sequence[int], pad: int, k: int):
    """One batch: (tokens (B, S), topk ids (B, S, k), topk log-probs (B, S, k), margins (B, S),
    non-finite (B, S)), S <= max_new steps, all on the host."""
    ids, mask, pos = _left_pad(prompts, pad, fwd.input_device)
    eos_t = torch.tensor(list(eos), dtype=torch.long, device=fwd.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=fwd.device)
    steps, cache = [], None
    for t in range(max_new):
        logits, cache = fwd(ids, mask, pos, cache)
        logits = logits[:, -1].float()  # (B, V), as generate casts before its argmax
        x = logits.double()
        vals, top = x.topk(min(k, x.shape[-1]), dim=-1)  # (B, k)
        lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (B, 1)
        margin = vals[:, 0] - vals[:, 1] if vals.shape[-1] > 1 else torch.full_like(vals[:, 0], float("inf"))
        bad = ~torch.isfinite(logits).all(dim=-1)  # (B,)
        nxt = torch.where(done, pad, logits.argmax(dim=-1))  # (B,)
        steps.append((nxt, top, vals - lse, margin, bad))
        done = done | torch.isin(nxt, eos_t)
        ids = nxt[:, None].to(fwd.input_device)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        pos = pos[:, -1:] + 1
        if (t + 1) % CHECK_EVERY == 0 and bool(done.all()):
            break
    del cache
    return tuple(torch.stack([s[j] for s in steps], dim=1).cpu().numpy() for j in range(5))


def _continuation(row: np.ndarray, eos: set[int]) -> np.ndarray:
    """A row's tokens up to and including its first EOS (all of them if it never ended)."""
    ends = [i for i, t in enumerate(row.tolist()) if t in eos]
    return row[: ends[0] + 1] if ends else row


def greedy(model, prompts: Sequence[Sequence[int]], order: Sequence[int], batch_size: int, max_new: int,
           eos: Sequence[int], pad: int, device: torch.device, top_k: int = TOP_K) -> Decoded:
    """Greedy continuations of `prompts` (each a non-empty list of ids), batched in `order`.

    `order` fixes the batch composition (consecutive runs of `batch_size` prompts), which is
    what the noise floor varies. On CUDA out-of-memory the batch size halves and the batch is
    redone; at one row the error says what to shrink.
    """
    fwd = _Forward(model, device)
    n, eos_set = len(prompts), set(eos)
    tokens: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    topk_ids = np.zeros((n, max_new, top_k), np.int64)
    topk_lp = np.full((n, max_new, top_k), np.nan)
    margins = np.full((n, max_new), np.nan)
    first_bad = np.full(n, -1, np.int64)
    t0, i = time.perf_counter(), 0
    while i < n:
        rows = list(order[i : i + batch_size])
        try:
            toks, ids, lps, marg, bad = _decode_batch(fwd, [prompts[r] for r in rows], max_new, eos, pad, top_k)
        except torch.OutOfMemoryError as exc:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if batch_size == 1:
                raise EvalsuiteError(f"out of GPU memory decoding one prompt of {len(prompts[rows[0]])} tokens: "
                                     "use a smaller --gen-tokens or --gen-count, or shorter prompts") from exc
            batch_size = max(1, batch_size // 2)
            continue
        for b, r in enumerate(rows):
            cont = _continuation(toks[b], eos_set)
            m = len(cont)
            tokens[r] = cont.astype(np.int64)
            kk = ids.shape[-1]
            topk_ids[r, :m, :kk], topk_lp[r, :m, :kk], margins[r, :m] = ids[b, :m], lps[b, :m], marg[b, :m]
            hits = np.flatnonzero(bad[b, :m])
            first_bad[r] = hits[0] if hits.size else -1
        i += len(rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Decoded(tokens, topk_ids, topk_lp, margins, first_bad, time.perf_counter() - t0, batch_size)


@torch.no_grad()
def teacher_forced(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int,
                   device: torch.device) -> list[np.ndarray]:
    """log p(c_j | prompt, c_<j) in float64 for every (prompt, continuation) pair, by one forward
    per batch of left-padded `prompt + continuation[:-1]`; an empty continuation gives an empty array."""
    fwd = _Forward(model, device)
    out: list[np.ndarray] = [np.zeros(0)] * len(pairs)
    todo = sorted((i for i, (_, c) in enumerate(pairs) if len(c)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    vocab = int(text_config(model.config).vocab_size)
    i = 0
    while i < len(todo):
        keep = max(len(pairs[j][1]) for j in todo[i : i + batch_size])
        rows = todo[i : i + max(1, min(batch_size, SCORE_LOGITS // (keep * vocab)))]
        keep = max(len(pairs[j][1]) for j in rows)
        ids, mask, pos = _left_pad([list(pairs[j][0]) + list(pairs[j][1])[:-1] for j in rows], 0, fwd.input_device)
        logits, _ = fwd(ids, mask, pos, cache=False, keep=keep)  # (B, keep, V)
        for b, j in enumerate(rows):
            cont = torch.as_tensor(list(pairs[j][1]), dtype=torch.long, device=device)
            lp = torch.log_softmax(logits[b, keep - len(cont):].double(), dim=-1)  # (m, V) float64
            out[j] = lp.gather(1, cont[:, None]).squeeze(1).cpu().numpy()
        i += len(rows)
    return out
