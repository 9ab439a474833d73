"""Run a causal LM over token windows and hand out its logits a chunk of tokens at a time.

Why not `model(ids).logits`: for a 262k-token vocabulary one 2048-token window's FP32 logits
are 2 GB, and the plain loop materialises them for the whole batch. We run the decoder body,
then apply the LM head to C tokens at a time, so the largest float32 tensor is (C, V).
That split is verified on a probe against the model's own forward when the model is loaded;
architectures where it does not match exactly fall back to the full forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from evalsuite.errors import EvalsuiteError

# float32 bytes of one (C, V) logits chunk. On CUDA the fused kernel (kernels.py) needs no
# temporaries beyond the chunk; the CPU path makes float64 copies, so its chunks stay small.
CHUNK_BYTES = {"cuda": 1024 * 2**20, "cpu": 32 * 2**20}


class Scorer:
    """Wraps a loaded model: `chunks(ids)` yields (start, logits (C, V), targets (C,))."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        self.chunk_tokens = max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"]) // (4 * self.vocab_size))
        self.split = self._verified_split()

    @property
    def logits_path(self) -> str:
        return "decoder-then-chunked-head" if self.split else "full-forward"

    def _split_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _body(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model.get_decoder()(input_ids=ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @torch.inference_mode()
    def _verified_split(self) -> bool:
        try:
            decoder = self.model.get_decoder()
        except (AttributeError, NotImplementedError):
            return False
        if decoder is None or decoder is self.model or self.model.get_output_embeddings() is None:
            return False
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(0, self.vocab_size, (1, 12), generator=gen).to(self.device)
        try:
            full = self.model(input_ids=probe, use_cache=False).logits
            split = self._split_logits(self._body(probe))
        except Exception:
            return False
        return full.shape == split.shape and torch.equal(full.isnan(), split.isnan()) and bool(
            torch.allclose(full.float().nan_to_num(), split.float().nan_to_num(), rtol=1e-4, atol=1e-4)
        )

    @torch.inference_mode()
    def chunks(self, ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """ids (B, T+1) on the device: inputs ids[:, :-1], targets ids[:, 1:], flattened row-major."""
        inputs, targets = ids[:, :-1], ids[:, 1:].reshape(-1)  # (B, T), (B*T,)
        if self.split:
            hidden = self._body(inputs)  # (B, T, H)
            hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
            for start in range(0, hidden.shape[0], self.chunk_tokens):
                stop = min(start + self.chunk_tokens, hidden.shape[0])
                yield start, self._split_logits(hidden[start:stop]), targets[start:stop]
        else:
            logits = self.model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
            logits = logits.reshape(-1, logits.shape[-1])
            for start in range(0, logits.shape[0], self.chunk_tokens):
                stop = min(start + self.chunk_tokens, logits.shape[0])
                yield start, logits[start:stop], targets[start:stop]


@dataclass
class PassStats:
    batch_size: int
    seconds: float
    n_tokens: int
    peak_memory_gib: float | None  # CUDA only: peak allocated during the pass, model weights included


OnChunk = Callable[[int, torch.Tensor, torch.Tensor], None]  # (flat token offset, logits (C,V), targets (C,))


def run_pass(scorer: Scorer, windows: list[np.ndarray], batch_size: int, on_chunk: OnChunk,
             desc: str, progress: bool = True,
             on_batch: Callable[[int, torch.Tensor], None] | None = None) -> PassStats:
    """Feed `windows` through the model in batches of equal-length windows (no padding).

    On CUDA out-of-memory the batch size halves and the batch is redone (on_chunk writes to
    fixed positions, so a redo is harmless); at batch size 1 the error says what would fit.
    """
    import time

    device = scorer.device
    total = sum(len(w) - 1 for w in windows)
    bar = tqdm(total=total, desc=desc, unit="tok", disable=not progress, leave=False, dynamic_ncols=True)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    i, offset = 0, 0
    while i < len(windows):
        length = len(windows[i])
        j = i
        while j < len(windows) and j - i < batch_size and len(windows[j]) == length:
            j += 1
        ids = torch.from_numpy(np.stack(windows[i:j])).to(device, non_blocking=True)  # (b, T+1)
        if on_batch is not None:
            on_batch(offset, ids)
        try:
            for start, logits, targets in scorer.chunks(ids):
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
        n = (j - i) * (length - 1)
        offset += n
        i = j
        bar.update(n)
    _sync(device)
    seconds = time.perf_counter() - t0
    bar.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return PassStats(batch_size=batch_size, seconds=seconds, n_tokens=total, peak_memory_gib=peak)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def auto_batch_size(device: torch.device, seq_len: int) -> int:
    """A starting batch size; on CUDA `run_pass` halves it on out-of-memory."""
    target_tokens = 16384 if device.type == "cuda" else 1024
    return max(1, target_tokens // max(1, seq_len))
