"""Where finished passes go: the resume state, the reference cache entry for this run's key, and
the checkpoint digest that key needs, hashed while the run starts up.

Split from runner.py (the run's steps) and loop.py (the passes): what both hand around is the
`Stores`, opened here once per run and read back here for the run's cache status.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import evalsuite
from evalsuite.config import RunConfig, numeric_fields, reference_fields
from evalsuite.log import say
from evalsuite.phases import phase
from evalsuite.store.digests import BACKGROUND_WORKERS, checkpoint_digest, tokens_digest
from evalsuite.store.logits import BackgroundWriter
from evalsuite.store.refcache import ReferenceCache, cache_fields
from evalsuite.store.state import RunState, model_signature

if TYPE_CHECKING:
    from evalsuite.passes.loop import Loop, Plan
    from evalsuite.passes.runner import Setup


@dataclass
class Stores:
    """Where finished passes go; one background writer keeps their writes in order."""

    state: RunState
    cache: ReferenceCache | None
    writer: BackgroundWriter


def digest_meanwhile(cfg: RunConfig, source: str) -> Future | None:
    """The checkpoint's digest (digests.checkpoint_digest), hashed while the tokenizer loads and the
    corpus is tokenized: a first run on a 13 GB checkpoint hashed it for 1.1-1.3 s on an H200 host
    before anything else could start (later runs read the digest back by size and mtime). The
    thread only waits: a child process reads and hashes (store/filehash.py says why).

    The thread is a daemon, unlike a ThreadPoolExecutor's, which exit joins: a run that fails
    after setup ends at once (startup.leave), and startup.stop_children stops the child then."""
    if cfg.reference_cache is None:
        return None
    future: Future = Future()

    def hash_it() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(checkpoint_digest(source, cfg.reference_cache / "checkpoint-digests.json",
                                                BACKGROUND_WORKERS, in_child=True))
        except BaseException as exc:  # as the executor's worker: .result() raises it in open_cache
            future.set_exception(exc)

    threading.Thread(target=hash_it, name="evalsuite-hash", daemon=True).start()
    return future


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
    with phase("hash"):
        digest = s.digest.result()  # (setup started it: the cache is on)
        tokens = tokens_digest(plan.windows.windows)
    if digest is None:
        say(f"reference cache not used: the files of {s.source} are not on this machine to hash")
        return None, {"status": "off", "reason": "checkpoint files not found locally"}
    fields = cache_fields({
        **reference_fields(cfg), "checkpoint_sha256": digest, "tokens_sha256": tokens,
        "context": plan.windows.context, "resolved_batch_size": plan.batch, "resolved_noise_tokens": plan.noise_tokens,
        "observers": [[type(o).__name__, getattr(o, "signature", None)] for o in observers], "rank": rank,
    }, s.device)
    try:
        cache = ReferenceCache(cfg.reference_cache, fields, cfg.reference_cache_gib, writer)
    except OSError as exc:
        say(f"reference cache not used: cannot write {cfg.reference_cache} ({exc.strerror})")
        return None, {"status": "off", "reason": f"cannot write {cfg.reference_cache}"}
    return cache, {"dir": str(cache.dir), "key": cache.key, "checkpoint_sha256": digest}


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
    elif info["status"] == "stored":
        size = sum(f.stat().st_size for f in cache.dir.rglob("*") if f.is_file())
        info["entry_gib"] = round(size / 2**30, 3)
        say(f"reference kept for reuse in {cache.dir} ({size / 2**30:.2f} GiB; the cache keeps at most "
            f"{loop.cfg.reference_cache_gib:g} GiB: --reference-cache-gib, --no-reference-cache)")
    return info
