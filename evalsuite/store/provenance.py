"""Where a run's numbers came from: one typed record, filled by the steps that know each fact.

Why a record and not a dict: the loop (pass facts), the runner (run facts) and the summary
(software and machine) each add to it; with a dataclass the set of keys results.json may hold
is written down once, a typo is an AttributeError instead of a silent new key, and the segment
plan saved for resume/cache round-trips through `to_dict`/`update`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class Provenance:
    # software and machine (metrics/summary.environment)
    evalsuite: str | None = None
    python: str | None = None
    platform: str | None = None
    torch: str | None = None
    transformers: str | None = None
    numpy: str | None = None
    cuda: str | None = None
    cudnn: int | None = None
    device_name: str | None = None
    torch_threads: int | None = None
    compute_capability: str | None = None
    gpu_memory_gib: float | None = None
    # the reference pass (passes/loop.py; saved in the segment plan)
    reference_flags: dict | None = None  # numeric flags in force: TF32 and reduced-precision reductions off
    test_flags: dict | None = None  # {test precision: the flags its pass ran under} (TF32 on for tf32)
    logits_path: str | None = None  # "split" (decoder body, then the head a chunk at a time) or "full"
    logits_path_reason: str | None = None  # why a full forward, where it was one
    chunk_tokens: int | None = None
    buffer_tokens: int | None = None
    n_segments: int | None = None
    reference_kept: str | None = None  # what the test passes read: "logits" or "hidden-states" (head re-applied)
    reference_kept_reason: str | None = None  # why (passes/reference.py's rule, with its measured costs)
    reference_stored: str | None = None  # what the cache / resume state hold: "hidden-states" or "logits"
    reference_head_us: float | None = None  # the reference's FP32 head, measured: microseconds per token
    attn_implementation: str | None = None
    placement: dict | None = None  # --device-map: modules per device
    padded_head: dict = field(default_factory=dict)  # precision -> whether its head ran zero-padded
    attention_warm: dict | None = None  # CUDA: the reference's attention calls replayed per 2-byte dtype (passes/attention.py)
    compiled: dict | None = None  # --compile: backend, settings, modules and seconds per precision
    cpu_half_gemm: dict = field(default_factory=dict)  # precision -> Linears run as FP32 GEMMs on a CPU (model/cpu.py)
    cpu_allocator: str | None = None  # "glibc thresholds raised" where model/cpu.tune_allocator applied
    # the run (passes/runner.py)
    batch_size: int | None = None
    device: str | None = None
    divergence_path: str | None = None
    resumed_passes: list = field(default_factory=list)
    reference_cache: dict = field(default_factory=dict)
    run_timing: dict = field(default_factory=dict)
    device_map: str | None = None
    data_parallel: dict | None = None

    def update(self, values: dict) -> None:
        """Set the facts in `values` (a saved plan's), by name; an unknown name is a programming error."""
        for k, v in values.items():
            setattr(self, k, v) if k in _NAMES else _unknown(k)

    def to_dict(self) -> dict:
        """The provenance section of results.json: every fact that is known (None left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def plan_dict(self) -> dict:
        """The pass facts a resumed or cached run must report as the first run did."""
        return {k: getattr(self, k) for k in _PLAN if getattr(self, k) is not None}


_NAMES = {f.name for f in fields(Provenance)}
_PLAN = ("reference_flags", "logits_path", "logits_path_reason", "chunk_tokens", "buffer_tokens", "n_segments",
         "reference_kept", "reference_kept_reason", "reference_stored", "reference_head_us",
         "attn_implementation", "placement", "padded_head", "compiled", "test_flags", "cpu_half_gemm")


def _unknown(name: str) -> None:
    raise AttributeError(f"Provenance has no field {name!r}: add it to the record")
