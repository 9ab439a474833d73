"""`run`: one evaluation from a config to results, as a short list of steps.

setup (device, tokenizer, corpus, precisions) -> shard (this rank's windows) -> stores (resume
state, reference cache) -> passes (loop.py: reference first, then each test precision, one model
resident at a time) -> gather (data-parallel ranks to rank 0) -> results (metrics/summary.py and
the observers' findings). Each step is a function of what the previous ones made.
"""

from __future__ import annotations

import gc
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch

from evalsuite.config import RunConfig, for_device, resolve_device
from evalsuite.errors import EvalsuiteError, UsageError
from evalsuite.log import only_rank0, say
from evalsuite.metrics import kernels
from evalsuite.metrics.registry import PER_TOKEN_FILE
from evalsuite.metrics.summary import build_results
from evalsuite.model.batching import auto_batch_size
from evalsuite.model.cpu import tune_allocator
from evalsuite.model.loading import hidden_size, load_tokenizer, stored_dtype
from evalsuite.model.precision import Precision, unsupported_reason
from evalsuite.model.source import check_model_source, max_positions
from evalsuite.passes import distributed, repair
from evalsuite.passes.generate import generate
from evalsuite.passes.loop import Loop, Plan
from evalsuite.passes.observers import Observer
from evalsuite.passes.prewarm import prewarm_child
from evalsuite.passes.scoring import observer_part
from evalsuite.passes.stores import cache_status, digest_meanwhile, open_stores
from evalsuite.phases import phase
from evalsuite.store import corpus as corpus_mod
from evalsuite.store import rolling
from evalsuite.store.windows import LM_EVAL

__all__ = ["run", "noise_budget"]

NOISE_SHARE = 8  # a large run's noise-floor pass re-scores at most 1/NOISE_SHARE of its tokens ...
NOISE_MIN = 4096  # ... but a small run's up to this many (it is cheap there)
SMALL_RUN = 256  # fewer scored tokens than this is said: the figures are too noisy to compare dtypes


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
    allocator_tuned: bool = False  # model/cpu.tune_allocator ran (a CPU run on glibc)
    digest: Future | None = None  # the checkpoint's sha256 for the reference cache, computed meanwhile
    prewarm: object | None = None  # prewarm.prewarm_child: the fused kernel compiling meanwhile


def run(cfg: RunConfig, source: str, observers: tuple[Observer, ...] = (), resume: bool = False,
        fresh: bool = False, write_outputs=None) -> RunOutput | None:
    """Evaluate `source` per `cfg`; return a `RunOutput` (results, per-token arrays, files, failures).

    With `resume`, finished passes are kept in `<cfg.out_dir>/.state` and reused by a rerun
    (`fresh` discards them first); `write_outputs(output)` is then called before the state is
    removed, so a kill at any moment leaves either the state or the results.
    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 returns the output of the
    whole corpus, the other ranks return None. `observers` follow passes/observers.py.
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
        if dist is not None and not distributed.gather_run(s.dist, loop, error, s.windows):
            return None
        if loop.resumed:  # (a reference read from the cache is reported as a cache hit above)
            say(f"resumed: reused the saved {', '.join(sorted(loop.resumed))} passes")
        with phase("repair"):
            repairs = repair.run_repairs(s, loop, observers, timing)  # a safe recipe for each broken precision
        if cfg.generate:  # after the scoring passes; its results join the observers' (metric additions, a section)
            t0 = time.perf_counter()
            with phase("generate"):
                observers = (*observers, generate(s, loop, observers))
            timing["generate_s"] = round(time.perf_counter() - t0, 3)
        timing["total_s"] = round(time.perf_counter() - t_start, 3)
        with phase("summarize"):
            output = summarize(s, loop, observers, cache_info, timing)
        output = replace(output, results=repair.attach(output.results, repairs))
        if write_outputs is not None:
            write_outputs(output)
        if not loop.failed:  # a failed dtype keeps the state, so a rerun retries only that dtype
            stores.state.finish(everything=dist is not None)  # rank 0 removes every rank's state
        return output


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
    cfg, notes = for_device(cfg, device)
    for note in notes:
        say(note)
    tuned = device.type == "cpu" and tune_allocator()
    check_model_source(source)
    limit = max_positions(source)
    if limit is not None and cfg.seq_len + 1 > limit:  # a window is seq_len tokens plus one of context
        raise UsageError(f"--seq-len {cfg.seq_len} needs {cfg.seq_len + 1} positions but {source} has "
                         f"max_position_embeddings {limit}: use --seq-len {limit - 1} or less")
    # after the option checks: a refused run exits at once instead of waiting for the hash
    digest = digest_meanwhile(cfg, source)
    prewarm = prewarm_child(device, source, [p.dtype for p in cfg.dtypes if p != cfg.reference], cfg.trust_remote_code)
    with phase("tokenizer"):
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    with phase("tokenize"):
        texts, corpus_identity = corpus_mod.load_texts(cfg.corpus)
        tokenize = rolling.tokenize if cfg.windowing == LM_EVAL else corpus_mod.tokenize
        windows = tokenize(texts, tokenizer, cfg.seq_len, cfg.max_tokens)
    say(f"{windows.n_tokens} tokens in {len(windows.windows)} windows of up to {cfg.seq_len} ({windows.described})")
    if windows.n_tokens < SMALL_RUN:
        say(f"only {windows.n_tokens} tokens are scored: every figure will carry a wide standard error")
    if cfg.noise_tokens == 0:
        say("--noise-tokens 0: no noise floor is measured, so no divergence figure has a floor to stand against")
    tests, skipped = runnable(cfg, device)
    return Setup(cfg, source, device, tokenizer, windows, corpus_identity, tests, skipped, dist, tuned, digest, prewarm)


def runnable(cfg: RunConfig, device: torch.device) -> tuple[tuple[Precision, ...], dict[str, str]]:
    """The test precisions this device can run (each once, the reference excluded) and why the others can't."""
    tests: list[Precision] = []
    skipped: dict[str, str] = {}
    for p in cfg.dtypes:
        if p == cfg.reference or p in tests:
            say(f"{p.name} is " + ("the reference" if p == cfg.reference else "given twice") + ": run once")
            continue
        reason = unsupported_reason(p, device)
        if reason:
            skipped[p.name] = f"skipped: {reason}"
            say(f"{p.name} {skipped[p.name]}; the other dtypes go on")
        else:
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
        if last <= first:
            raise UsageError(f"{s.dist.world} ranks but only {len(s.windows.windows)} windows: use fewer processes")
        mine = s.windows.part(first, last)
        say(f"data-parallel: {s.dist.world} ranks, about {mine.n_tokens} tokens each")
    width = hidden_size(s.source, cfg.trust_remote_code) if s.device.type == "cuda" and not cfg.batch_size else None
    batch = cfg.batch_size or auto_batch_size(s.device, cfg.seq_len, width)
    noise_tokens = noise_budget(cfg.noise_tokens, mine.n_tokens, s.dist.world if s.dist else 1)
    return Plan(cfg, s.source, s.device, s.tokenizer, mine, s.tests, batch, noise_tokens, s.prewarm)


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
        with phase("write_wait"):
            loop.writer.join()  # the reference cache / resume files are complete before anything ends
    return None


