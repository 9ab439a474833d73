"""The frozen run configuration: the CLI parses strings into this; nothing past it sees raw strings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evalsuite.corpus import CorpusSpec
from evalsuite.errors import UsageError
from evalsuite.precision import Precision


@dataclass(frozen=True)
class RunConfig:
    model: str | None  # local path or Hub id; None = the embedded demo model
    dtypes: tuple[Precision, ...]  # the test precisions, in order
    reference: Precision
    device: str  # "auto", "cpu", "cuda" or "cuda:N"
    corpus: CorpusSpec
    seq_len: int = 2048
    max_tokens: int | None = None
    batch_size: int | None = None  # None = automatic
    out_dir: Path = Path("reports/run")
    seed: int = 0
    trust_remote_code: bool = False
    noise_tokens: int = 32768  # tokens of the second reference pass that measures the noise floor
    buffer_gib: float | None = None  # device memory for the reference's logits; None = automatic
    attn_implementation: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise UsageError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 or 'auto', got {self.batch_size}")
        if not self.dtypes:
            raise UsageError("--dtypes is empty: give at least one of fp16, bf16, fp32")

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "dtypes": [p.name for p in self.dtypes],
            "reference": self.reference.name,
            "device": self.device,
            "corpus": {
                "source": self.corpus.source,
                "column": self.corpus.column,
                "hf_config": self.corpus.hf_config,
                "hf_split": self.corpus.hf_split,
            },
            "seq_len": self.seq_len,
            "max_tokens": self.max_tokens,
            "batch_size": self.batch_size if self.batch_size is not None else "auto",
            "out_dir": str(self.out_dir),
            "seed": self.seed,
            "trust_remote_code": self.trust_remote_code,
            "noise_tokens": self.noise_tokens,
            "buffer_gib": self.buffer_gib,
            "attn_implementation": self.attn_implementation,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device
