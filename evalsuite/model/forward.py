"""Run a causal LM over token windows and hand out its logits a chunk of tokens at a time.

Why not `model(ids).logits`: for a 262k-token vocabulary one 2048-token window's FP32 logits
are 2 GB, and the plain loop materialises them for the whole batch. We run the decoder body,
then apply the LM head to C tokens at a time, so the largest float32 tensor is (C, V).
That split is verified on a probe against the model's own forward when the model is loaded;
architectures where it does not match exactly fall back to the full forward.

The head itself (padded where cuBLAS needs it) is head.py; a pass's loop over its windows in
batches (`run_pass`, `auto_batch_size`) is batching.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from evalsuite.model.compiled import compile_modules, warm_up
from evalsuite.model.head import FrozenHead, apply_frozen, apply_head, freeze, padded_head, softcap
from evalsuite.model.loading import model_part

# float32 bytes of one (C, V) logits chunk. On CUDA the fused kernel (kernels.py) needs no
# temporaries beyond the chunk; the CPU path makes float64 copies, so its chunks stay small.
CHUNK_BYTES = {"cuda": 1024 * 2**20, "cpu": 128 * 2**20}


class Scorer:
    """Wraps a loaded model: `chunks(ids)` yields (start, logits (C, V), targets (C,)) on `device`.

    `device` is the run's device, where the per-token consumers live (the reference logits buffer,
    the staging tensors). A model sharded over several GPUs (loading.load_model with device_map
    "auto") takes its input ids on its embedding's device and gives its logits on its LM head's;
    the Scorer moves ids and logits where they belong, and only when the devices differ: on one
    device nothing is copied.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, pad_head: bool | None = None,
                 compile: bool = False):
        self.model = model
        self.device = device
        self._home = concrete(device)
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        self.chunk_tokens = max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"]) // (4 * self.vocab_size))
        # Devices the parameters sit on (the run's device first): more than one for a sharded model.
        self.devices = tuple(dict.fromkeys([self._home, *(p.device for p in model.parameters()
                                                            if p.device.type != "meta")]))
        self.input_device = _weight_device(model_part(model, "get_input_embeddings")) or self._home
        self.head_device = _weight_device(head) or self._home
        self.compiled: list[str] = []  # names of the modules compiled under --compile (set below)
        self.split_reason: str | None = None  # why the full forward is used, where it is
        self.frozen: FrozenHead | None = None  # set by freeze_head: the head's weights this Scorer applies
        self.hidden_out = False  # chunks() yields hidden states (C, H) instead of logits (the reference keeping them)
        self.split = self._verified_split()
        # (W (Vpad, H), bias (Vpad,) or None): see head.py. None: the head as it is.
        self.padded_head = padded_head(head, self.vocab_size, pad_head, self.sharded) if self.split else None
        # --compile (compiled.py): after the split check, whose (1, 12) probe would fix batch size 1
        self.compiled = compile_modules(model) if compile else []
        self.compile_s = warm_up(self._forward_ids, self.vocab_size, self.input_device) if self.compiled else None

    def freeze_head(self) -> FrozenHead | None:
        """Apply the head from here on through a copy of its weights, and return that copy (None: can't).

        Why: the reference pass computes its logits through the FrozenHead it keeps for the test
        passes, so the logits they re-apply are its own bit for bit. Only the decoder/head split on
        one device can (a full forward computes the head inside the model; a sharded model's head
        sits on another GPU than the kept hidden states).
        """
        if not self.split or self.sharded:
            return None
        cap = getattr(self.model.config, "final_logit_softcapping", None) or None
        self.frozen = freeze(self.model.get_output_embeddings(), self.padded_head, self.vocab_size, cap)
        return self.frozen

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (C, H) -> logits (C, V) on the run's device: the head as chunks() applies it."""
        return _to(self._split_logits(hidden), self._home)

    @property
    def sharded(self) -> bool:
        return len(self.devices) > 1

    @property
    def logits_path(self) -> str:
        return "decoder-then-chunked-head" if self.split else "full-forward"

    def _split_logits(self, hidden: torch.Tensor, padded: bool = True) -> torch.Tensor:
        """hidden (C, H) -> logits (C, V); through the frozen head, else the padded one where there is one."""
        head = self.model.get_output_embeddings()
        if padded and self.frozen is not None:
            return softcap(apply_frozen(head, hidden, self.frozen), self.frozen.cap)
        logits = apply_head(head, hidden, self.padded_head if padded else None)
        return softcap(logits, getattr(self.model.config, "final_logit_softcapping", None))

    def _body(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden state (B, T, H), on the LM head's device."""
        one = self.compiled and ids.shape[0] == 1  # compiled code is specialised for batches >= 2
        out = self.model.get_decoder()(input_ids=_to(ids.expand(2, -1) if one else ids, self.input_device),
                                       use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return _to(hidden[:1] if one else hidden, self.head_device)  # once per batch, not per chunk

    def _forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits

    @torch.inference_mode()
    def _verified_split(self) -> bool:
        try:
            decoder = self.model.get_decoder()
        except (AttributeError, NotImplementedError):
            return False
        if decoder is None or decoder is self.model or self.model.get_output_embeddings() is None:
            self.split_reason = "no separate decoder and output embedding"
            return False
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(0, self.vocab_size, (1, 12), generator=gen).to(self.input_device)
        try:
            full = self.model(input_ids=probe, use_cache=False).logits
            split = _to(self._split_logits(self._body(probe), padded=False), full.device)  # compared where the full forward ends
        except Exception as exc:  # an architecture whose decoder can't be called alone; recorded in provenance
            self.split_reason = f"the decoder alone raised {type(exc).__name__}: {str(exc)[:200]}"
            return False
        same = full.shape == split.shape and torch.equal(full.isnan(), split.isnan()) and bool(
            torch.allclose(full.float().nan_to_num(), split.float().nan_to_num(), rtol=1e-4, atol=1e-4)
        )
        if not same:
            self.split_reason = "decoder + head did not reproduce the model's logits on a probe"
        return same

    @torch.inference_mode()
    def chunks(self, ids: torch.Tensor, skip: tuple[torch.Tensor, int] | None = None
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """ids (B, T+1) on the device: inputs ids[:, :-1], targets ids[:, 1:], flattened row-major.

        skip: None (every target scored), or (unscored (B,) int64 on ids' device, n scored targets):
        row b's first unscored[b] targets are context only (lm-eval's last window of a document,
        windows.py). Only the n scored positions are yielded, in the same row-major order, and
        only their hidden states reach the head. Logits and targets are yielded on `self.device`,
        whichever devices the model spans.
        """
        home = self._home
        inputs, targets = ids[:, :-1], ids[:, 1:].reshape(-1)  # (B, T), (B*T,)
        index = None if skip is None else scored_positions(skip[0], inputs.shape[1], skip[1])  # (n,)
        targets = _to(targets if index is None else targets[index], home)  # (n,)
        if self.split:
            hidden = self._body(inputs)  # (B, T, H) on the head's device
            hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
            if index is not None:
                hidden = hidden.index_select(0, _to(index, hidden.device))  # (n, H): the scored positions
            for start in range(0, hidden.shape[0], self.chunk_tokens):
                stop = min(start + self.chunk_tokens, hidden.shape[0])
                part = hidden[start:stop]  # (C, H)
                yield start, _to(part, home) if self.hidden_out else self.head_logits(part), targets[start:stop]
        else:
            logits = self._forward_ids(_to(inputs, self.input_device))  # (B, T, V)
            logits = logits.reshape(-1, logits.shape[-1])
            rows = None if index is None else _to(index, logits.device)
            n = logits.shape[0] if rows is None else len(rows)
            for start in range(0, n, self.chunk_tokens):
                stop = min(start + self.chunk_tokens, n)
                part = logits[start:stop] if rows is None else logits.index_select(0, rows[start:stop])
                yield start, _to(part, home), targets[start:stop]


def scored_positions(unscored: torch.Tensor, length: int, n: int) -> torch.Tensor:
    """(n,) int64 flat positions in (B*length) of each row's scored targets, row b's last length - unscored[b].

    Built on unscored's device with `n` known on the host, so no host sync (no nonzero, no .item()).
    """
    counts = length - unscored  # (B,) scored per row
    rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=n)  # (n,)
    first = torch.cumsum(counts, 0) - counts  # (B,) where each row's scored targets begin among the n
    within = torch.arange(n, device=counts.device) - first[rows]  # (n,) index among the row's scored targets
    return rows * length + unscored[rows] + within


def concrete(device: torch.device) -> torch.device:
    """`device` with its index: "cuda" is the current GPU, as tensors report it (cuda:0)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on `device` (a concrete device): x itself where it already is, else one copy (GPU to GPU: no host sync)."""
    return x if x.device == device else x.to(device)


def _weight_device(module: torch.nn.Module | None) -> torch.device | None:
    """Where a module's weight sits (None where it has none, or it is offloaded to the meta device)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    return None
