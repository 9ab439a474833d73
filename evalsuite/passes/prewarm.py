"""The fused divergence kernel compiled before any timed pass: in a child process while the run
starts up, or in a thread while the reference loads, then checked at each pass's start.

Why a child: Triton compiles per vocabulary size, dtype pair and pointer alignment, and its
compiler is Python that holds the GIL. In a thread beside `from_pretrained` it took longer than
the load it hid behind: the cold reference pass still waited 1.4-1.6 s for it at the Llama-2-7B
shape and 5.5 s for Gemma 3's 262,144-entry vocabulary on an H200 (docs/performance.md, round
10), against 0.1-0.4 s where the kernels were cached. A child started with the run compiles on
another core through the start-up's ten seconds and more (imports, tokenizer, tokenization), and
writes the compiled kernels to Triton's cache (evalsuite's cache directory, cli.py), where the
run's own first call finds them as a later run does. Each side stays correct alone: a child
that fails or guessed a layout wrong leaves a kernel to compile, never a number to change.

    python -m evalsuite.passes.prewarm --device 0 --source CHECKPOINT --dtypes float16,bfloat16

prints `reference` once the reference's variants are compiled and `done` at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading

import torch

from evalsuite import startup
from evalsuite.metrics import kernels
from evalsuite.model.head import VOCAB_PAD, pads_by_default
from evalsuite.model.loading import vocab_size

CHILD_MIN_CPUS = 4  # below this the child's imports would slow the run's own start-up: a thread instead
CHILD_TIMEOUT_S = 300.0  # a child still at it by then is stuck (it took seconds): stopped, the run compiles itself


def warm_kernels(scorer, role: str, prewarm: threading.Thread | None = None) -> float:
    """Seconds spent compiling (or loading from Triton's cache) the fused divergence kernel for this
    pass's logits, before the pass is timed.

    Why: the first run on a machine compiled inside the first timed pass (6,257 instead of 310,188
    tokens/s on an H200, docs/performance.md). The probe is a real chunk of this scorer (ids
    (1, 3)), so the test logits' layout (a padded head's view included) is the pass's. The time
    counts any wait for a prewarm (`prewarm_child`, `prewarm_kernels`): the reference waits only
    for its own variants (`reference_ready`), so a small model's reference pass starts while the
    test variants compile; a test pass waits for the whole prewarm."""
    if not kernels.available(scorer.device) or scorer.device.type != "cuda":
        return 0.0
    import time

    t0 = time.perf_counter()
    if prewarm is not None:
        if role == "reference":
            prewarm.reference_ready.wait()
        else:
            prewarm.join()
    if role == "reference":
        _variants(scorer.vocab_size, scorer.device, None)
    else:
        _, logits, _ = next(iter(scorer.chunks(torch.zeros((1, 3), dtype=torch.int64, device=scorer.device))))
        _variants(scorer.vocab_size, scorer.device, logits)
    torch.cuda.synchronize(scorer.device)
    return time.perf_counter() - t0


def _variants(vocab: int, device: torch.device, test: torch.Tensor | None) -> None:
    """Run the fused kernel on the layouts a pass hands it: kept reference rows (2, V) float32
    against `test` (None: against themselves), from the buffer's start and from a row whose start
    is not 16-byte aligned. Why both: Triton specialises on pointer alignment, and with V not a
    multiple of 4 most chunks of a kept buffer start unaligned (row r at 4 * V * r bytes), which
    compiled a second variant inside the first timed pass."""
    ref = torch.zeros((2, vocab), dtype=torch.float32, device=device)  # (2, V) as kept
    kernels.fused_rows(ref, ref if test is None else test)
    if vocab % 4:
        shifted = torch.zeros(2 * vocab + 1, dtype=torch.float32, device=device)[1:].view(2, vocab)  # 4 bytes in
        kernels.fused_rows(shifted, ref if test is None else test)


def compile_all(vocab: int, device: torch.device, dtypes, reference_done=lambda: None,
                after: threading.Thread | None = None) -> None:
    """Every variant the passes will ask for: the reference against itself (then `reference_done()`),
    and each logits dtype against it with the vocabulary's own row stride or, where the head is
    padded by default, a padded head's (2, Vpad)[:, :V] view. `after`: a prewarm_child thread
    whose variants to wait for first, each group as it is ready, so this process loads them
    from Triton's cache (a fraction of a second each) instead of compiling them."""
    if device.index is not None:  # (torch.device("cuda") means the current device: no index to set)
        torch.cuda.set_device(device)
    if after is not None:
        after.reference_ready.wait()
    _variants(vocab, device, None)
    torch.cuda.synchronize(device)
    reference_done()
    if after is not None:
        after.join()
    padded = -(-vocab // VOCAB_PAD) * VOCAB_PAD
    for dtype in dict.fromkeys(dtypes):
        if pads_by_default(vocab, dtype.itemsize):
            _variants(vocab, device, torch.zeros((2, padded), dtype=dtype, device=device)[:, :vocab])
        else:
            _variants(vocab, device, torch.zeros((2, vocab), dtype=dtype, device=device))
    torch.cuda.synchronize(device)


def prewarm_kernels(device: torch.device, vocab: int | None, dtypes,
                    after: threading.Thread | None = None) -> threading.Thread | None:
    """compile_all in a background thread of this process (while the reference loads); the
    returned thread has `reference_ready` (an Event, set once the reference's variants are
    compiled or the thread failed) and `error` (what stopped it early, if anything). With a
    prewarm_child (`after`) it loads what the child compiled, meanwhile: with the child alone the
    cold 7B reference pass still waited 0.3-1.2 s at its start on an H200, loading the kernels
    from the cache in its first call or waiting for the child."""
    if not vocab or device.type != "cuda" or not kernels.available(device):
        return None

    def work():
        try:
            compile_all(vocab, device, dtypes, thread.reference_ready.set, after)
        except Exception as exc:  # noqa: BLE001 - only a head start: warm_kernels compiles whatever is missing
            thread.error = exc
        finally:
            thread.reference_ready.set()

    thread = _handle(work, "evalsuite-prewarm")
    thread.start()
    return thread


def _handle(target, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.error = None
    thread.reference_ready = threading.Event()
    return thread


def prewarm_child(device: torch.device, source: str, dtypes, trust_remote_code: bool = False,
                  command: list[str] | None = None) -> threading.Thread | None:
    """compile_all in a child process started now (with the run's start-up); returns a thread that
    follows it, with prewarm_kernels' `reference_ready` and `error`, or None where a child cannot
    help (not a CUDA device, no Triton, fewer than CHILD_MIN_CPUS cores). `command` replaces the
    child's (tests). The child reads the vocabulary from the checkpoint's config itself, so this
    process starts it before importing transformers."""
    if command is None:
        if device.type != "cuda" or not kernels.available(device) or (os.cpu_count() or 1) < CHILD_MIN_CPUS:
            return None
        command = [sys.executable, "-m", "evalsuite.passes.prewarm", "--source", source,
                   "--dtypes", ",".join(str(d).removeprefix("torch.") for d in dict.fromkeys(dtypes)),
                   *(["--device", str(device.index)] if device.index is not None else []),
                   *(["--trust-remote-code"] if trust_remote_code else [])]
    env = dict(os.environ)
    if sys.pycache_prefix and "PYTHONPYCACHEPREFIX" not in env:  # startup.bytecode_cache's choice holds there too
        env["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix
    errors = tempfile.TemporaryFile()
    try:  # (startup.stop_children stops it if the run ends first)
        proc = startup.spawn(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, env=env,
                             text=True)
    except OSError:  # no interpreter to start
        proc = None
    if proc is None:  # the run's thread compiles instead (Loop.run_all)
        errors.close()
        return None

    def follow():
        stuck = threading.Timer(CHILD_TIMEOUT_S, proc.kill)
        stuck.daemon = True
        stuck.start()
        try:
            for line in proc.stdout:
                if line.strip() == "reference":
                    thread.reference_ready.set()
            code = proc.wait()
            if code:
                errors.seek(0)
                tail = errors.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
                thread.error = RuntimeError(f"the prewarm child exited with status {code}: {tail[0][:300]}")
        finally:
            stuck.cancel()
            thread.reference_ready.set()
            startup.reap(proc)
            errors.close()

    thread = _handle(follow, "evalsuite-prewarm-child")
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    """The child: compile every variant, saying when the reference's are ready."""
    ap = argparse.ArgumentParser(prog="python -m evalsuite.passes.prewarm")
    ap.add_argument("--source", required=True)
    ap.add_argument("--dtypes", default="")
    ap.add_argument("--device", type=int)
    ap.add_argument("--trust-remote-code", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda", args.device) if args.device is not None else torch.device("cuda")
    if not torch.cuda.is_available() or not kernels.available(device):
        return 0  # nothing to compile here: the run's warm_kernels compiles what it needs
    vocab = vocab_size(args.source, args.trust_remote_code)
    if not vocab:
        return 0  # nothing to compile here: the run's warm_kernels compiles what it needs
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",") if name]
    compile_all(vocab, device, dtypes, lambda: print("reference", flush=True))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
