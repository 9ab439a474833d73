"""The reference's logits of one segment as the test passes read them: kept, or re-applied from hidden states.

Why: the reference's float32 logits take 4 bytes x vocabulary per token (49,953 floats at 7B, 262,144
for Gemma 3); its final hidden states, the LM head's input, 4 bytes x width (4,096 at 7B, 640 for
Gemma 3 270M). A `KeptReference` holds the hidden states (N, H), the reference's FrozenHead and the
chunk bounds its pass used, and gives `kept[a:b]` (b - a, V) float32 by re-applying the head to the
very chunks the reference pass applied it to: same function, same rows, same weights, so the
values are the reference's own bit for bit. Or it holds the logits (N, V) themselves, where they
fit the device buffer and re-applying would only cost time (passes/reference.py decides).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from evalsuite.model.head import FrozenHead


class KeptReference:
    """`kept[a:b]` -> the reference's logits (b - a, V) float32 of segment tokens [a, b); `len(kept)` = N."""

    def __init__(self, n: int, vocab: int, device: torch.device, head: FrozenHead | None, logits: bool):
        self.n, self.vocab, self.head = n, vocab, head
        self.logits = torch.empty((n, vocab), dtype=torch.float32, device=device) if logits else None  # (N, V)
        width = head.weight.shape[1] if head is not None else 0
        self.hidden = torch.empty((n, width), dtype=torch.float32, device=device) if head is not None else None  # (N, H)
        self._starts: list[int] = []  # chunk starts of the reference pass, in order
        self._last: tuple[int, int, torch.Tensor] | None = None  # the last re-applied chunk (a, b, (b-a, V))

    @classmethod
    def from_hidden(cls, hidden: torch.Tensor, bounds: np.ndarray, head: FrozenHead, logits: bool) -> KeptReference:
        """A stored segment (hidden (N, H), bounds (K+1,)): logits re-applied into (N, V) now if `logits`."""
        kept = cls(0, head.vocab, hidden.device, head, logits=False)
        kept.n, kept.hidden, kept._starts = len(hidden), hidden, [int(b) for b in bounds[:-1]]
        if int(bounds[-1]) != kept.n:
            raise ValueError(f"chunk bounds end at {int(bounds[-1])}, the hidden states have {kept.n} rows")
        if logits:
            kept.logits = kept.materialize()
            kept.hidden = kept.head = None
        return kept

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> KeptReference:
        """A stored segment's logits (N, V), read as they are."""
        kept = cls(0, logits.shape[1], logits.device, None, logits=False)
        kept.n, kept.logits = len(logits), logits
        return kept

    def __len__(self) -> int:
        return self.n

    @property
    def bounds(self) -> np.ndarray:
        """(K+1,) int64: chunk k of the reference pass was tokens [bounds[k], bounds[k+1])."""
        return np.array([*self._starts, self.n], dtype=np.int64)

    def keep(self, pos: int, hidden: torch.Tensor) -> torch.Tensor:
        """Store the reference pass's chunk hidden (C, H) at `pos`; return the stored rows, to apply the head to.

        A batch redone after out-of-memory starts again at its first position: the chunks recorded
        from there on are forgotten (their rows are overwritten).
        """
        while self._starts and self._starts[-1] >= pos:
            self._starts.pop()
        self._starts.append(pos)
        rows = self.hidden[pos : pos + len(hidden)]
        rows.copy_(hidden)
        return rows

    def __getitem__(self, s: slice) -> torch.Tensor:
        a, b = s.start or 0, self.n if s.stop is None else min(s.stop, self.n)
        if self.logits is not None:
            return self.logits[a:b]
        bounds = self.bounds
        k = int(np.searchsorted(bounds, a, side="right")) - 1
        parts = []
        while k < len(bounds) - 1 and bounds[k] < b:
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            chunk = self._chunk(lo, hi)  # (hi - lo, V)
            parts.append(chunk if (lo, hi) == (a, b) else chunk[max(a, lo) - lo : min(b, hi) - lo])
            k += 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _chunk(self, lo: int, hi: int) -> torch.Tensor:
        """The reference pass's chunk [lo, hi) re-applied (the last one is remembered: a pass at another
        batch size, like the noise floor's, asks for parts of one chunk in turn)."""
        if self._last is None or self._last[:2] != (lo, hi):
            self._last = (lo, hi, self.head(self.hidden[lo:hi]))
        return self._last[2]

    def materialize(self) -> torch.Tensor:
        """All N rows' logits (N, V), chunk by chunk as the reference pass computed them."""
        out = torch.empty((self.n, self.vocab), dtype=torch.float32, device=self.hidden.device)
        bounds = self.bounds
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            out[lo:hi] = self.head(self.hidden[lo:hi])
        return out

    def release(self) -> None:
        """Forget what the test passes will not read: the hidden states and head where logits are kept,
        the last re-applied chunk otherwise."""
        self._last = None
        if self.logits is not None:
            self.hidden = self.head = None

    @property
    def nbytes(self) -> int:
        """Device bytes held: logits, hidden states and the head's copy."""
        held = [t for t in (self.logits, self.hidden) if t is not None]
        return sum(t.numel() * t.element_size() for t in held) + (self.head.nbytes if self.head else 0)


def head_seconds_per_token(head: FrozenHead, hidden: torch.Tensor) -> float:
    """Seconds the FP32 head takes per token on rows `hidden` (C, H), synchronised on CUDA: what
    re-applying it costs a pass per token. The fastest of up to three calls (a busy host slows single
    calls); one call where it takes 20 ms or more (precise enough; on a CPU one Gemma 3 chunk is 0.5 s)."""
    best = float("inf")
    for _ in range(3):
        _sync(hidden.device)
        t0 = time.perf_counter()
        head(hidden)
        _sync(hidden.device)
        best = min(best, time.perf_counter() - t0)
        if best >= 0.02:
            break
    return best / max(1, len(hidden))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
