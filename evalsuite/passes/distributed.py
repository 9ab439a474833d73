"""Data-parallel runs under `torchrun` (or `accelerate launch`): split the windows, gather exactly.

    torchrun --nproc-per-node 2 -m evalsuite run --model PATH --dtypes fp16,bf16

Each rank runs the whole pipeline (reference, noise floor, every test dtype, observers) on its
own contiguous share of the windows, on its own GPU (LOCAL_RANK) or the CPU. Nothing is
reduced on the device: at the end every rank sends its per-token arrays and its observers'
findings to rank 0, which concatenates the arrays in window order and computes every statistic
from them with the same code as a one-process run. The metrics are therefore those of a
one-process run, up to the floating-point differences of another batch layout (the noise floor
measures exactly that). The gather is a handful of Python objects over gloo, on every device
type: no NCCL collective can time out while a rank waits for a slower one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from evalsuite.errors import EvalsuiteError, UsageError
from evalsuite.passes.scoring import PassContext, TokenArrays, restore_observers

# A rank that finishes first waits in the gather for the slowest one: that can be hours on a
# 70B reference. The timeout only has to catch a rank that died.
GATHER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int


def from_env() -> Dist | None:
    """The torchrun/accelerate environment, or None for a one-process run."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise UsageError(f"WORLD_SIZE/RANK/LOCAL_RANK are not whole numbers ({exc}); launch with torchrun") from exc
    if world <= 1:
        return None
    return Dist(rank=rank, world=world, local_rank=local)


def init(dist: Dist) -> None:
    import torch.distributed as td

    if not td.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise UsageError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch data-parallel runs with torchrun "
                             "or accelerate launch")
        td.init_process_group("gloo", rank=dist.rank, world_size=dist.world, timeout=GATHER_TIMEOUT)


def rank_device(dist: Dist, requested: str) -> str:
    """Each rank on its own GPU: cuda:LOCAL_RANK (a fixed cuda:N makes no sense for several ranks)."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        if dist.local_rank >= torch.cuda.device_count():
            raise UsageError(f"rank {dist.rank} has LOCAL_RANK {dist.local_rank} but only "
                             f"{torch.cuda.device_count()} GPUs are visible: use --nproc-per-node <= GPUs")
        torch.cuda.set_device(dist.local_rank)
        return f"cuda:{dist.local_rank}"
    if requested.startswith("cuda:"):
        raise UsageError("--device cuda:N cannot be used with several ranks: use --device cuda (rank r takes GPU r)")
    return requested


def share(n_windows: int, dist: Dist) -> tuple[int, int]:
    """This rank's contiguous window range [first, last): sizes differ by at most one window."""
    base, extra = divmod(n_windows, dist.world)
    first = dist.rank * base + min(dist.rank, extra)
    return first, first + base + (1 if dist.rank < extra else 0)


def gather(dist: Dist, payload: dict) -> list[dict] | None:
    """Every rank's payload on rank 0 (in rank order), None on the others."""
    import torch.distributed as td

    out: list | None = [None] * dist.world if dist.rank == 0 else None
    td.gather_object(payload, out, dst=0)
    return out


def finish(dist: Dist) -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


def concat_arrays(parts: list, cls):
    """TokenArrays of consecutive token ranges -> one TokenArrays, timing as a wall clock (max)."""
    first = parts[0]
    names = first.names()
    merged = cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in names})
    for p in parts:
        for k, v in p.timing.items():
            merged.timing[k] = max(merged.timing.get(k, 0.0), v)
    merged.batch_size = first.batch_size
    return merged


def check_errors(payloads: list[dict]) -> None:
    errors = [(i, p["error"]) for i, p in enumerate(payloads) if p.get("error")]
    if errors:
        rank, (code, message) = errors[0]
        err = EvalsuiteError(f"rank {rank}: {message}")
        err.exit_code = code
        raise err


# --- a run's passes, gathered to rank 0 (passes/runner.py) ---------------------------------

def gather_run(dist: Dist, loop, error, windows) -> bool:
    """Every rank's arrays and findings to rank 0; True on rank 0 (which goes on to the results)."""
    parts = gather(dist, {"error": error, **_payload(loop)})
    finish(dist)
    if dist.rank != 0:
        if error is not None:
            raise EvalsuiteError(error[1])
        return False
    check_errors(parts)
    _merge(loop, parts, windows)
    loop.prov.data_parallel = {"world_size": dist.world, "gather": "gloo",
                               "tokens_per_rank": [p["n_tokens"] for p in parts]}
    return True


def _payload(loop) -> dict:
    """What a rank sends to rank 0: its per-token arrays and its observers' findings."""
    return {"n_tokens": loop.windows.n_tokens, "ref": loop.ref, "noise": loop.noise, "arrays": loop.arrays,
            "failed": loop.failed, "resumed": sorted(loop.resumed), "snapshots": loop.collected or [],
            "cached_reference": loop.cached_reference}


def _merge(loop, parts: list[dict], windows) -> None:
    """Rank 0: the whole corpus's arrays in window order, and every rank's findings in its observers."""
    loop.ref = concat_arrays([p["ref"] for p in parts], TokenArrays)
    noises = [p["noise"] for p in parts if p["noise"] is not None]
    loop.noise = concat_arrays(noises, TokenArrays) if noises else None
    for name in list(loop.arrays):
        loop.arrays[name] = concat_arrays([p["arrays"][name] for p in parts], TokenArrays)
    by_name = {p.name: p for p in (loop.cfg.reference, *loop.tests)}
    for p in parts[1:]:
        for name, msg in p["failed"].items():
            loop.failed.setdefault(name, msg)
        loop.resumed.update(p["resumed"])
        loop.cached_reference = loop.cached_reference and p["cached_reference"]
        for name, role, seg, snaps in p["snapshots"]:
            ctx = PassContext(by_name[name], role, None, loop.tokenizer, loop.device, loop.cfg, windows, seg,
                              (0, 0, 0), loop.batch)
            restore_observers(loop.observers, ctx, snaps)
    loop.windows = windows
