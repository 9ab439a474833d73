"""One pass: token windows fed to a Scorer in batches (`run_pass`), and the batch size it starts at.

Separate from forward.py, which turns one batch of ids into chunks of logits: this is the loop
over a pass's windows around it (grouping equal lengths, one upload per pass, halving the batch
on out-of-memory, the pass's time and peak memory), and it needs nothing of the Scorer's inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from evalsuite.errors import EvalsuiteError
from evalsuite.store.windows import scored_counts, unscored_of

if TYPE_CHECKING:
    from evalsuite.model.forward import Scorer


@dataclass
class PassStats:
    batch_size: int
    seconds: float
    n_tokens: int
    peak_memory_gib: float | None  # CUDA only: peak allocated during the pass, model weights included
    # (a model sharded over several GPUs: the largest of its GPUs' peaks)


OnChunk = Callable[[int, torch.Tensor, torch.Tensor], None]  # (flat token offset, logits (C,V), targets (C,))


def run_pass(scorer: Scorer, windows: list[np.ndarray], batch_size: int, on_chunk: OnChunk,
             desc: str, progress: bool = True,
             on_batch: Callable[[int, torch.Tensor], None] | None = None) -> PassStats:
    """Feed `windows` through the model in batches of equal-length windows (no padding).

    Offsets count scored targets (a WindowList's unscored ones are skipped, windows.py). On CUDA
    out-of-memory the batch size halves and the batch is redone (on_chunk writes to fixed
    positions, so a redo is harmless); at batch size 1 the error says what would fit.
    """
    import time

    device = scorer.device
    gpus = [d for d in scorer.devices if d.type == "cuda"]  # all the model's GPUs
    counts, heads = scored_counts(windows), unscored_of(windows)  # (W,) scored, (W,) unscored or None
    total = int(counts.sum())
    bar = tqdm(total=total, desc=desc, unit="tok", disable=not progress, leave=False, dynamic_ncols=True)
    _sync(gpus)
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
    t0 = time.perf_counter()
    flat, starts = _upload(windows, device)
    skips = _upload([heads], device)[0] if heads is not None and heads.any() else None  # (W,) on the device
    i, offset = 0, 0
    while i < len(windows):
        length = len(windows[i])
        j = i
        while j < len(windows) and j - i < batch_size and len(windows[j]) == length:
            j += 1
        ids = flat[starts[i] : starts[j]].view(j - i, length)  # (b, T+1): consecutive windows of one length
        n = int(counts[i:j].sum())
        skip = (skips[i:j], n) if skips is not None and heads[i:j].any() else None
        if on_batch is not None:
            on_batch(offset, ids)
        try:
            for start, logits, targets in scorer.chunks(ids, skip):
                on_chunk(offset + start, logits, targets)
        except torch.OutOfMemoryError as exc:
            del ids
            torch.cuda.empty_cache()
            if batch_size == 1:
                raise EvalsuiteError(
                    f"out of GPU memory at batch size 1 and sequence length {length - 1}: "
                    "use a shorter --seq-len, a smaller --buffer-gib, or a larger GPU"
                ) from exc
            batch_size = max(1, batch_size // 2)
            bar.set_postfix(batch=batch_size)
            continue
        offset += n
        i = j
        bar.update(n)
    _sync(gpus)
    seconds = time.perf_counter() - t0
    bar.close()
    peak = max(torch.cuda.max_memory_allocated(gpu) for gpu in gpus) / 2**30 if gpus else None
    return PassStats(batch_size=batch_size, seconds=seconds, n_tokens=total, peak_memory_gib=peak)


def _upload(windows: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """All windows on the device as one flat (sum of lengths,) tensor, and where each starts.

    One copy per pass instead of one per batch: a copy from pageable host memory waits for the
    GPU to finish its queue, and the GPU then idles while Python launches the next batch's
    kernels. The ids are small (8 bytes a token) next to the segment's logits buffer.
    """
    starts = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum([len(w) for w in windows], out=starts[1:])
    flat = torch.from_numpy(np.concatenate(windows).astype(np.int64, copy=False)) if windows else torch.zeros(0, dtype=torch.int64)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return flat, starts


def _sync(gpus: list[torch.device]) -> None:
    for gpu in gpus:
        torch.cuda.synchronize(gpu)


# Activation elements per batch (tokens x width) on CUDA: the Llama-2-7B shape's 8 x 2048 x 4096.
BATCH_ACTIVATIONS = 8 * 2048 * 4096
BATCH_TOKENS = (16384, 65536)  # bounds on tokens per batch on CUDA


def auto_batch_size(device: torch.device, seq_len: int, hidden: int | None = None) -> int:
    """A starting batch size; on CUDA `run_pass` halves it on out-of-memory.

    Why by width: an eager HF decoder launches the same few hundred kernels per batch whatever
    its size, so a narrow model at a 7B's batch leaves the GPU waiting on Python; holding
    tokens x width near the 7B shape's keeps the activations' memory what a 7B needs and lets a
    0.5B run 32 windows of 2048 (measured on an H200: 1.29x the plain loop's tokens/s at batch
    8, 1.38x at batch 32; docs/performance.md). The chunked head keeps the logits out of this budget.
    """
    if device.type != "cuda":
        return max(1, 1024 // max(1, seq_len))
    lo, hi = BATCH_TOKENS
    target_tokens = lo if not hidden else min(hi, max(lo, BATCH_ACTIVATIONS // hidden))
    return max(1, target_tokens // max(1, seq_len))
