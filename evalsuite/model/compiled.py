"""Opt-in (`--compile`): torch.compile the attention, MLP and norm modules of a 2-byte model.

Why: an eager HF decoder runs RMSNorm, rotary embeddings and SiLU x up as a dozen separate
elementwise kernels per layer. On an H200 they were 31 % of a Llama-2-7B BF16 forward's GPU
time (perf/profile_pass.py), while the matrix products and attention alone would take
20.3 us/token against the eager body's 28.5 (perf/floor.py). Fusing them is the one lever
left on a pass that is otherwise the model's own GEMMs.

Why these modules and not the whole decoder: evalsuite's numerics observers hook the decoder
layers and their attention/MLP/norm children. Compiling a module's `forward` (not its `__call__`)
keeps every hook in eager Python around the compiled code, so the observers see the same
tensors; a compiled decoder would trace the hooks into its graph, and Dynamo by default does not
guard on hooks (`skip_nnmodule_hook_guards`), so hooks attached for a later pass could go unseen.
The residual adds between the modules stay eager.

Why the numbers can be trusted: inductor's `emulate_precision_casts` rounds each fused
intermediate to the dtype eager would have rounded it to, so a BF16/FP16 module computes what
eager computes except where a fused reduction (RMSNorm's mean of squares) sums in another order;
the run's results record that the test passes were compiled, and docs/performance.md gives the
measured difference from eager. The FP32 reference is never compiled (it is GEMM-bound, and its
norms' float32 sums would not round away). Shapes are dynamic, so one compilation serves every
batch; a batch of one window is run as two copies of it (Dynamo specialises sizes 0 and 1).
"""

from __future__ import annotations

import time

import torch

from evalsuite.errors import EvalsuiteError
from evalsuite.model.modules import find_modules

KINDS = ("attention", "mlp", "norm")
RECOMPILE_LIMIT = 64  # per forward's code: dtypes x the few shapes a run sees (batch 1, the benchmarks' masks)


def compile_modules(model: torch.nn.Module, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """Replace the forward of each module of `kinds` by a compiled one; return their names.

    No global setting is changed: inductor's precision-cast emulation goes in through
    `torch.compile(options=...)`, for these compilations only, and Dynamo's recompile limit is
    raised only while a compiled forward runs (`_with_limit`), so code compiled elsewhere in the
    same process (a user's, a test's) sees torch's defaults.
    """
    names = []
    for w in find_modules(model):
        if w.kind in kinds and "forward" not in vars(w.module):
            compiled = torch.compile(w.module.forward, dynamic=True, options={"emulate_precision_casts": True})
            w.module.forward = _with_limit(compiled)
            names.append(w.name)
    return names


def _with_limit(compiled):
    """`compiled`, called with Dynamo's recompile limit at least RECOMPILE_LIMIT.

    Why per call: every decoder layer's module shares one `forward` code object, and Dynamo
    counts the recompilations (one per module instance) against that code object's limit.
    """
    import torch._dynamo

    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)

    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(*args, **kwargs)

    return forward


def warm_up(body, vocab_size: int, device: torch.device) -> float:
    """Compile now, on a (2, 17) probe, so the pass's timing is the pass's; return the seconds it took."""
    ids = torch.randint(0, vocab_size, (2, 17), generator=torch.Generator().manual_seed(0)).to(device)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            body(ids)
    except Exception as exc:  # inductor needs a C++ compiler on CPU and Triton on GPU
        raise EvalsuiteError(f"--compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                             "run without --compile") from exc
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0

