"""One pass of one model over a segment of windows, and the per-token arrays it fills.

The runner (runner.py) decides what runs when; this module is the mechanics of a pass: where
each chunk's statistics go (device-side staging, flushed to host once per pass), the observers'
notifications, timing and peak memory, and the noise-floor pass.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from evalsuite.config import RunConfig
from evalsuite.metrics import kernels
from evalsuite.metrics.divergence import reference_tokens, token_divergence
from evalsuite.metrics.registry import DIVERGENCE_FIELDS, TOKEN_FIELDS, stats_for
from evalsuite.model.batching import run_pass
from evalsuite.model.forward import Scorer
from evalsuite.model.head import VOCAB_PAD, pads_by_default
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


def warm_kernels(scorer: Scorer, role: str, prewarm: threading.Thread | None = None) -> float:
    """Seconds spent compiling (or loading from Triton's cache) the fused divergence kernel for this
    pass's logits, before the pass is timed.

    Why: Triton compiles per vocabulary size, dtype pair and stride alignment at the first call,
    and the first run on a machine did it inside the first timed pass (6,257 instead of 310,188
    tokens/s on an H200, docs/performance.md). The probe is a real chunk of this scorer (ids
    (1, 3)), so the test logits' layout (a padded head's view included) is the pass's. The time
    counts any wait for `prewarm_kernels`' thread: the reference waits only for its own variants
    (`reference_ready`), so a small model's reference pass starts while the test variants compile
    (the 0.5B shape waited 2.6 s for all of them on an H200); a test pass waits for the thread."""
    if not kernels.available(scorer.device) or scorer.device.type != "cuda":
        return 0.0
    import time

    t0 = time.perf_counter()
    if prewarm is not None:  # a prewarm_kernels thread
        if role == "reference":
            prewarm.reference_ready.wait()
        else:
            prewarm.join()
    if role == "reference":
        _variants(scorer.vocab_size, scorer.device, None)
    else:
        _, logits, _ = next(iter(scorer.chunks(torch.zeros((1, 3), dtype=torch.int64, device=scorer.device))))
        _variants(scorer.vocab_size, scorer.device, logits)
    torch.cuda.synchronize(scorer.device)
    return time.perf_counter() - t0


def _variants(vocab: int, device: torch.device, test: torch.Tensor | None) -> None:
    """Run the fused kernel on the layouts a pass hands it: kept reference rows (2, V) float32
    against `test` (None: against themselves), from the buffer's start and from a row whose start
    is not 16-byte aligned. Why both: Triton specialises on pointer alignment, and with V not a
    multiple of 4 most chunks of a kept buffer start unaligned (row r at 4 * V * r bytes), which
    compiled a second variant inside the first timed pass."""
    ref = torch.zeros((2, vocab), dtype=torch.float32, device=device)  # (2, V) as kept
    kernels.fused_rows(ref, ref if test is None else test)
    if vocab % 4:
        shifted = torch.zeros(2 * vocab + 1, dtype=torch.float32, device=device)[1:].view(2, vocab)  # 4 bytes in
        kernels.fused_rows(shifted, ref if test is None else test)


def prewarm_kernels(device: torch.device, vocab: int | None, dtypes) -> threading.Thread | None:
    """Compile the fused kernel's likely variants in a background thread while the reference loads.

    Why: on a machine with an empty Triton cache the first compile also initialises Triton
    (1.2-1.9 s at the 7B shape on an H200, docs/performance.md), and nothing else needs the CPU
    while `from_pretrained` copies weights to the GPU. The variants (`_variants`): the reference
    against itself, and each logits dtype against it with the vocabulary's own row stride and with
    a padded head's (a multiple of VOCAB_PAD). The reference's come first (`reference_ready`).
    `warm_kernels` waits for them, or joins the thread for a test pass, before it times its own
    probe, which then finds the kernel compiled where the guess was right and compiles it where
    not: a wrong guess costs time, never a number.
    """
    if not vocab or device.type != "cuda" or not kernels.available(device):
        return None

    def work():
        try:
            if device.index is not None:  # (torch.device("cuda") means the current device: no index to set)
                torch.cuda.set_device(device)
            _variants(vocab, device, None)
            torch.cuda.synchronize(device)
            thread.reference_ready.set()  # the reference's variants: its pass may start
            padded = -(-vocab // VOCAB_PAD) * VOCAB_PAD
            for dtype in dict.fromkeys(dtypes):
                if pads_by_default(vocab, dtype.itemsize):  # a padded head's (2, Vpad)[:, :V] view
                    _variants(vocab, device, torch.zeros((2, padded), dtype=dtype, device=device)[:, :vocab])
                else:
                    _variants(vocab, device, torch.zeros((2, vocab), dtype=dtype, device=device))
            torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - only a head start: warm_kernels compiles whatever is missing
            thread.error = exc
        finally:
            thread.reference_ready.set()

    thread = threading.Thread(target=work, name="evalsuite-prewarm", daemon=True)
    thread.error = None  # what stopped it early, if anything (tests, perf/kernel_variants.py)
    thread.reference_ready = threading.Event()  # set once the reference's variants are compiled
    thread.start()
    return thread


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
