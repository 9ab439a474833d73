"""Warm the test dtypes' attention kernels with the reference pass's own calls, outside the test passes.

Why (model/attention_warm.py has the mechanism): cuDNN builds a 2-byte attention kernel per exact
call at its first use, 0.5-1.0 s per dtype in a machine's first processes on an H200, and it did
that inside the first batch of each timed test pass. Its graphs are cached per thread, so the
warm-up must run in the thread that runs the passes; a replay from the prewarm thread left the
cost in the pass (perf/jit_probe.py).

When: the reference pass records its calls; at its second batch, with the first batch's FP32 work
still queued on the GPU, the recorded calls are replayed in each 2-byte test dtype, so the
build runs while the GPU is busy anyway. A test pass starting replays whatever was recorded
after that (a last, shorter batch; a batch size halved on out-of-memory), before its clock starts.
The seconds go to the `compile` phase (nested in `reference_pass` for the replay at its second
batch) and, per dtype, to provenance `attention_warm`. Only on CUDA; a cached reference runs no
pass to record from, and then nothing is replayed.
"""

from __future__ import annotations

import contextlib
import time

import torch

from evalsuite.model.attention_warm import Call, recording, replay, warmed


class AttentionWarm:
    """Told of passes like an observer (passes/observers.py) but measures nothing: the Loop hands
    it to the passes it times, never to the cache key, snapshots or results."""

    part = "compile"  # scoring.notify's phase for its time

    def __init__(self, device: torch.device, dtypes):
        self.on = device.type == "cuda"
        self.device = device
        self.dtypes = warmed(dtypes)
        self.calls: dict[Call, None] = {}
        self.done: set[tuple[Call, torch.dtype]] = set()
        self.seconds: dict[str, float] = {}  # str(dtype) -> replay seconds
        self._batches = 0
        self._recording = False

    @contextlib.contextmanager
    def recording(self):
        """Around the reference pass: its attention calls are recorded (model/attention_warm.recording)."""
        if not (self.on and self.dtypes):
            yield
            return
        self._batches, self._recording = 0, True
        try:
            with recording(self.calls):
                yield
        finally:
            self._recording = False

    def batch_started(self, offset: int, ids: torch.Tensor) -> None:
        self._batches += self._recording
        if self._recording and self._batches == 2:  # the first batch's calls are known, its work queued
            for dtype in self.dtypes:
                self._replay(dtype)

    def pass_started(self, ctx) -> None:
        if ctx.role == "test" and self.on:
            self._replay(ctx.precision.dtype)

    def _replay(self, dtype: torch.dtype) -> None:
        todo = [c for c in self.calls if (c, dtype) not in self.done]
        if not todo or dtype not in self.dtypes:
            return
        t0 = time.perf_counter()
        replay(todo, [dtype], self.device)  # (inside the reference pass: recorded again, same keys)
        self.done.update((c, dtype) for c in todo)
        key = str(dtype).removeprefix("torch.")
        self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - t0, 4)

    def provenance(self) -> dict | None:
        """What results.json records: calls recorded and seconds replaying them, per dtype."""
        if not self.seconds:
            return None
        return {"recorded_calls": len(self.calls), "replay_s": dict(self.seconds)}
