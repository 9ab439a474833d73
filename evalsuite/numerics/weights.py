"""Weight conversion: what happens to each parameter tensor when it is cast to a test dtype.

No inference is needed, only the FP32 reference's parameters. Per tensor and dtype we count
values that overflow (finite in FP32, inf after the cast), values flushed to zero, values that
land on subnormals (fewer mantissa bits than the dtype's normal range), and the mean and max
relative rounding error |cast(x) - x| / |x| over the values that stay finite and nonzero. For a
checkpoint stored in FP16 and served in BF16 (or the reverse) we also count the values the
conversion changes, and those the round trip (stored -> served -> stored) does not restore.

Large tensors are processed in slices of `SLICE` elements, so the temporaries stay bounded
(a 256k x 8192 embedding is 2 G elements). Each tensor's counts stay on the device until all
are done: one host sync for the whole model (one per GPU for a model sharded over several).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from evalsuite.model.precision import DTYPES, Precision

# Elements per slice. CPU: 4 MiB float32 temporaries stay in cache across the ~20 elementwise
# ops (measured 1.5x faster than 16 MiB); CUDA: 64 MiB, few enough launches for a 70B model.
SLICE = {"cpu": 1 << 20, "cuda": 1 << 24}
PROBLEM_TENSORS = 20  # per dtype, tensors with overflow or underflow kept in results.json
WORST_TENSORS = 5  # per dtype, tensors with the largest relative rounding error kept as well
# Columns of the per-tensor statistics vector (float64, on the device until the end).
_FIELDS = ("n", "absmax", "overflow", "flushed_zero", "subnormal", "rel_err_sum", "rel_err_max", "n_rel",
           "changed", "roundtrip_changed")


@dataclass(frozen=True)
class TensorConversion:
    """One parameter tensor cast to one dtype."""

    name: str
    n: int
    absmax: float  # largest |x| in FP32
    overflow: int  # finite in FP32, +-inf after the cast
    flushed_zero: int  # nonzero in FP32, exactly 0 after the cast
    subnormal: int  # nonzero after the cast but below the dtype's smallest normal
    rel_err_mean: float | None  # over values that stay finite and nonzero
    rel_err_max: float | None
    changed: int | None = None  # stored FP16 <-> served BF16 only: values the conversion changes
    roundtrip_changed: int | None = None  # ... and values not restored by stored -> served -> stored

    @property
    def underflow(self) -> int:
        return self.flushed_zero + self.subnormal

    @property
    def underflow_frac(self) -> float:
        return self.underflow / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None or k.startswith("rel_err")}
        d["underflow_frac"] = self.underflow_frac
        return d


def _stored_precision(stored: str | None) -> Precision | None:
    """The 2-byte precision a checkpoint is stored in ("float16" or "fp16"), from the one table; else None."""
    for name, p in DTYPES.items():
        if p.is_half and stored in (name, str(p.dtype).removeprefix("torch.")):
            return p
    return None


def _count(mask: torch.Tensor) -> torch.Tensor:
    return torch.count_nonzero(mask).double()  # (mask.sum(dtype=float64) would copy the mask to float64)


def _slice_stats(x: torch.Tensor, ps: list[Precision], stored: Precision | None) -> torch.Tensor:
    """Statistics (len(ps), len(_FIELDS)) float64 of one flat slice `x` (float32) cast to each of `ps`.

    Elementwise work stays in float32, where it is exact: the cast's result is an FP32 number,
    and round-to-nearest keeps a nonzero result within a factor 2 of x, so x - cast(x) is exact
    (Sterbenz); the ratio |x - cast(x)| / |x| then carries one FP32 rounding (2^-24 of itself).
    Sums accumulate in float64. Half the memory traffic of float64 temporaries, which is what
    this costs on a CPU (it is memory-bound). What depends on x alone (|x|, its inf, zero and NaN
    counts, its absmax) is computed once for all dtypes: a cast keeps NaN NaN, so the results'
    NaNs are x's.
    """
    ax = x.abs()  # (n,); compared with == inf below (isinf would take abs again)
    zero = x.new_zeros((), dtype=torch.float64)
    x_inf, x_zero, x_nan = _count(ax == torch.inf), _count(ax == 0), _count(x != x)
    absmax = torch.linalg.vector_norm(x, float("inf")).double() if x.numel() else zero
    n = x.new_full((), float(x.numel()), dtype=torch.float64)
    rows = []
    for p in ps:
        y = x.to(p.dtype).float()
        ay = y.abs()
        y_zero = ay == 0
        n_y_zero, y_inf = _count(y_zero), _count(ay == torch.inf)
        overflow = y_inf - x_inf  # an inf input stays inf
        flushed = n_y_zero - x_zero
        subnormal = _count(ay < p.smallest_normal) - n_y_zero
        # |y - x| / |x|: 1 where flushed (masked to 0), inf where overflowing, NaN for x = 0 or NaN (both -> 0)
        rel = y.sub_(x).abs_().div_(ax).masked_fill_(y_zero, 0.0).nan_to_num_(0.0, 0.0, 0.0)
        n_rel = n - n_y_zero - y_inf - x_nan  # finite, nonzero results
        changed = roundtrip = zero
        if stored is not None and stored.dtype != p.dtype:  # checkpoint values are exact in `stored`
            y = x.to(p.dtype)
            changed = _count(y.float() != x) - x_nan  # NaN != NaN: not a change
            roundtrip = _count(y.to(stored.dtype).float() != x) - x_nan
        rows.append(torch.stack([n, absmax, overflow, flushed, subnormal, rel.sum(dtype=torch.float64),
                                 rel.max().double() if rel.numel() else zero, n_rel, changed, roundtrip]))
    return torch.stack(rows)


def tensor_stats(x: torch.Tensor, ps: list[Precision], stored: Precision | None) -> torch.Tensor:
    """Statistics (len(ps), len(_FIELDS)) of a whole tensor, slice by slice (sums and maxima combined on the device)."""
    flat = x.detach().reshape(-1).float()
    step = SLICE.get(flat.device.type, SLICE["cpu"])
    parts = torch.stack([_slice_stats(flat[i : i + step], ps, stored)
                         for i in range(0, max(flat.numel(), 1), step)])  # (S, D, F)
    total = parts.sum(0)  # (D, F)
    if len(parts) > 1:
        for k in ("absmax", "rel_err_max"):
            total[:, _FIELDS.index(k)] = parts[:, :, _FIELDS.index(k)].amax(0)
    return total


def conversion_stats(model: torch.nn.Module, tests: list[Precision], stored: str | None
                     ) -> dict[str, list[TensorConversion]]:
    """{dtype name: [TensorConversion per parameter tensor]} for each test dtype (tied weights once)."""
    store = _stored_precision(stored)
    named = [(n, t) for n, t in model.named_parameters() if t.is_floating_point()]
    if not tests:
        return {}
    # Each tensor's statistics are computed where it sits; a model sharded over several GPUs gives
    # one (P_d, D, F) stack per GPU, all launched before the first host copy (one per GPU).
    by_device: dict[torch.device, list[int]] = {}
    for k, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(k)
    with torch.no_grad():
        stacks = [(ks, torch.stack([tensor_stats(named[k][1], list(tests), store) for k in ks]))
                  for ks in by_device.values()]  # (P_d, D, F) each
    rows: list = [None] * len(named)
    for ks, vectors in stacks:
        for k, v in zip(ks, vectors.cpu().tolist(), strict=True):
            rows[k] = v
    out: dict[str, list[TensorConversion]] = {p.name: [] for p in tests}
    for (name, _), per_dtype in zip(named, rows, strict=True):
        for p, v in zip(tests, per_dtype, strict=True):
            f = dict(zip(_FIELDS, v, strict=True))
            pair = store is not None and store.dtype != p.dtype
            out[p.name].append(TensorConversion(
                name=name, n=int(f["n"]), absmax=f["absmax"], overflow=int(f["overflow"]), flushed_zero=int(f["flushed_zero"]),
                subnormal=int(f["subnormal"]),
                rel_err_mean=f["rel_err_sum"] / f["n_rel"] if f["n_rel"] else None,
                rel_err_max=f["rel_err_max"] if f["n_rel"] else None,
                changed=int(f["changed"]) if pair else None,
                roundtrip_changed=int(f["roundtrip_changed"]) if pair else None))
    return out


def summarize(tensors: list[TensorConversion], stored: str | None, served: Precision) -> tuple[dict, dict]:
    """(flat metrics, compact section) for one dtype: totals, problem tensors, the worst few."""
    n = sum(t.n for t in tensors) or 1
    rel_n = [t for t in tensors if t.rel_err_max is not None]
    metrics: dict[str, float | int | None] = {
        "weights_overflow": sum(t.overflow for t in tensors),
        "weights_underflow_frac": sum(t.underflow for t in tensors) / n,
        "weights_rel_err_max": max((t.rel_err_max for t in rel_n), default=None),
    }
    totals = {"n_tensors": len(tensors), "n_values": n, "overflow": metrics["weights_overflow"],
              "flushed_zero": sum(t.flushed_zero for t in tensors), "subnormal": sum(t.subnormal for t in tensors),
              "underflow_frac": metrics["weights_underflow_frac"],
              "rel_err_mean": sum(t.rel_err_mean * t.n for t in rel_n) / (sum(t.n for t in rel_n) or 1),
              "rel_err_max": metrics["weights_rel_err_max"]}
    if tensors and tensors[0].changed is not None:
        metrics["weights_changed_frac"] = sum(t.changed or 0 for t in tensors) / n
        metrics["weights_roundtrip_changed_frac"] = sum(t.roundtrip_changed or 0 for t in tensors) / n
        totals |= {"stored_dtype": stored, "served_dtype": served.name,
                   "changed_frac": metrics["weights_changed_frac"],
                   "roundtrip_changed_frac": metrics["weights_roundtrip_changed_frac"]}
    problems = sorted((t for t in tensors if t.overflow or t.underflow),
                      key=lambda t: (-t.overflow, -t.underflow_frac, t.name))
    worst = sorted(rel_n, key=lambda t: -t.rel_err_max)[:WORST_TENSORS]
    section = {"totals": totals, "n_problem_tensors": len(problems),
               "problem_tensors": [t.to_dict() for t in problems[:PROBLEM_TENSORS]],
               "worst_rel_err": [t.to_dict() for t in worst]}
    return metrics, section
