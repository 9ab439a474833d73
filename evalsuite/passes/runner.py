"""`run`: one evaluation from a config to results — setup, the pass loop, the gather, the summary.

The loop itself (reference first, then each test dtype, one model resident at a time; segments;
resume) is passloop.py; the reference cache is refcache.py; data-parallel ranks are
distributed.py. This module wires them together and records where the time went.
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace

import torch

import evalsuite
from evalsuite.config import RunConfig, resolve_device
from evalsuite.errors import EvalsuiteError, UsageError
from evalsuite.log import only_rank0, say
from evalsuite.metrics import kernels
from evalsuite.metrics.summary import build_results
from evalsuite.model.forward import auto_batch_size
from evalsuite.model.loading import check_model_source, hidden_size, load_tokenizer, stored_dtype
from evalsuite.model.precision import DTYPES, Precision, unsupported_reason
from evalsuite.passes import distributed
from evalsuite.passes.loop import Loop
from evalsuite.passes.scoring import PassContext, TokenArrays, restore_observers
from evalsuite.store import corpus as corpus_mod
from evalsuite.store.logits import BackgroundWriter
from evalsuite.store.refcache import ReferenceCache, cache_fields, checkpoint_digest, tokens_digest
from evalsuite.store.state import RunState, model_signature

__all__ = ["run"]

NOISE_SHARE = 8  # a large run's noise-floor pass re-scores at most 1/NOISE_SHARE of its tokens ...
NOISE_MIN = 4096  # ... but a small run's up to this many (it is cheap there)


def noise_budget(requested: int, n_tokens: int, world: int = 1) -> int:
    """Tokens of the noise-floor pass on one rank: <= --noise-tokens, and a small share of a large run.

    The noise pass repeats the reference, the most expensive pass: at 7B its full 32k tokens would
    add a quarter to a 130k-token run. An eighth of the tokens measures a floor that sits orders of
    magnitude below any dtype's divergence just as well.
    """
    return min(requested // world, max(n_tokens // NOISE_SHARE, min(n_tokens, NOISE_MIN)))


def _state_fields(cfg: RunConfig, source: str, device: torch.device, corpus_identity: dict) -> dict:
    """What must match for saved passes to be reused: anything that changes a number."""
    return {"evalsuite": evalsuite.__version__, "torch": torch.__version__, "model": source,
            "model_files": model_signature(source), "corpus_sha256": corpus_identity["sha256"],
            "seq_len": cfg.seq_len, "max_tokens": cfg.max_tokens, "reference": cfg.reference.name,
            "batch_size": cfg.batch_size, "noise_tokens": cfg.noise_tokens, "buffer_gib": cfg.buffer_gib,
            "attn": cfg.attn_implementation, "device": str(device), "numerics": cfg.numerics,
            "headroom_margin_bits": cfg.headroom_margin_bits, "tasks": list(cfg.tasks),
            "num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "device_map": cfg.device_map, "compile": cfg.compile}


def _open_cache(cfg: RunConfig, source: str, device: torch.device, windows, observers, batch: int,
                noise_tokens: int, dist, timing: dict, writer: BackgroundWriter) -> tuple[ReferenceCache | None, dict]:
    """The reference cache entry for this run's key, or None (off, or the checkpoint can't be hashed)."""
    if cfg.reference_cache is None:
        return None, {"status": "off"}
    t0 = time.perf_counter()
    digest = checkpoint_digest(source, cfg.reference_cache / "checkpoint-digests.json")
    timing["checkpoint_hash_s"] = round(time.perf_counter() - t0, 3)
    if digest is None:
        say(f"reference cache not used: the files of {source} are not on this machine to hash")
        return None, {"status": "off", "reason": "checkpoint files not found locally"}
    fields = cache_fields({
        "checkpoint_sha256": digest, "tokens_sha256": tokens_digest(windows.windows), "context": windows.context,
        "reference": cfg.reference.name, "batch_size": batch, "noise_tokens": noise_tokens,
        "buffer_gib": cfg.buffer_gib, "attn": cfg.attn_implementation, "device_map": cfg.device_map,
        "observers": [[type(o).__name__, getattr(o, "signature", None)] for o in observers],
        "rank": [dist.rank, dist.world] if dist else None,
    }, device)
    try:
        cache = ReferenceCache(cfg.reference_cache, fields, cfg.reference_cache_gib, writer)
    except OSError as exc:
        say(f"reference cache not used: cannot write {cfg.reference_cache} ({exc.strerror})")
        return None, {"status": "off", "reason": f"cannot write {cfg.reference_cache}"}
    return cache, {"dir": str(cache.dir), "key": cache.key, "checkpoint_sha256": digest}


def _tests_and_skipped(cfg: RunConfig, device: torch.device) -> tuple[list[Precision], dict[str, str]]:
    tests: list[Precision] = []
    skipped: dict[str, str] = {}
    for p in cfg.dtypes:
        reason = unsupported_reason(p, device)
        if reason:
            skipped[p.name] = f"skipped: {reason}"
            say(f"{p.name} {skipped[p.name]}; the other dtypes go on")
        elif p != cfg.reference and p not in tests:
            tests.append(p)
    ref_reason = unsupported_reason(cfg.reference, device)
    if ref_reason:
        raise UsageError(f"reference {cfg.reference.name} cannot run here ({ref_reason}); use --reference fp32")
    return tests, skipped


def run(cfg: RunConfig, source: str, observers: tuple = (), resume: bool = False, fresh: bool = False,
        write_outputs=None):
    """See `_run`; under torchrun only rank 0 speaks."""
    dist = distributed.from_env()
    with only_rank0(dist.rank if dist else 0):
        return _run(cfg, source, observers, resume, fresh, write_outputs)


def _run(cfg: RunConfig, source: str, observers: tuple = (), resume: bool = False, fresh: bool = False,
         write_outputs=None):
    """Evaluate `source` per `cfg`; return (`RunResults`, per-token arrays by name).

    With `resume`, finished passes are kept in `<cfg.out_dir>/.state` and reused by a rerun
    (`fresh` discards them first); `write_outputs(results, per_token)` is then called before the
    state is removed, so a kill at any moment leaves either the state or the results.
    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 returns the results of the
    whole corpus, the other ranks return (None, None).

    `observers` are plain objects with any of these methods (docs/extending.md), called with the
    model resident: pass_started(ctx), batch_started(offset, ids (B, T+1)), pass_finished(ctx),
    and finish(metrics by dtype) -> (metric additions by dtype, extra result sections); for
    resume, the reference cache and data-parallel ranks, snapshot(ctx) -> JSON-able and
    restore(ctx_without_model, snapshot).
    """
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    dist = distributed.from_env()
    device_name = cfg.device
    if dist is not None:
        if cfg.device_map:
            raise UsageError("--device-map auto spreads one model over all GPUs; with several ranks each rank "
                             "already has its own GPU: use one or the other")
        distributed.init(dist)
        device_name = distributed.rank_device(dist, cfg.device)
        if dist.rank != 0:
            cfg = replace(cfg, progress=False)
    torch.manual_seed(cfg.seed)
    device = resolve_device(device_name)
    check_model_source(source)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    t0 = time.perf_counter()
    texts, corpus_identity = corpus_mod.load_texts(cfg.corpus)
    windows = corpus_mod.tokenize(texts, tokenizer, cfg.seq_len, cfg.max_tokens)
    timing["tokenize_s"] = round(time.perf_counter() - t0, 3)
    n = windows.n_tokens
    say(f"{n} tokens in {len(windows.windows)} windows of up to {cfg.seq_len} ({windows.context} context)")
    mine = windows
    if dist is not None:
        first, last = distributed.share(len(windows.windows), dist)
        lo = sum(len(w) - 1 for w in windows.windows[:first])
        sub = windows.windows[first:last]
        mine = replace(windows, windows=sub, target_bytes=windows.target_bytes[lo:lo + sum(len(w) - 1 for w in sub)])
        if not sub:
            raise UsageError(f"{dist.world} ranks but only {len(windows.windows)} windows: use fewer processes")
        say(f"data-parallel: {dist.world} ranks, about {mine.n_tokens} tokens each")

    tests, skipped = _tests_and_skipped(cfg, device)
    width = hidden_size(source, cfg.trust_remote_code) if device.type == "cuda" and not cfg.batch_size else None
    batch = cfg.batch_size or auto_batch_size(device, cfg.seq_len, width)
    world = dist.world if dist else 1
    noise_tokens = noise_budget(cfg.noise_tokens, mine.n_tokens, world)
    fields = _state_fields(cfg, source, device, corpus_identity)
    if dist is not None:
        fields["rank"] = [dist.rank, dist.world]
    state = RunState(cfg.out_dir, fields, enabled=resume, fresh=fresh,
                     subdir=f"rank{dist.rank}" if dist else None)
    writer = BackgroundWriter()
    cache, cache_info = _open_cache(cfg, source, device, mine, observers, batch, noise_tokens, dist, timing, writer)
    loop = Loop(cfg, source, device, tokenizer, mine, tests, observers, state, cache, batch, noise_tokens, writer,
                collect_snapshots=dist is not None and dist.rank != 0)
    error = None
    # Objects alive now (imports, tokenizer, corpus) are left out of the collection each model
    # unload runs: on a 7B run on an H200 four full collections took 1.1 s (profile_run.py).
    gc.freeze()
    try:
        loop.run_all()
    except EvalsuiteError as exc:
        if dist is None:
            raise
        error = (exc.exit_code, str(exc))
    finally:
        gc.unfreeze()
        t0 = time.perf_counter()
        loop.writer.join()  # the reference cache / resume files are complete before anything ends
        timing["write_wait_s"] = round(time.perf_counter() - t0, 3)
    if cache is not None:
        cache_info["status"] = "hit" if loop.cached_reference else "not stored" if loop.not_kept else "stored"
        if loop.not_kept and not loop.cached_reference:
            cache_info["reason"] = loop.not_kept
        if cache.problem:
            cache_info["problem"] = cache.problem
        if loop.cached_reference:
            say(f"reference {cfg.reference.name} read from the cache {cache.dir} (no reference pass)")
    if dist is not None:
        parts = distributed.gather(dist, {"error": error, **_payload(loop)})
        distributed.finish(dist)
        if dist.rank != 0:
            if error is not None:
                raise EvalsuiteError(error[1])
            return None, None
        distributed.check_errors(parts)
        _merge(loop, parts, windows)
        loop.prov["data_parallel"] = {"world_size": dist.world, "gather": "gloo",
                                      "tokens_per_rank": [p["n_tokens"] for p in parts]}
    if loop.resumed:  # (a reference read from the cache is reported as a cache hit above)
        say(f"resumed: reused the saved {', '.join(sorted(loop.resumed))} passes")

    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    prov = {**loop.prov, "batch_size": loop.batch, "device": str(device), "stored_dtype": stored_dtype(source),
            "divergence_path": "fused-triton-float64" if kernels.available(device) else "torch-float64",
            "resumed_passes": sorted(loop.resumed), "reference_cache": cache_info, "run_timing": timing,
            "device_map": cfg.device_map}
    results = build_results(cfg, source, device, tokenizer, windows, corpus_identity, loop.ref, loop.noise,
                            loop.arrays, skipped, loop.failed, prov)
    for obs in observers:
        finish = getattr(obs, "finish", None)
        if finish is not None:
            additions, sections = finish({k: dict(v.metrics) for k, v in results.dtypes.items()})
            for name, extra in additions.items():
                if name in results.dtypes:
                    results.dtypes[name].metrics.update(extra)
            results.sections.update(sections)
    per_token = {"targets": windows.targets, "target_bytes": windows.target_bytes,
                 f"{cfg.reference.name}/nll": loop.ref.nll, f"{cfg.reference.name}/argmax": loop.ref.argmax}
    for name, a in loop.arrays.items():
        per_token.update({f"{name}/nll": a.nll, f"{name}/kl": a.kl, f"{name}/argmax": a.argmax,
                          f"{name}/nonfinite": a.nonfinite})
    if write_outputs is not None:
        write_outputs(results, per_token)
    if not loop.failed:  # a failed dtype keeps the state, so a rerun retries only that dtype
        state.finish(everything=dist is not None)  # rank 0 removes every rank's state
    return results, per_token


def _payload(loop: Loop) -> dict:
    """What a rank sends to rank 0: its per-token arrays and its observers' findings."""
    return {"n_tokens": loop.windows.n_tokens, "ref": loop.ref, "noise": loop.noise, "arrays": loop.arrays,
            "failed": loop.failed, "resumed": sorted(loop.resumed), "snapshots": loop.collected or [],
            "cached_reference": loop.cached_reference}


def _merge(loop: Loop, parts: list[dict], windows) -> None:
    """Rank 0: the whole corpus's arrays in window order, and every rank's findings in its observers."""
    loop.ref = distributed.concat_arrays([p["ref"] for p in parts], TokenArrays)
    noises = [p["noise"] for p in parts if p["noise"] is not None]
    loop.noise = distributed.concat_arrays(noises, TokenArrays) if noises else None
    for name in list(loop.arrays):
        loop.arrays[name] = distributed.concat_arrays([p["arrays"][name] for p in parts], TokenArrays)
    for p in parts[1:]:
        for name, msg in p["failed"].items():
            loop.failed.setdefault(name, msg)
        loop.resumed.update(p["resumed"])
        loop.cached_reference = loop.cached_reference and p["cached_reference"]
        for dtype, role, seg, snaps in p["snapshots"]:
            ctx = PassContext(DTYPES[dtype], role, None, loop.tokenizer, loop.device, loop.cfg, windows, seg,
                              (0, 0, 0), loop.batch)
            restore_observers(loop.observers, ctx, snaps)
    loop.windows = windows