def summarize(s: Setup, loop: Loop, observers, cache_info: dict, timing: dict) -> RunOutput:
    """The metrics, then each observer's additions, files and failures."""
    prov = loop.prov
    prov.batch_size, prov.device, prov.device_map = loop.batch, str(s.device), s.cfg.device_map
    prov.divergence_path = "fused-triton-float64" if kernels.available(s.device) else "torch-float64"
    prov.cpu_allocator = "glibc mmap and trim thresholds raised (model/cpu.py)" if s.allocator_tuned else None
    prov.resumed_passes, prov.reference_cache, prov.run_timing = sorted(loop.resumed), cache_info, timing
    results = build_results(s, loop, stored_dtype(s.source))
    files: dict[str, str] = {}
    failures = [{"part": f"dtype {name}", "error": msg} for name, msg in loop.failed.items()]
    for obs in observers:
        finish = getattr(obs, "finish", None)
        if finish is not None:
            additions, sections = finish({k: dict(v.metrics) for k, v in results.dtypes.items()})
            for name, extra in additions.items():
                if name in results.dtypes:
                    results.dtypes[name].metrics.update(extra)
            results.sections.update(sections)
        files.update(getattr(obs, "files", None) or {})
        failures += [{"part": observer_part(obs), "error": e, "traceback": getattr(obs, "failure_traceback", None)}
                     for e in getattr(obs, "failures", None) or []]
    if failures:
        results.sections["failures"] = [{k: v for k, v in f.items() if k != "traceback"} for f in failures]
    ref = s.cfg.reference.name
    per_token = {"targets": s.windows.targets, "target_bytes": s.windows.target_bytes,
                 f"{ref}/nll": loop.ref.nll, f"{ref}/argmax": loop.ref.argmax}
    if s.windows.documents is not None:  # lm-eval windowing: a document's loglikelihood is the sum of its -nll
        per_token["document"] = s.windows.documents
    for name, a in loop.arrays.items():
        per_token.update({f"{name}/{k}": getattr(a, k) for k in PER_TOKEN_FILE})
    return RunOutput(results, per_token, files, tuple(failures))


@dataclass(frozen=True)
class RunOutput:
    """What a run hands its caller to write: results, per-token arrays, the observers' files, and the
    parts that failed (each {"part", "error", "traceback"}), which make the run's exit non-zero."""

    results: object  # store.results.RunResults
    per_token: dict
    files: dict[str, str]  # file name in --out -> UTF-8 text (e.g. benchmarks.jsonl)
    failures: tuple[dict, ...]
