"""`run`: one evaluation from a config to results, as a short list of steps.

setup (device, tokenizer, corpus, precisions) -> shard (this rank's windows) -> stores (resume
state, reference cache) -> passes (loop.py: reference first, then each test precision, one model
resident at a time) -> gather (data-parallel ranks to rank 0) -> results (metrics/summary.py and
the observers' findings). Each step is a function of what the previous ones made.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace

import torch

import evalsuite
from evalsuite.config import RunConfig, numeric_fields, reference_fields, resolve_device
from evalsuite.errors import EvalsuiteError, UsageError
from evalsuite.log import only_rank0, say
from evalsuite.metrics import kernels
from evalsuite.metrics.summary import build_results
from evalsuite.model.forward import auto_batch_size
from evalsuite.model.loading import check_model_source, hidden_size, load_tokenizer, stored_dtype
from evalsuite.model.precision import Precision, unsupported_reason
from evalsuite.passes import distributed
from evalsuite.passes.generate import generate
from evalsuite.passes.loop import Loop, Plan, Stores
from evalsuite.passes.scoring import PassContext, TokenArrays, restore_observers
from evalsuite.store import corpus as corpus_mod
from evalsuite.store.logits import BackgroundWriter
from evalsuite.store.refcache import ReferenceCache, cache_fields, checkpoint_digest, tokens_digest
from evalsuite.store.state import RunState, model_signature

__all__ = ["run", "noise_budget"]

NOISE_SHARE = 8  # a large run's noise-floor pass re-scores at most 1/NOISE_SHARE of its tokens ...
NOISE_MIN = 4096  # ... but a small run's up to this many (it is cheap there)


def noise_budget(requested: int, n_tokens: int, world: int = 1) -> int:
    """Tokens of the noise-floor pass on one rank: <= --noise-tokens, and a small share of a large run.

    The noise pass repeats the reference, the most expensive pass: at 7B its full 32k tokens would
    add a quarter to a 130k-token run. An eighth of the tokens measures a floor that sits orders of
    magnitude below any dtype's divergence just as well.
    """
    return min(requested // world, max(n_tokens // NOISE_SHARE, min(n_tokens, NOISE_MIN)))


@dataclass(frozen=True)
class Setup:
    """What the run is about, the same on every rank."""

    cfg: RunConfig
    source: str
    device: torch.device
    tokenizer: object
    windows: corpus_mod.TokenWindows  # the whole corpus
    corpus_identity: dict
    tests: tuple[Precision, ...]
    skipped: dict[str, str]  # precision -> why this device can't run it
    dist: distributed.Dist | None


def run(cfg: RunConfig, source: str, observers: tuple = (), resume: bool = False, fresh: bool = False,
        write_outputs=None):
    """Evaluate `source` per `cfg`; return (`RunResults`, per-token arrays by name).

    With `resume`, finished passes are kept in `<cfg.out_dir>/.state` and reused by a rerun
    (`fresh` discards them first); `write_outputs(results, per_token)` is then called before the
    state is removed, so a kill at any moment leaves either the state or the results.
    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 returns the results of the
    whole corpus, the other ranks return (None, None). `observers` follow passes/observers.py.
    """
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    dist = distributed.from_env()
    with only_rank0(dist.rank if dist else 0):
        s = setup(cfg, source, dist, timing)
        plan = shard(s)
        stores, cache_info = open_stores(s, plan, observers, resume, fresh, timing)
        loop = Loop(plan, stores, observers, collect_snapshots=dist is not None and dist.rank != 0)
        error = run_passes(loop, dist is not None, timing)
        cache_info = cache_status(loop, cache_info)
        if dist is not None and not gather(s, loop, error):
            return None, None
        if loop.resumed:  # (a reference read from the cache is reported as a cache hit above)
            say(f"resumed: reused the saved {', '.join(sorted(loop.resumed))} passes")
        if cfg.generate:  # after the scoring passes; its results join the observers' (metric additions, a section)
            t0 = time.perf_counter()
            observers = (*observers, generate(s, loop, observers))
            timing["generate_s"] = round(time.perf_counter() - t0, 3)
        timing["total_s"] = round(time.perf_counter() - t_start, 3)
        results, per_token = summarize(s, loop, observers, cache_info, timing)
        if write_outputs is not None:
            write_outputs(results, per_token)
        if not loop.failed:  # a failed dtype keeps the state, so a rerun retries only that dtype
            stores.state.finish(everything=dist is not None)  # rank 0 removes every rank's state
        return results, per_token


def setup(cfg: RunConfig, source: str, dist, timing: dict) -> Setup:
    """Device, tokenizer, token windows and the precisions this device can run."""
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
    say(f"{windows.n_tokens} tokens in {len(windows.windows)} windows of up to {cfg.seq_len} "
        f"({windows.context} context)")
    tests, skipped = runnable(cfg, device)
    return Setup(cfg, source, device, tokenizer, windows, corpus_identity, tests, skipped, dist)


def runnable(cfg: RunConfig, device: torch.device) -> tuple[tuple[Precision, ...], dict[str, str]]:
    """The test precisions this device can run (each once, the reference excluded) and why the others can't."""
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
    return tuple(tests), skipped


