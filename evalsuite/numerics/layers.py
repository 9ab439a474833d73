"""Layer-wise divergence: hidden states of a test dtype against the reference's, layer by layer.

Only one model is resident, so the reference leaves behind hidden states for a bounded sample of
token positions: every `stride`-th token of the first segment's corpus (evenly spread, so window
starts, where attention sinks make activations large, are represented in proportion), at most
`SAMPLE_TOKENS` tokens and `SAMPLE_BYTES` of float32 for all slots together (slot 0: the
embedding output, slot i+1: decoder layer i's output, the residual stream). A 24-layer, 896-wide
model keeps 512 tokens (46 MB); an 80-layer, 8192-wide one about 50 tokens. Each test pass fills
the same positions; the comparison runs once at the end of the pass, a layer at a time, in float64.
The sample also goes into the reference pass's resume snapshot, so a resumed run compares too.

Per layer: the relative error ||h_test - h_ref|| / ||h_ref|| and the cosine similarity of each
sampled token's hidden state, averaged over tokens (max / min kept too), so a few huge
attention-sink states do not drown out the other tokens as they would in one pooled norm.
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

SAMPLE_TOKENS = 512
SAMPLE_BYTES = 128 * 2**20


class LayerSample:
    """Hidden states at corpus positions 0, stride, 2*stride, ... per slot: a (slots, count, hidden) buffer."""

    def __init__(self, n_tokens: int, n_slots: int, hidden: int, device: torch.device):
        per_token = n_slots * hidden * 4
        count = max(1, min(SAMPLE_TOKENS, n_tokens, SAMPLE_BYTES // per_token))
        self.stride = max(1, n_tokens // count)
        self.count = min(count, math.ceil(n_tokens / self.stride))
        self.hidden = hidden
        self.buf = torch.full((n_slots, self.count, hidden), float("nan"), dtype=torch.float32, device=device)
        self._window: tuple[int, int, int] | None = None

    def like(self) -> LayerSample:
        """An empty sample of the same positions (for a test pass)."""
        other = object.__new__(LayerSample)
        other.stride, other.count, other.hidden, other._window = self.stride, self.count, self.hidden, None
        other.buf = torch.full_like(self.buf, float("nan"))
        return other

    def to_state(self) -> dict:
        """JSON-able (base64 float32), so a resumed run's test passes still have the reference's states."""
        data = self.buf.cpu().numpy().astype("<f4").tobytes()
        return {"stride": self.stride, "count": self.count, "hidden": self.hidden, "shape": list(self.buf.shape),
                "b64": base64.b64encode(data).decode("ascii")}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> LayerSample:
        other = object.__new__(cls)
        other.stride, other.count, other.hidden, other._window = state["stride"], state["count"], state["hidden"], None
        values = np.frombuffer(base64.b64decode(state["b64"]), dtype="<f4").reshape(state["shape"])
        other.buf = torch.from_numpy(values.copy()).to(device)
        return other

    def set_batch(self, offset: int, n_tokens: int) -> None:
        """The batch holds corpus tokens [offset, offset + n_tokens), flattened row-major from (B, T)."""
        j0 = math.ceil(offset / self.stride)
        j1 = min(self.count, math.ceil((offset + n_tokens) / self.stride))
        self._window = (j0, j1, j0 * self.stride - offset) if j1 > j0 else None

    def capture(self, slot: int, x: torch.Tensor) -> None:
        if self._window is None or x.shape[-1] != self.hidden:
            return
        j0, j1, start = self._window
        flat = x.reshape(-1, self.hidden)  # (B*T, H), a view of a contiguous (B, T, H)
        # copy_ casts, and moves the sampled rows alone when x sits on another GPU than the
        # buffer (a sharded model's later layers): GPU to GPU, with no host sync
        self.buf[slot, j0:j1].copy_(flat[start :: self.stride][: j1 - j0])


@dataclass(frozen=True)
class LayerError:
    layer: int  # -1 = the embedding output
    rel_error: float | None  # mean over sampled tokens of ||h_test - h_ref|| / ||h_ref||
    rel_error_max: float | None
    cosine: float | None  # mean over sampled tokens
    cosine_min: float | None
    n_tokens: int  # sampled tokens where both are finite
    n_nonfinite: int  # sampled tokens whose test hidden state has an inf/NaN
    growth: float | None = None  # rel_error / the previous layer's (the embedding's for layer 0)

    def to_dict(self) -> dict:
        return asdict(self)


def compare(ref: torch.Tensor, test: torch.Tensor) -> list[LayerError]:
    """Per-slot errors of test (slots, S, H) against ref (slots, S, H); one host sync at the end."""
    rows = []
    tiny = torch.finfo(torch.float64).tiny
    for r32, t32 in zip(ref, test, strict=True):
        r, t = r32.double(), t32.double()  # (S, H)
        present = torch.isfinite(r).all(-1)  # (S,) positions the reference filled with finite values
        ok = present & torch.isfinite(t).all(-1)
        rn, tn = r.norm(dim=-1), t.norm(dim=-1)  # (S,)
        rel = (t - r).norm(dim=-1) / rn.clamp_min(tiny)
        cos = (r * t).sum(-1) / (rn * tn).clamp_min(tiny)
        n = ok.sum()
        big, small = torch.tensor(math.inf, device=r.device), torch.tensor(-math.inf, device=r.device)
        rows.append(torch.stack([
            n.double(), (present & ~ok).sum().double(),
            torch.where(ok, rel, 0).sum() / n.clamp_min(1), torch.where(ok, rel, small).max(),
            torch.where(ok, cos, 0).sum() / n.clamp_min(1), torch.where(ok, cos, big).min()]))
    values = torch.stack(rows).cpu().tolist() if rows else []
    out: list[LayerError] = []
    for i, (n, bad, rel_mean, rel_max, cos_mean, cos_min) in enumerate(values):
        has = n > 0
        out.append(LayerError(layer=i - 1, rel_error=rel_mean if has else None, rel_error_max=rel_max if has else None,
                              cosine=cos_mean if has else None, cosine_min=cos_min if has else None,
                              n_tokens=int(n), n_nonfinite=int(bad)))
    return with_growth(out)


def with_growth(errors: list[LayerError]) -> list[LayerError]:
    out, prev = [], None
    for e in errors:
        growth = None
        if prev is not None and e.rel_error is not None and prev.rel_error is not None:
            growth = e.rel_error / prev.rel_error if prev.rel_error > 0 else (math.inf if e.rel_error > 0 else None)
        out.append(LayerError(**{**asdict(e), "growth": growth}))
        prev = e
    return out


def max_growth_layer(errors: list[LayerError]) -> int | None:
    """The decoder layer where the error grows most: the first layer that turns a finite hidden
    state non-finite (-1: the embedding already is), else the largest growth factor; None when
    nothing differs from the reference."""
    if errors and errors[0].n_nonfinite > 0:
        return errors[0].layer
    for prev, e in zip(errors, errors[1:], strict=False):
        if e.n_nonfinite > 0 and prev.n_nonfinite == 0:
            return e.layer
    scored = [e for e in errors if e.layer >= 0 and e.growth is not None]
    if not scored or all(e.rel_error == 0 for e in scored):
        return None
    return max(scored, key=lambda e: e.growth).layer
