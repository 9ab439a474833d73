"""Token windows: what every pass scores, in one type whichever windowing made them.

A window is one array of token ids: its inputs are all but the last, its targets all but the
first. In the stream windowing (corpus.py) every target is scored. In the lm-eval windowing
(rolling.py) the last window of a long document is fed a full `seq_len` of context but scores
only its last few targets, as lm-eval's `loglikelihood_rolling` does; such a window's first
targets are *unscored*. Every per-token array of a run holds the scored targets only, so the
count that matters everywhere (offsets, segments, buffers) is `scored_counts`, not `len(w) - 1`.

Why a list that carries the unscored counts (WindowList) rather than a second argument: the
windows are sliced into segments, shards, noise-floor and repair subsets in several places, and
each slice must keep its counts; a slice of a WindowList is a WindowList.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

STREAM = "stream"
LM_EVAL = "lm-eval"
WINDOWINGS = (STREAM, LM_EVAL)


class WindowList(list):
    """Windows (each (T_i + 1,) int64) with `unscored` (W,) int64: leading targets of each window not scored."""

    def __init__(self, windows=(), unscored=None):
        super().__init__(windows)
        self.unscored = np.zeros(len(self), np.int64) if unscored is None else np.asarray(unscored, np.int64)
        if len(self.unscored) != len(self):
            raise ValueError(f"{len(self)} windows but {len(self.unscored)} unscored counts")

    def __getitem__(self, key):
        if isinstance(key, slice):
            return WindowList(list.__getitem__(self, key), self.unscored[key])
        return list.__getitem__(self, key)


def unscored_of(windows) -> np.ndarray | None:
    """(W,) unscored leading targets per window, or None for a plain list (every target scored)."""
    return getattr(windows, "unscored", None)


def scored_counts(windows) -> np.ndarray:
    """(W,) int64 scored targets per window: len(w) - 1, less its unscored leading targets."""
    counts = np.fromiter((len(w) - 1 for w in windows), dtype=np.int64, count=len(windows))
    unscored = unscored_of(windows)
    return counts if unscored is None else counts - unscored


@dataclass(frozen=True)
class TokenWindows:
    windows: list[np.ndarray]  # each (T_i + 1,) int64: context, then targets (a WindowList in lm-eval windowing)
    target_bytes: np.ndarray  # (N,) int64 UTF-8 bytes covered by each scored token
    context: str  # "bos" or "previous-token" (stream); "bos" or "eos": lm-eval's prefix token (lm-eval)
    seq_len: int
    windowing: str = STREAM
    documents: np.ndarray | None = None  # (N,) int64 document index of each scored token (lm-eval windowing)
    n_words: int | None = None  # lm-eval's word count of the scored documents (its word_perplexity's divisor)

    @property
    def n_tokens(self) -> int:
        return int(scored_counts(self.windows).sum())

    @property
    def described(self) -> str:
        """How the windows were made, for the run's first message."""
        if self.documents is None:
            return f"{self.context} context"
        return f"lm-eval windowing: {len(np.unique(self.documents))} documents, each from {self.context.upper()}"

    def part(self, first: int, last: int) -> TokenWindows:
        """Windows [first, last) with their scored tokens' bytes and documents: a data-parallel rank's share."""
        lo = int(scored_counts(self.windows[:first]).sum())
        sub = self.windows[first:last]  # a WindowList's slice keeps its unscored counts
        hi = lo + int(scored_counts(sub).sum())
        return replace(self, windows=sub, target_bytes=self.target_bytes[lo:hi],
                       documents=None if self.documents is None else self.documents[lo:hi])

    @property
    def targets(self) -> np.ndarray:  # (N,) the scored token ids, in window order
        unscored = unscored_of(self.windows)
        if unscored is None:
            return np.concatenate([w[1:] for w in self.windows])
        return np.concatenate([w[1 + int(u):] for w, u in zip(self.windows, unscored, strict=True)])


def cut(windows, budget: int, keep: int = 0) -> list:
    """The windows with the last one shortened so they score max(budget, keep) tokens.

    Why: on a CPU a window (2,048 tokens) is several times the repair's or the noise floor's
    budget there (512, 1,024), and every repair candidate scores these tokens. A prefix of a window is the same causal computation for
    the tokens it keeps (only GEMM shapes differ, as between batch sizes); `keep` makes sure the
    first non-finite token stays in. Windows with unscored leading targets (lm-eval windowing)
    are left whole."""
    if unscored_of(windows) is not None or not windows:
        return windows
    need, out = max(budget, keep), []
    for w in windows:
        if need <= 0:
            break
        out.append(w[: need + 1])  # (T + 1,): a window's first token is context
        need -= len(out[-1]) - 1
    return out