def shard(s: Setup) -> Plan:
    """This rank's windows, batch size and noise-floor budget."""
    cfg, mine = s.cfg, s.windows
    if s.dist is not None:
        first, last = distributed.share(len(s.windows.windows), s.dist)
        lo = sum(len(w) - 1 for w in s.windows.windows[:first])
        sub = s.windows.windows[first:last]
        if not sub:
            raise UsageError(f"{s.dist.world} ranks but only {len(s.windows.windows)} windows: use fewer processes")
        n_sub = sum(len(w) - 1 for w in sub)
        mine = replace(s.windows, windows=sub, target_bytes=s.windows.target_bytes[lo:lo + n_sub])
        say(f"data-parallel: {s.dist.world} ranks, about {mine.n_tokens} tokens each")
    width = hidden_size(s.source, cfg.trust_remote_code) if s.device.type == "cuda" and not cfg.batch_size else None
    batch = cfg.batch_size or auto_batch_size(s.device, cfg.seq_len, width)
    noise_tokens = noise_budget(cfg.noise_tokens, mine.n_tokens, s.dist.world if s.dist else 1)
    return Plan(cfg, s.source, s.device, s.tokenizer, mine, s.tests, batch, noise_tokens)


def open_stores(s: Setup, plan: Plan, observers, resume: bool, fresh: bool, timing: dict) -> tuple[Stores, dict]:
    """The resume state (fingerprinted by every option that changes a number) and the reference cache."""
    rank = [s.dist.rank, s.dist.world] if s.dist else None
    fields = {**numeric_fields(s.cfg), "evalsuite": evalsuite.__version__, "torch": torch.__version__,
              "source": s.source, "model_files": model_signature(s.source),
              "corpus_sha256": s.corpus_identity["sha256"], "resolved_device": str(s.device), "rank": rank}
    state = RunState(s.cfg.out_dir, fields, enabled=resume, fresh=fresh,
                     subdir=f"rank{s.dist.rank}" if s.dist else None)
    writer = BackgroundWriter()
    cache, info = open_cache(s, plan, observers, rank, timing, writer)
    return Stores(state, cache, writer), info


def open_cache(s: Setup, plan: Plan, observers, rank, timing: dict,
               writer: BackgroundWriter) -> tuple[ReferenceCache | None, dict]:
    """The reference cache entry for this run's key, or None (off, or the checkpoint can't be hashed)."""
    cfg = s.cfg
    if cfg.reference_cache is None:
        return None, {"status": "off"}
    t0 = time.perf_counter()
    digest = checkpoint_digest(s.source, cfg.reference_cache / "checkpoint-digests.json")
    timing["checkpoint_hash_s"] = round(time.perf_counter() - t0, 3)
    if digest is None:
        say(f"reference cache not used: the files of {s.source} are not on this machine to hash")
        return None, {"status": "off", "reason": "checkpoint files not found locally"}
    fields = cache_fields({
        **reference_fields(cfg), "checkpoint_sha256": digest, "tokens_sha256": tokens_digest(plan.windows.windows),
        "context": plan.windows.context, "resolved_batch_size": plan.batch, "resolved_noise_tokens": plan.noise_tokens,
        "observers": [[type(o).__name__, getattr(o, "signature", None)] for o in observers], "rank": rank,
    }, s.device)
    try:
        cache = ReferenceCache(cfg.reference_cache, fields, cfg.reference_cache_gib, writer)
    except OSError as exc:
        say(f"reference cache not used: cannot write {cfg.reference_cache} ({exc.strerror})")
        return None, {"status": "off", "reason": f"cannot write {cfg.reference_cache}"}
    return cache, {"dir": str(cache.dir), "key": cache.key, "checkpoint_sha256": digest}


