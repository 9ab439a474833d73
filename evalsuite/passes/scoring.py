"""One pass of one model over a segment of windows, and the per-token arrays it fills.

The runner (runner.py) decides what runs when; this module is the mechanics of a pass: where
each chunk's statistics go (device-side staging, flushed to host once per pass), the observers'
notifications, timing and peak memory, and the noise-floor pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from evalsuite.config import RunConfig
from evalsuite.metrics.divergence import reference_tokens, token_divergence
from evalsuite.metrics.registry import DIVERGENCE_FIELDS, TOKEN_FIELDS, stats_for
from evalsuite.model.batching import run_pass
from evalsuite.model.forward import Scorer
from evalsuite.model.precision import Precision
from evalsuite.phases import phase
from evalsuite.store.windows import cut, scored_counts, unscored_of


@dataclass
class TokenArrays:
    """Per-token results of one dtype, over the whole corpus (N tokens)."""

    nll: np.ndarray
    argmax: np.ndarray
    nonfinite: np.ndarray
    kl: np.ndarray | None = None  # test dtypes (and the noise floor) only
    top1_agree: np.ndarray | None = None
    p_ref: np.ndarray | None = None
    p_test: np.ndarray | None = None
    max_abs_dlogit: np.ndarray | None = None
    timing: dict[str, float] = field(default_factory=lambda: {"load_s": 0.0, "pass_s": 0.0})
    batch_size: int = 0

    @classmethod
    def empty(cls, n: int, divergence: bool) -> TokenArrays:
        return cls(**{s.name: s.host_empty(n) for s in stats_for(divergence)})

    def names(self) -> list[str]:
        """The statistics this pass holds (registry order)."""
        return [s.name for s in stats_for(self.kl is not None)]

    def segment(self, offset: int, n: int) -> dict[str, np.ndarray]:
        """The per-token arrays of tokens [offset, offset + n), for the resume state."""
        return {k: getattr(self, k)[offset : offset + n] for k in self.names()}

    def restore(self, offset: int, arrays: dict[str, np.ndarray], timing: dict, batch_size: int) -> None:
        for k, v in arrays.items():
            getattr(self, k)[offset : offset + len(v)] = v
        for k, v in timing.items():
            self.timing[k] = max(self.timing.get(k, 0.0), v) if k == "peak_memory_gib" else self.timing.get(k, 0.0) + v
        self.batch_size = batch_size


@dataclass(frozen=True)
class PassContext:
    """What an observer sees of one pass: the loaded model and where its tokens sit."""

    precision: Precision
    role: str  # "reference" or "test"
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    cfg: RunConfig
    windows: object  # corpus.TokenWindows of the whole run
    segment: int  # index of this segment; observers that need one pass per dtype act on segment 0
    segment_windows: tuple[int, int, int]  # (first window, last window + 1, flat token offset)
    batch_size: int


def notify(observers, method: str, *args):
    for obs in observers:
        fn = getattr(obs, method, None)
        if fn is not None:
            with phase(observer_part(obs)):  # "numerics", "benchmarks"
                fn(*args)


def observer_part(obs) -> str:
    """The part of a run an observer measures, as its phase and its failures are named ("benchmarks", "numerics")."""
    return getattr(obs, "part", None) or type(obs).__name__.removesuffix("Observer").lower() or "observer"


def restore_observers(observers, ctx: PassContext, snapshots: list) -> None:
    """Hand each observer its saved snapshot of a pass (a resumed or cached pass, another rank's)."""
    for obs, snap in zip(observers, snapshots, strict=False):
        if snap is not None and hasattr(obs, "restore"):
            obs.restore(ctx, snap)


def keep_reference(buffer, staged, pos: int, logits: torch.Tensor, tgt: torch.Tensor) -> None:
    buffer[pos : pos + len(tgt)] = logits  # copy_ casts in place: no float32 temporary
    _stage(staged, pos, reference_tokens(logits, tgt))


def keep_hidden(scorer: Scorer, kept, staged, pos: int, hidden: torch.Tensor, tgt: torch.Tensor) -> None:
    """The reference pass's chunk when it keeps hidden states (scorer.hidden_out): hidden (C, H) goes into
    `kept` (model/kept.py), the logits are computed from the kept rows through the frozen head, the way
    a test pass re-applies them, and into `kept.logits` where the logits are kept too."""
    logits = scorer.head_logits(kept.keep(pos, hidden))  # (C, V)
    if kept.logits is not None:
        kept.logits[pos : pos + len(tgt)] = logits
    _stage(staged, pos, reference_tokens(logits, tgt))


def compare(buffer, staged, pos: int, logits: torch.Tensor, tgt: torch.Tensor) -> None:
    """A test chunk against the reference's logits: `buffer` is a (N, V) tensor or a KeptReference."""
    _stage(staged, pos, token_divergence(buffer[pos : pos + len(tgt)], logits, tgt))


def timed_pass(ctx: PassContext, scorer: Scorer, seg_windows, on_chunk, staged, arrays: TokenArrays,
                observers, desc: str) -> int:
    """One dtype over one segment, with the observers told; returns the batch size that fit."""
    offset = ctx.segment_windows[2]
    notify(observers, "pass_started", ctx)
    on_batch = partial(notify_batch, observers, offset) if observers else None
    with phase(f"{ctx.role}_pass"):  # reference_pass, test_pass
        stats = run_pass(scorer, seg_windows, ctx.batch_size, on_chunk, desc, ctx.cfg.progress, on_batch)
    _flush(staged, arrays, offset)
    arrays.timing["pass_s"] += stats.seconds
    _note_peak(arrays, stats)
    arrays.batch_size = stats.batch_size
    notify(observers, "pass_finished", ctx)
    return stats.batch_size


def notify_batch(observers, offset: int, pos: int, ids: torch.Tensor) -> None:
    notify(observers, "batch_started", offset + pos, ids)


def _note_peak(arrays: TokenArrays, stats) -> None:
    if stats.peak_memory_gib is not None:
        arrays.timing["peak_memory_gib"] = max(arrays.timing.get("peak_memory_gib", 0.0), stats.peak_memory_gib)


def staging(n: int, device: torch.device, divergence: bool) -> dict[str, torch.Tensor]:
    """Per-token results stay on the device during a pass: no host sync per chunk."""
    return {s.name: torch.empty(n, dtype=s.dtype, device=device) for s in stats_for(divergence)}


def _stage(staged: dict[str, torch.Tensor], pos: int, result) -> None:
    own = getattr(result, "test", result)  # TokenDivergence carries the test's own NLL in .test
    for s in TOKEN_FIELDS:
        value = getattr(own, s.name)
        staged[s.name][pos : pos + len(value)] = value
    for s in DIVERGENCE_FIELDS:
        if s.name in staged:
            value = getattr(result, s.name)
            staged[s.name][pos : pos + len(value)] = value


def _flush(staged: dict[str, torch.Tensor], arrays: TokenArrays, offset: int) -> None:
    for k, t in staged.items():
        getattr(arrays, k)[offset : offset + len(t)] = t.cpu().numpy()


def noise_pass(cfg: RunConfig, scorer: Scorer, seg_windows, buffer, batch: int, limit: int) -> TokenArrays:
    """A second reference pass over at most `limit` tokens that differs only in batch layout: the noise floor."""
    if unscored_of(seg_windows) is None:  # stream windows: the first `limit` tokens, the last window cut
        chosen = cut(seg_windows, limit)
        count = int(scored_counts(chosen).sum())
    else:  # whole windows: a slice keeps a WindowList's unscored counts (windows.py)
        k, count = 0, 0
        for n in scored_counts(seg_windows).tolist():
            if k and count + n > limit:
                break
            k, count = k + 1, count + n
        chosen = seg_windows[:k]
    noise_batch = batch // 2 if batch > 1 else 2
    noise = TokenArrays.empty(count, divergence=True)
    staged = staging(count, scorer.device, divergence=True)
    with phase("noise_floor"):
        stats = run_pass(scorer, chosen, noise_batch, partial(compare, buffer, staged),
                         "noise floor (reference again)", cfg.progress)
    _flush(staged, noise, 0)
    noise.timing["pass_s"] = stats.seconds
    noise.batch_size = stats.batch_size
    return noise
