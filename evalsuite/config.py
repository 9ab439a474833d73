"""The frozen run configuration: the CLI parses strings into this; nothing past it sees raw strings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evalsuite.errors import UsageError
from evalsuite.model.precision import Precision
from evalsuite.store.corpus import CorpusSpec


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
    numerics: bool = True  # weight, activation and layer-wise diagnostics (docs/numerics.md)
    headroom_margin_bits: float = 1.0  # activations within this many bits of a dtype's max are flagged
    tasks: tuple[str, ...] = ()  # lm-eval multiple-choice tasks scored at each dtype (docs/benchmarks.md)
    num_fewshot: int | None = None  # None = each task's own default
    limit: float | None = None  # questions per task/subject: a count, or a fraction below 1
    cmmlu_dir: Path | None = None  # local CMMLU copy for cmmlu_local (else $EVALSUITE_CMMLU_DIR)
    ceval_dir: Path | None = None  # local C-Eval copy for ceval-valid_local (else $EVALSUITE_CEVAL_DIR)
    device_map: str | None = None  # "auto": shard each model over the visible GPUs through accelerate
    reference_cache: Path | None = None  # directory of cached reference passes (refcache.py); None = off
    reference_cache_gib: float = 64.0  # the cache evicts least recently used entries beyond this size
    compile: bool = False  # torch.compile the 2-byte test models' attention/MLP/norm modules (compiled.py)

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise UsageError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 or 'auto', got {self.batch_size}")
        if not self.dtypes:
            raise UsageError("--dtypes is empty: give at least one of fp16, bf16, fp32")
        if not 0 <= self.headroom_margin_bits < 128:  # also false for NaN
            raise UsageError(f"--headroom-margin-bits must be between 0 and 128, got {self.headroom_margin_bits}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UsageError(f"--num-fewshot must be at least 0, got {self.num_fewshot}")
        if self.device_map not in (None, "auto"):
            raise UsageError(f"--device-map takes 'auto', got {self.device_map!r}")
        if not self.reference_cache_gib >= 0:  # also false for NaN
            raise UsageError(f"--reference-cache-gib must be at least 0, got {self.reference_cache_gib}")
        if self.limit is not None and not self.limit > 0:  # also false for NaN
            raise UsageError(f"--limit must be positive (a count, or a fraction below 1), got {self.limit}")

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
            "numerics": self.numerics,
            "headroom_margin_bits": self.headroom_margin_bits,
            "tasks": list(self.tasks),
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "cmmlu_dir": str(self.cmmlu_dir) if self.cmmlu_dir else None,
            "ceval_dir": str(self.ceval_dir) if self.ceval_dir else None,
            "device_map": self.device_map,
            "reference_cache": str(self.reference_cache) if self.reference_cache else None,
            "reference_cache_gib": self.reference_cache_gib,
            "compile": self.compile,
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
