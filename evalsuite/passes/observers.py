"""What an observer is: a plain object told of every pass, with the model resident.

Observers are how a measurement that needs the loaded model (numerics hooks, lm-eval benchmark
questions) joins a run without the loop knowing about it. Every method is optional: the loop
calls only the ones an observer has, so this Protocol documents the contract and lets a type
checker hold observers to it; nothing inherits from it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from evalsuite.passes.scoring import PassContext


class Observer(Protocol):
    signature: object  # what the observer measures, JSON-able: part of the reference cache key
    part: str  # the part of a run it measures, as failures name it ("benchmarks")
    files: dict[str, str]  # after finish: file name in --out -> UTF-8 text to write there
    failures: list[str]  # after finish: one line per part that failed (the run exits non-zero)
    failure_traceback: str | None  # the first failure's traceback, shown under --debug

    def pass_started(self, ctx: PassContext) -> None:
        """A pass over one segment begins; `ctx.model` is loaded (attach hooks here)."""

    def batch_started(self, offset: int, ids: torch.Tensor) -> None:
        """A batch of windows (B, T+1) starting at flat token `offset` is about to run."""

    def pass_finished(self, ctx: PassContext) -> None:
        """The pass is over, the model still resident (remove hooks; score benchmark questions)."""

    def snapshot(self, ctx: PassContext) -> object:
        """JSON-able findings of this pass, saved with it (resume, the reference cache, other ranks)."""

    def restore(self, ctx: PassContext, snapshot: object) -> None:
        """Take back a snapshot of a pass that was not run again (`ctx.model` is None)."""

    def finish(self, metrics_by_dtype: dict[str, dict]) -> tuple[dict[str, dict], dict]:
        """After every pass: (metric additions by precision name, result sections by name)."""
