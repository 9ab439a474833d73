"""Logits for the positions HFLM reads, and no others (bench/lm.py's "Logits" paragraph).

HFLM asks for logits at every position of the padded batch; `LastPositions` (in place of
`lm._model_call`) gives the last k positions only (transformers' `logits_to_keep`), and where the
model's logits are its head on its decoder's output (`_HeadSplit`, checked on a probe) it applies
the head at each row's own last continuation positions only, leaving the rest of the (B, k, V)
logits zero: HFLM reads only the positions computed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from evalsuite.model.head import softcap
from evalsuite.model.loading import text_config


class LastPositions:
    """Replaces `lm._model_call`: logits for the last k positions of the batch that every row needs."""

    def __init__(self, lm, sched):  # sched: bench/lm.Schedule
        self.lm = lm
        self.full = lm._model_call  # the bound original
        self.known = sched.known  # each request's model input, built once for every dtype
        self.max_cont = sched.max_cont
        params = inspect.signature(lm.model.forward).parameters
        self.enabled = lm.backend == "causal" and "logits_to_keep" in params
        self.split = _HeadSplit.of(lm.model) if self.enabled else None  # per-row positions, where it holds
        self.trimmed = 0  # batches served with fewer positions (for the tests)

    def _row_length(self, row: list[int]) -> int | None:
        """The shortest known input that `row` is (right-padded with zeros), or None."""
        p = len(row)
        z = 0
        while z < p and row[p - 1 - z] == 0:
            z += 1
        for length in range(p - z, p + 1):
            if tuple(row[:length]) in self.known:
                return length
        return None

    def __call__(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if not self.enabled or attn_mask is not None or labels is not None:
            return self.full(inps, attn_mask, labels)
        p = inps.shape[1]
        lengths = [self._row_length(r) for r in inps.tolist()]  # (B,) on the host: one small copy
        if any(n is None for n in lengths):
            return self.full(inps)
        keep = p - min(lengths) + self.max_cont
        if keep >= p:
            return self.full(inps)
        self.trimmed += 1
        if self.split is not None:
            return self.split.logits(inps, lengths, self.max_cont, keep)
        # Indices, not an int: transformers then gathers a contiguous copy of the hidden states; an int
        # slices a strided view, which sends CPU BF16 matmuls down a path ~80x slower.
        positions = torch.arange(p - keep, p, device=inps.device)
        with torch.no_grad():
            # no KV cache: nothing reads it, and it would hold (B, T) keys and values of every layer
            return self.lm.model(inps, logits_to_keep=positions, use_cache=False).logits  # (B, keep, V)


@dataclass(frozen=True)
class _HeadSplit:
    """The model as its decoder and its LM head (with Gemma's soft-capping), where that is what its
    forward computes: checked on a probe when the dtype's scoring starts, bit for bit and in its
    dtype. Anything else (a logit scale, a head that is not a linear layer, a model over several
    devices) keeps the model's own forward."""

    decoder: torch.nn.Module
    head: torch.nn.Linear
    cap: float | None

    @staticmethod
    @torch.no_grad()
    def of(model) -> _HeadSplit | None:
        try:
            decoder, head = model.get_decoder(), model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        if decoder is None or decoder is model or not isinstance(head, torch.nn.Linear):
            return None
        if len({t.device for t in model.parameters()}) != 1:
            return None
        split = _HeadSplit(decoder, head, getattr(text_config(model.config), "final_logit_softcapping", None) or None)
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(0, head.weight.shape[0], (2, 12), generator=gen).to(head.weight.device)
        full = model(input_ids=probe, use_cache=False).logits  # (2, 12, V)
        mine = split._head(split._hidden(probe))
        same = (full.dtype == mine.dtype and full.shape == mine.shape and torch.equal(full.isnan(), mine.isnan())
                and torch.equal(full.nan_to_num(), mine.nan_to_num()))
        return split if same else None

    def _hidden(self, inps: torch.Tensor) -> torch.Tensor:
        out = self.decoder(input_ids=inps, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, P, H)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.head(hidden), self.cap)

    @torch.no_grad()
    def logits(self, inps: torch.Tensor, lengths: list[int], max_cont: int, keep: int) -> torch.Tensor:
        """(B, keep, V) as the model's last `keep` positions, computed at each row's last `max_cont` only."""
        b, p = inps.shape
        hidden = self._hidden(inps)  # (B, P, H)
        ends = torch.tensor(lengths, device=inps.device)[:, None]  # (B, 1)
        pos = ends - max_cont + torch.arange(max_cont, device=inps.device)  # (B, m): each >= p - keep >= 0
        rows = torch.arange(b, device=inps.device)[:, None]
        logits = self._head(hidden[rows, pos])  # (B, m, V), from a contiguous (B, m, H) gather
        out = logits.new_zeros((b, keep, logits.shape[-1]))
        out[rows, pos - (p - keep)] = logits
        return out