def run_passes(loop: Loop, data_parallel: bool, timing: dict) -> tuple[int, str] | None:
    """Every pass of this rank; a rank's error is returned (to be gathered), a lone process's raised."""
    # Objects alive now (imports, tokenizer, corpus) are left out of the collection each model
    # unload runs: on a 7B run on an H200 four full collections took 1.1 s (profile_run.py).
    gc.freeze()
    try:
        loop.run_all()
    except EvalsuiteError as exc:
        if not data_parallel:
            raise
        return exc.exit_code, str(exc)
    finally:
        gc.unfreeze()
        t0 = time.perf_counter()
        loop.writer.join()  # the reference cache / resume files are complete before anything ends
        timing["write_wait_s"] = round(time.perf_counter() - t0, 3)
    return None


def cache_status(loop: Loop, info: dict) -> dict:
    cache = loop.cache
    if cache is None:
        return info
    info["status"] = "hit" if loop.cached_reference else "not stored" if loop.not_kept else "stored"
    if loop.not_kept and not loop.cached_reference:
        info["reason"] = loop.not_kept
    if cache.problem:
        info["problem"] = cache.problem
    if loop.cached_reference:
        say(f"reference {loop.cfg.reference.name} read from the cache {cache.dir} (no reference pass)")
    return info


def gather(s: Setup, loop: Loop, error) -> bool:
    """Every rank's arrays and findings to rank 0; True on rank 0 (which goes on to the results)."""
    parts = distributed.gather(s.dist, {"error": error, **_payload(loop)})
    distributed.finish(s.dist)
    if s.dist.rank != 0:
        if error is not None:
            raise EvalsuiteError(error[1])
        return False
    distributed.check_errors(parts)
    _merge(loop, parts, s.windows)
    loop.prov.data_parallel = {"world_size": s.dist.world, "gather": "gloo",
                               "tokens_per_rank": [p["n_tokens"] for p in parts]}
    return True


def summarize(s: Setup, loop: Loop, observers, cache_info: dict, timing: dict):
    """(RunResults, per-token arrays): the metrics, then each observer's additions."""
    prov = loop.prov
    prov.batch_size, prov.device, prov.device_map = loop.batch, str(s.device), s.cfg.device_map
    prov.divergence_path = "fused-triton-float64" if kernels.available(s.device) else "torch-float64"
    prov.resumed_passes, prov.reference_cache, prov.run_timing = sorted(loop.resumed), cache_info, timing
    results = build_results(s, loop, stored_dtype(s.source))
    for obs in observers:
        finish = getattr(obs, "finish", None)
        if finish is not None:
            additions, sections = finish({k: dict(v.metrics) for k, v in results.dtypes.items()})
            for name, extra in additions.items():
                if name in results.dtypes:
                    results.dtypes[name].metrics.update(extra)
            results.sections.update(sections)
    ref = s.cfg.reference.name
    per_token = {"targets": s.windows.targets, "target_bytes": s.windows.target_bytes,
                 f"{ref}/nll": loop.ref.nll, f"{ref}/argmax": loop.ref.argmax}
    for name, a in loop.arrays.items():
        per_token.update({f"{name}/nll": a.nll, f"{name}/kl": a.kl, f"{name}/argmax": a.argmax,
                          f"{name}/nonfinite": a.nonfinite})
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
