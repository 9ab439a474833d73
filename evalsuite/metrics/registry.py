"""The one table of per-token statistics: what each pass records for every scored token.

Adding a statistic = a row here + its computation in divergence.py (the torch path, and the
fused kernel's column in kernels.py where it has one) + its reduction in stats.py + a test
against numpy float64 (docs/extending.md). Everything that stores, stages, merges or writes
per-token arrays (passes/scoring.py, passes/distributed.py, the resume state, per_token.npz)
iterates this table instead of naming the fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenStat:
    name: str  # field of TokenArrays, key in the resume state and per_token.npz ("<dtype>/<name>")
    dtype: torch.dtype  # staged on the device in this dtype during a pass
    divergence: bool  # only passes compared with the reference (test precisions, noise floor) have it
    empty: float | int | bool  # the value before a token is scored
    doc: str

    @property
    def host_dtype(self) -> np.dtype:
        """The host array's dtype: float64 for every float statistic (the summary reduces in float64)."""
        if self.dtype.is_floating_point:
            return np.dtype(np.float64)
        return torch.empty(0, dtype=self.dtype).numpy().dtype

    def host_empty(self, n: int) -> np.ndarray:
        return np.full(n, self.empty, dtype=self.host_dtype)


TOKEN_STATS: tuple[TokenStat, ...] = (
    TokenStat("nll", torch.float64, False, np.nan, "-log p(target), nats"),
    TokenStat("argmax", torch.int64, False, 0, "the most likely token"),
    TokenStat("nonfinite", torch.int64, False, 0, "count of non-finite logits"),
    TokenStat("kl", torch.float64, True, np.nan, "KL(ref || test) over the full vocabulary, nats"),
    TokenStat("top1_agree", torch.bool, True, False, "argmax equals the reference's"),
    TokenStat("p_ref", torch.float64, True, np.nan, "the reference's p(target)"),
    TokenStat("p_test", torch.float64, True, np.nan, "the compared pass's p(target)"),
    TokenStat("max_abs_dlogit", torch.float32, True, np.nan, "max over the vocabulary of |logit - reference logit|"),
)

TOKEN_FIELDS = tuple(s for s in TOKEN_STATS if not s.divergence)  # every pass
DIVERGENCE_FIELDS = tuple(s for s in TOKEN_STATS if s.divergence)  # passes compared with the reference
# written to per_token.npz for each test precision (the reference writes TOKEN_FIELDS' nll and argmax)
PER_TOKEN_FILE = ("nll", "kl", "argmax", "nonfinite")


def stats_for(divergence: bool) -> tuple[TokenStat, ...]:
    return TOKEN_STATS if divergence else TOKEN_FIELDS
