"""The one dtype table, and the numeric flags that make an FP32 reference true FP32.

Everything that needs to know about a precision reads `DTYPES`; a name not in it is a
`UsageError` that lists the valid choices. Ranges come from `torch.finfo`, so they are the
numbers the hardware uses, not numbers copied from a datasheet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from evalsuite.errors import UsageError


@dataclass(frozen=True)
class Format:
    """One floating-point format: the numbers the hardware uses, read from `torch.finfo`."""

    name: str  # user-facing name, e.g. "bf16"
    dtype: torch.dtype
    finite_max: float  # largest finite value (65504 for fp16)
    smallest_normal: float
    smallest_subnormal: float
    mantissa_bits: int  # explicit fraction bits (10 for fp16, 7 for bf16)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def _format(name: str, dtype: torch.dtype, mantissa_bits: int) -> Format:
    info = torch.finfo(dtype)
    return Format(name=name, dtype=dtype, finite_max=float(info.max), smallest_normal=float(info.tiny),
                  smallest_subnormal=float(info.smallest_normal * info.eps), mantissa_bits=mantissa_bits)


FORMATS: dict[str, Format] = {
    "fp32": _format("fp32", torch.float32, 23),
    "fp16": _format("fp16", torch.float16, 10),
    "bf16": _format("bf16", torch.bfloat16, 7),
}


@dataclass(frozen=True)
class Island:
    """Modules whose dotted names end with `pattern` (`%` = any one segment) kept in `format`."""

    pattern: str  # e.g. "layers.7.mlp", "layers.%.self_attn"
    format: Format


@dataclass(frozen=True)
class Precision:
    """How a model is run: the roundings its stored weights go through, what it computes in, and exceptions.

    A plain `fp16` is storage (fp16,) computed in fp16. Every question about a precision (its
    range, its width, whether it is a 2-byte compute) is asked of this record, never of a
    tensor's dtype, so a precision whose storage and compute differ stays one row of one table.
    The grammar that builds it from the user's text (`bf16@fp16+res32:7`) is model/recipes.py;
    model/convert.py applies it to a loaded model.
    """

    name: str  # the key results are filed under, e.g. "bf16", "bf16@fp16", "fp16+res32:7"
    compute: Format  # what the model's parameters are cast to and its forward runs in
    storage: tuple[Format, ...] = ()  # the weights are rounded to each of these in turn, before `compute`
    tf32: bool = False  # FP32 compute with TF32 matmuls and convolutions
    residual_fp32_from: int | None = None  # FP32 residual stream from this decoder layer on (None: none)
    islands: tuple[Island, ...] = ()  # modules kept in another format, with casts at their boundaries
    clamp: bool = False  # decoder layers' outputs clamped as transformers' FP16 clamp does

    @property
    def dtype(self) -> torch.dtype:
        return self.compute.dtype

    @property
    def finite_max(self) -> float:
        return self.compute.finite_max

    @property
    def smallest_normal(self) -> float:
        return self.compute.smallest_normal

    @property
    def smallest_subnormal(self) -> float:
        return self.compute.smallest_subnormal

    @property
    def mantissa_bits(self) -> int:
        return self.compute.mantissa_bits

    @property
    def itemsize(self) -> int:
        """Bytes per element of the compute dtype."""
        return self.compute.itemsize

    @property
    def is_half(self) -> bool:
        """A 2-byte compute dtype (fp16/bf16): what --compile and the padded head apply to."""
        return self.compute.itemsize == 2

    @property
    def is_plain(self) -> bool:
        """One of the plain dtypes (fp32, fp16, bf16): loaded exactly as `from_pretrained(dtype=...)` loads it."""
        return self.storage == (self.compute,) and not (self.tf32 or self.residual_fp32_from is not None
                                                        or self.islands or self.clamp)

    @property
    def has_regions(self) -> bool:
        """Parts of the model computing in another format than `compute` (casts at their boundaries)."""
        return self.residual_fp32_from is not None or bool(self.islands)

    def describe(self) -> dict[str, object]:
        """The resolved recipe as results.json records it."""
        from evalsuite.model.recipes import summary

        return {"storage": [f.name for f in self.storage], "compute": self.compute.name, "tf32": self.tf32,
                "residual_fp32_from": self.residual_fp32_from,
                "islands": [{"pattern": i.pattern, "dtype": i.format.name} for i in self.islands],
                "clamp": self.clamp, "summary": summary(self)}


def _plain(name: str) -> Precision:
    return Precision(name=name, compute=FORMATS[name], storage=(FORMATS[name],))


DTYPES: dict[str, Precision] = {name: _plain(name) for name in FORMATS}

_BY_TORCH_DTYPE = {p.dtype: p for p in DTYPES.values()}


def parse_dtype(name: str) -> Precision:
    """Turn a user string into a `Precision`; anything unknown names the valid choices."""
    key = name.strip().lower()
    if key not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[key]


def precision_of(dtype: torch.dtype) -> Precision | None:
    return _BY_TORCH_DTYPE.get(dtype)


def unsupported_reason(precision: Precision, device: torch.device) -> str | None:
    """Why `device` cannot run `precision`, or None if it can.

    BF16 needs compute capability 8.0 (Ampere) for native matmuls; older cards emulate it
    slowly or not at all, so a run skips it there with this message instead of crashing. TF32
    exists only on NVIDIA GPUs from Ampere on: elsewhere `tf32` would silently be plain FP32.
    Rounding stored weights to BF16 (`bf16@fp32`) needs no BF16 arithmetic, so only the compute
    format and the islands' count.
    """
    if precision.tf32 and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"the {device.type} device"
        return f"{where} has no TF32 (needs an NVIDIA GPU of compute capability >= 8.0)"
    formats = {precision.compute, *(i.format for i in precision.islands)}
    if device.type == "cuda":
        if FORMATS["bf16"] in formats and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            return f"{name} has no native BF16 (needs compute capability >= 8.0)"
    return None


# torch >= 2.9 has per-backend `fp32_precision` knobs ("ieee", "tf32", "none" = inherit) and
# raises if code mixes them with the legacy allow_tf32 / set_float32_matmul_precision API in
# one process; so use the new API where it exists and the legacy one only where it doesn't.
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")
_NEW_KNOBS = {
    "cuda_matmul_fp32_precision": (torch.backends.cuda, "matmul"),
    "cudnn_conv_fp32_precision": (torch.backends.cudnn, "conv"),
    "cudnn_rnn_fp32_precision": (torch.backends.cudnn, "rnn"),
}


def _knob(parent, name):
    return getattr(parent, name)


def _effective(value: str, parent: str) -> str:
    return parent if value == "none" else value


def numeric_flags() -> dict[str, object]:
    """The global flags that change float32/low-precision results, as they are right now."""
    flags: dict[str, object] = {}
    if _NEW_API:
        flags["fp32_precision_api"] = "fp32_precision"
        root = str(torch.backends.fp32_precision)
        flags["global_fp32_precision"] = root
        for key, (parent, name) in _NEW_KNOBS.items():
            flags[key] = str(_knob(parent, name).fp32_precision)
        matmul = _effective(flags["cuda_matmul_fp32_precision"], root)
        conv = _effective(flags["cudnn_conv_fp32_precision"], _effective(str(torch.backends.cudnn.fp32_precision), root))
        flags["cuda_matmul_allow_tf32"] = matmul == "tf32"
        flags["cudnn_allow_tf32"] = conv == "tf32"
    else:
        flags["fp32_precision_api"] = "legacy"
        flags["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        flags["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        flags["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    flags["cuda_matmul_allow_fp16_reduced_precision_reduction"] = (
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    )
    flags["cuda_matmul_allow_bf16_reduced_precision_reduction"] = (
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    )
    flags["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    if torch.cuda.is_available():
        flags["sdpa_flash"] = torch.backends.cuda.flash_sdp_enabled()
        flags["sdpa_mem_efficient"] = torch.backends.cuda.mem_efficient_sdp_enabled()
        flags["sdpa_math"] = torch.backends.cuda.math_sdp_enabled()
        flags["sdpa_cudnn"] = torch.backends.cuda.cudnn_sdp_enabled()
    return flags


@contextlib.contextmanager
def exact_fp32() -> Iterator[dict[str, object]]:
    """Run the block with TF32 and reduced-precision reductions off; yield the flags in force.

    TF32 rounds float32 matmul inputs to 10 mantissa bits, which would make the "FP32"
    reference about as precise as FP16 and hide the very differences we measure.
    """
    matmul = torch.backends.cuda.matmul
    saved_rpr = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    if _NEW_API:
        saved = {key: _knob(parent, name).fp32_precision for key, (parent, name) in _NEW_KNOBS.items()}
        for parent, name in _NEW_KNOBS.values():
            _knob(parent, name).fp32_precision = "ieee"
    else:
        saved = (torch.get_float32_matmul_precision(), matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    matmul.allow_fp16_reduced_precision_reduction = False
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield numeric_flags()
    finally:
        if _NEW_API:
            for key, (parent, name) in _NEW_KNOBS.items():
                _knob(parent, name).fp32_precision = saved[key]
        else:
            torch.set_float32_matmul_precision(saved[0])
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = saved_rpr


@contextlib.contextmanager
def tf32_compute() -> Iterator[dict[str, object]]:
    """Run the block with TF32 matmuls and convolutions on (reductions as `exact_fp32`); yield the flags.

    What many "FP32" users actually run on Ampere or newer: float32 inputs rounded to 10
    mantissa bits inside the tensor cores, accumulation in float32.
    """
    with exact_fp32():
        matmul = torch.backends.cuda.matmul
        if _NEW_API:
            for parent, name in _NEW_KNOBS.values():
                _knob(parent, name).fp32_precision = "tf32"
        else:
            torch.set_float32_matmul_precision("high")
            matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield numeric_flags()  # exact_fp32 restores everything on the way out


@contextlib.contextmanager
def pass_flags(precision: Precision) -> Iterator[dict[str, object]]:
    """The numeric flags a test pass of `precision` runs under; yield them as recorded.

    TF32 recipes run under `tf32_compute`; every other precision under the process's own flags,
    as test passes always have (so plain fp16/bf16 results do not change).
    """
    if precision.tf32:
        with tf32_compute() as flags:
            yield flags
    else:
        yield numeric_flags()
