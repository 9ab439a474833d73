"""The frozen run configuration: the CLI parses strings into this; nothing past it sees raw strings."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from evalsuite.errors import UsageError
from evalsuite.model.precision import Precision
from evalsuite.store.corpus import CorpusSpec
from evalsuite.store.windows import WINDOWINGS

# What an option changes, read by `numeric_fields` (the resume fingerprint) and
# `reference_fields` (the reference cache key): one place decides, instead of two hand-kept lists.
REFERENCE = "reference"  # changes the reference pass, so every number: resume fingerprint and cache key
TESTS = "tests"  # changes only the test passes or what is computed from them: resume fingerprint
CONTENT = "content"  # changes the numbers, identified at run time by a content hash (checkpoint files,
#                     token windows, resolved device): the fingerprint holds the value, the cache key the hash
GENERATION = "generation"  # changes only the generation step (passes/generate.py), which every run computes
#                            whole and never saves: in neither the resume fingerprint nor the cache key


def option(default=None, numbers: str | None = None):
    """A RunConfig field; `numbers` says which passes' figures it changes (None: no figure)."""
    return field(default=default, metadata={"numbers": numbers})


@dataclass(frozen=True)
class RunConfig:
    model: str | None = option(numbers=CONTENT)  # local path or Hub id; None = the embedded demo model
    # the test precisions, in order; not in the fingerprint: each saved pass is filed under its own name
    dtypes: tuple[Precision, ...] = option(())
    reference: Precision | None = option(numbers=REFERENCE)
    device: str = option("auto", CONTENT)  # "auto", "cpu", "cuda" or "cuda:N"; the resolved device is hashed
    corpus: CorpusSpec | None = option(numbers=CONTENT)
    seq_len: int = option(2048, CONTENT)
    max_tokens: int | None = option(numbers=CONTENT)
    # "stream" (store/corpus.py) or "lm-eval" (store/rolling.py): which tokens are scored, in which windows;
    # the cache key holds it through the token windows' hash (digests.tokens_digest)
    windowing: str = option("stream", CONTENT)
    batch_size: int | None = option(numbers=REFERENCE)  # None = automatic
    out_dir: Path = option(Path("reports/run"))
    seed: int = option(0, TESTS)
    trust_remote_code: bool = option(False, REFERENCE)  # checkpoint code may compute anything
    noise_tokens: int | None = option(None, REFERENCE)  # tokens of the second reference pass; None: per device (for_device)
    buffer_gib: float | None = option(numbers=REFERENCE)  # device memory for the reference's logits; None = auto
    attn_implementation: str | None = option(numbers=REFERENCE)
    progress: bool = option(True)
    numerics: bool = option(True, TESTS)  # weight, activation and layer-wise diagnostics (docs/numerics.md)
    headroom_margin_bits: float = option(1.0, TESTS)  # activations this many bits below a dtype's max are flagged
    tasks: tuple[str, ...] = option((), TESTS)  # lm-eval multiple-choice tasks scored at each dtype
    num_fewshot: int | None = option(numbers=TESTS)  # None = each task's own default
    limit: float | None = option(numbers=TESTS)  # questions per task/subject: a count, or a fraction below 1
    cmmlu_dir: Path | None = option(numbers=TESTS)  # local CMMLU copy for cmmlu_local (else $EVALSUITE_CMMLU_DIR)
    ceval_dir: Path | None = option(numbers=TESTS)  # local C-Eval copy for ceval-valid_local (else $EVALSUITE_CEVAL_DIR)
    device_map: str | None = option(numbers=REFERENCE)  # "auto": shard each model over the visible GPUs
    reference_cache: Path | None = option()  # directory of cached reference passes (refcache.py); None = off
    reference_cache_gib: float = option(64.0)  # the cache evicts least recently used entries beyond this size
    compile: bool = option(False, TESTS)  # torch.compile the 2-byte test models' attention/MLP/norm modules
    cpu_half_gemm: str = option("auto", TESTS)  # FP16/BF16 Linears on a CPU: "auto", "fp32" or "native" (model/cpu.py)
    # repair (passes/repair.py): "auto" searches a safe recipe for each broken precision, "on" also for those
    # short of headroom, "off" never. No saved pass changes, so not in the resume fingerprint.
    repair: str = option("auto", TESTS)
    repair_tokens: int | None = option(None, TESTS)  # tokens per repair candidate's pass; None: per device (for_device)
    generate: bool = option(False, GENERATION)  # greedy generation divergence (docs/generation.md)
    gen_prompts: Path | None = option(numbers=GENERATION)  # .txt or .jsonl prompts; None = corpus and benchmarks
    gen_column: str = option("text", GENERATION)  # text field of a .jsonl --gen-prompts
    gen_tokens: int | None = option(numbers=GENERATION)  # tokens per continuation; None = 32 on CPU, 128 on CUDA
    gen_count: int | None = option(numbers=GENERATION)  # prompts; None = 8 on CPU, 64 on CUDA

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise UsageError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.noise_tokens is not None and self.noise_tokens < 0:
            raise UsageError(f"--noise-tokens must be at least 0 (0: no noise floor), got {self.noise_tokens}")
        if self.windowing not in WINDOWINGS:
            raise UsageError(f"--windowing must be one of {', '.join(WINDOWINGS)}, got {self.windowing!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 or 'auto', got {self.batch_size}")
        if self.reference is None or self.corpus is None:
            raise UsageError("a run needs a reference precision and a corpus")
        if not self.dtypes:
            raise UsageError("--dtypes is empty: give at least one precision, e.g. fp16, bf16, bf16@fp16")
        if not 0 <= self.headroom_margin_bits < 128:  # also false for NaN
            raise UsageError(f"--headroom-margin-bits must be between 0 and 128, got {self.headroom_margin_bits}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UsageError(f"--num-fewshot must be at least 0, got {self.num_fewshot}")
        if self.device_map not in (None, "auto"):
            raise UsageError(f"--device-map takes 'auto', got {self.device_map!r}")
        if not self.reference_cache_gib >= 0:  # also false for NaN
            raise UsageError(f"--reference-cache-gib must be at least 0, got {self.reference_cache_gib}")
        if self.repair not in ("auto", "on", "off"):
            raise UsageError(f"repair must be auto, on or off, got {self.repair!r}")
        if self.repair_tokens is not None and self.repair_tokens < 1:
            raise UsageError(f"--repair-tokens must be at least 1, got {self.repair_tokens}")
        if self.limit is not None and not self.limit > 0:  # also false for NaN
            raise UsageError(f"--limit must be positive (a count, or a fraction below 1), got {self.limit}")
        for name in ("gen_tokens", "gen_count"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.generate and (self.gen_prompts or self.gen_tokens or self.gen_count):
            raise UsageError("--gen-prompts, --gen-tokens and --gen-count need --generate")

    def to_dict(self) -> dict[str, object]:
        """Every option as JSON values: the `config` section of results.json."""
        out = {f.name: _json(getattr(self, f.name)) for f in fields(self)}
        out["batch_size"] = self.batch_size if self.batch_size is not None else "auto"
        return out


def _json(value):
    if isinstance(value, Precision):
        return value.name
    if isinstance(value, CorpusSpec):
        return {"source": value.source, "column": value.column, "hf_config": value.hf_config,
                "hf_split": value.hf_split}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    return value


def numeric_fields(cfg: RunConfig) -> dict[str, object]:
    """The options that change any number, by value: what a resumed run must share with the killed one."""
    return {f.name: _json(getattr(cfg, f.name)) for f in fields(cfg)
            if f.metadata["numbers"] and f.metadata["numbers"] != GENERATION}  # (generation is never resumed)


def reference_fields(cfg: RunConfig) -> dict[str, object]:
    """The options that change the reference pass, by value: part of the reference cache key (content
    options enter it as hashes instead)."""
    return {f.name: _json(getattr(cfg, f.name)) for f in fields(cfg) if f.metadata["numbers"] == REFERENCE}


# Defaults that depend on the device: a 2-core CPU scores ~100 tokens a second where an H200 scores
# 10^5-10^6, so the passes whose size is a choice (not the corpus) are smaller there.
DEVICE_DEFAULTS = {  # field: (CUDA, CPU)
    "noise_tokens": (32768, 512),
    "repair_tokens": (2048, 512),
}
DEMO_CPU_TOKENS = 1024  # the embedded demo on a CPU scores its first 1,024 of 4,497 tokens (README command 1: <= 3 min)


def for_device(cfg: RunConfig, device: torch.device) -> tuple[RunConfig, list[str]]:
    """`cfg` with the device-dependent defaults filled in (the resolved values are what results.json,
    the resume fingerprint and the cache key see), and a line for each choice a user should know of."""
    cpu = device.type == "cpu"
    values = {k: v[cpu] for k, v in DEVICE_DEFAULTS.items() if getattr(cfg, k) is None}
    notes = []
    if cpu and cfg.model is None and cfg.max_tokens is None and cfg.windowing == "stream":
        values["max_tokens"] = DEMO_CPU_TOKENS
        notes.append(f"the embedded demo on a CPU scores its first {DEMO_CPU_TOKENS:,} tokens (--max-tokens N for more)")
    return replace(cfg, **values), notes


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
