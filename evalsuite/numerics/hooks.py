"""Forward hooks that watch module outputs during a pass, with no host sync inside a hook.

Which modules (found by structure and class name, so any decoder-only transformers model works):
- "layer": each decoder layer (the residual stream after it): the children of the decoder's
  ModuleList whose length is `num_hidden_layers` (or the longest ModuleList of one class);
- "attention" / "mlp": a decoder layer's direct children named like self_attn/attn/attention
  or mlp/feed_forward/ffn, or whose class name contains Attention / MLP / FeedForward;
- "norm": every module whose class name contains "Norm" (RMSNorm, LayerNorm), final norm included;
- "embedding" and "lm_head": `get_input_embeddings()` and `get_output_embeddings()`. The Scorer
  applies the head a chunk of tokens at a time, so its hook fires once per chunk.

What a hook does: the output's absmax, `vector_norm(x, inf)` (one reduction, no temporary),
kept as a 0-d device tensor; the batch's values are stacked once when the next batch starts and
copied to the host once at the end of the pass. On the reference pass it also adds the output
to a per-module histogram of |x| with `HIST_BINS_PER_BIT` bins per power of two (read off the
float32 bit pattern), from which a high percentile is read to within one bin; the histogram sees
at most `HIST_SAMPLE` elements per call (every k-th row of the output, so a (C, V) logits chunk
costs no more than a hidden state).
A model sharded over several GPUs (--device-map auto) calls each hook on its module's GPU: the
absmax stays there until the batch is closed (one stack and one copy per GPU per batch), and each
GPU gets its own histogram, added into the recorder's device's at the end: no whole activation
crosses devices, and no hook syncs with the host.
Execution order is the order of each module's first call: a decoder layer finishes after its
attention, MLP and norms, so "first non-finite module" means the first output a user could
see turn inf/NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evalsuite.model.modules import Watched

HIST_SHIFT = 20  # float32 bits >> 20 keeps the 8 exponent bits and the top 3 mantissa bits
HIST_BINS = 1 << (31 - HIST_SHIFT)  # 2048 bins cover every float32 magnitude
HIST_BINS_PER_BIT = 1 << (23 - HIST_SHIFT)  # 8 (linear within each power of two)
_INF_BIN = 0x7F800000 >> HIST_SHIFT  # first bin of exponent 255: inf and NaN
# Elements per hook call that enter the histogram: >= 26 above a p99.99 per call, and the
# scatter-add's cost (atomics on a few hot bins on CUDA) stays a small share of the pass.
HIST_SAMPLE = 1 << 18
PERCENTILE = 0.9999
def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None)


def magnitude_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts of |x| per bin (HIST_BINS,) int64: a float32's bits >> 20 with the sign cleared, i.e.
    its exponent and top 3 mantissa bits: 8 linear bins per power of two over the whole float32
    range (zero and subnormals in the lowest bins, inf and NaN in the top ones).

    Counted by sorting the bin numbers and searching the bin edges: integer ops, deterministic
    (nothing that `torch.use_deterministic_algorithms` forbids, as it does `histc`), and no host
    sync. Why not `bincount`: on CUDA it reads its input's min and max back to the host, two
    syncs per hooked module per batch, which left the GPU idle while Python caught up."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)  # (R, D) view
    step = max(1, math.ceil(rows.numel() / HIST_SAMPLE))
    bits = rows[::step].float().view(torch.int32)  # every step-th row: at most HIST_SAMPLE elements
    keys = torch.sort(((bits & 0x7FFFFFFF) >> HIST_SHIFT).reshape(-1)).values  # (S,) bin numbers, sorted
    edges = torch.searchsorted(keys, _bin_edges(keys.device))  # (HIST_BINS + 1,) first index of each bin
    return edges.diff()


_EDGES: dict[torch.device, torch.Tensor] = {}


def _bin_edges(device: torch.device) -> torch.Tensor:
    if device not in _EDGES:
        _EDGES[device] = torch.arange(HIST_BINS + 1, dtype=torch.int32, device=device)
    return _EDGES[device]


def percentile_from_histogram(counts: np.ndarray, q: float = PERCENTILE) -> float | None:
    """Upper edge of the bin holding the q-quantile: an estimate that errs high by < 1 bin (12.5 %)."""
    total = counts.sum()
    if total <= 0:
        return None
    b = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    if b + 1 >= _INF_BIN:
        return math.inf
    return float(np.array([(b + 1) << HIST_SHIFT], dtype=np.int32).view(np.float32)[0])


class Recorder:
    """Hooks on `watched`; `start_batch` per batch; `finish` syncs once and returns the per-batch absmax.

    `capture(slot, x)`, when given, also receives each decoder layer's and the embedding's output
    (for the layer-wise divergence sample), with slot 0 = embedding and slot i+1 = layer i.
    """

    def __init__(self, watched: list[Watched], device: torch.device, histogram: bool, capture=None):
        self.watched, self.device, self.capture = watched, device, capture
        self.hist = torch.zeros((len(watched), HIST_BINS), dtype=torch.int64,
                                device=device) if histogram else None
        # histograms per device the hooks run on (a sharded model): added into self.hist in finish()
        self._hists: dict[torch.device, torch.Tensor] = {} if self.hist is None else {self.hist.device: self.hist}
        self.order: list[int] = []  # module indices in order of first call
        self._seen: set[int] = set()
        self._vals: list[torch.Tensor] = []  # 0-d absmax tensors of the current batch
        self._idx: list[int] = []
        self._batches: list[tuple[int, torch.Tensor, list[int]]] = []  # (token offset, (K,) absmax, module idx)
        self._offset: int | None = None
        self._handles: list = []

    def attach(self) -> None:
        for i, w in enumerate(self.watched):
            slot = 0 if w.kind == "embedding" else (w.layer + 1 if w.kind == "layer" else None)
            self._handles.append(w.module.register_forward_hook(self._hook(i, slot)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int, slot: int | None):
        def hook(module, args, output):
            x = _first_tensor(output)
            if x is None or not x.is_floating_point() or x.numel() == 0:
                return
            if i not in self._seen:
                self._seen.add(i)
                self.order.append(i)
            self._vals.append(torch.linalg.vector_norm(x, float("inf")))
            self._idx.append(i)
            if self.hist is not None:
                counts = magnitude_histogram(x)  # on x's device
                self._hist_on(counts.device)[i].add_(counts)
            if slot is not None and self.capture is not None:
                self.capture(slot, x)
        return hook

    def _hist_on(self, device: torch.device) -> torch.Tensor:
        hist = self._hists.get(device)
        if hist is None:  # first call of a module on another GPU: an allocation, no sync
            hist = self._hists[device] = torch.zeros_like(self.hist, device=device)
        return hist

    def _close_batch(self) -> None:
        if self._vals and self._offset is not None:
            devices = list(dict.fromkeys(v.device for v in self._vals))
            if len(devices) == 1:
                values, idx = torch.stack(self._vals).float().to(self.device), self._idx
            else:  # a sharded model: one stack and one copy per device, the module indices reordered alike
                parts, idx = [], []
                for d in devices:
                    pos = [k for k, v in enumerate(self._vals) if v.device == d]
                    parts.append(torch.stack([self._vals[k] for k in pos]).float().to(self.device))
                    idx += [self._idx[k] for k in pos]
                values = torch.cat(parts)
            self._batches.append((self._offset, values, idx))
        self._vals, self._idx = [], []

    def start_batch(self, offset: int) -> None:
        self._close_batch()
        self._offset = offset

    def finish(self) -> tuple[list[tuple[int, np.ndarray]], np.ndarray | None]:
        """([(token offset, absmax per watched module (M,), NaN -> inf, 0 = not called)], histograms (M, bins))."""
        self._close_batch()
        for d, other in list(self._hists.items()):
            if other is not self.hist:  # histograms of modules on other GPUs
                self.hist.add_(other.to(self.hist.device))
                del self._hists[d]
        if not self._batches:
            return [], (self.hist.cpu().numpy() if self.hist is not None else None)
        flat = torch.cat([b[1] for b in self._batches])
        hist = self.hist.cpu().numpy() if self.hist is not None else None
        values = flat.cpu().numpy()  # the one host sync of the pass
        values = np.where(np.isnan(values), np.inf, values)
        rows, pos = [], 0
        for offset, v, idx in self._batches:
            row = np.zeros(len(self.watched))
            np.maximum.at(row, np.asarray(idx), values[pos : pos + len(v)])
            rows.append((offset, row))
            pos += len(v)
        return rows, hist


def module_record(w, rows, hist, i: int) -> dict:
    """One watched module's reference findings of a pass, JSON-able (a sparse histogram)."""
    bins = np.flatnonzero(hist[i]) if hist is not None else np.zeros(0, int)
    return {"name": w.name, "kind": w.kind, "layer": w.layer, "absmax": float(max((r[i] for _, r in rows), default=0.0)),
            "bins": bins.tolist(), "counts": hist[i][bins].tolist() if hist is not None else []}


def p9999(entry: dict) -> float | None:
    """The reference's 99.99th percentile of |x| (never above the exact absmax)."""
    p_hi = percentile_from_histogram(entry["hist"]) if entry["hist"] is not None else None
    return min(p_hi, entry["absmax"]) if p_hi is not None else None


def first_failure(watched, order: list[int], rows: list[tuple[int, np.ndarray]]) -> dict | None:
    """The first watched module, in execution order, of the earliest batch with a non-finite output."""
    for offset, row in sorted(rows, key=lambda r: r[0]):
        bad = [i for i in order if row[i] == math.inf]
        if bad:
            w = watched[bad[0]]
            return {"module": w.name, "kind": w.kind, "layer": w.layer, "batch_token_offset": offset,
                    "n_nonfinite_modules": len(bad)}
    return None
