"""What a run has finished, kept in `<out>/.state/` so a killed run resumes where it stopped.

A reference pass on a large checkpoint costs hours; a crash or a SIGKILL must not throw it away.
After each pass the runner saves that pass's per-token arrays (and, after the reference pass, the
reference's final hidden states for the segment and its FP32 head, or its float32 logits for a
model without the decoder/head split) here, each file written atomically. A rerun with the
same command and output directory finds them, checks the fingerprint (model files, corpus hash,
windowing, numeric settings), and runs only what is missing: the metrics come out identical to
an uninterrupted run because the stored values are the very ones that run would have used.
The directory is removed when the run completes. Disk cost while it exists: the reference's
hidden states, 4 bytes x width per token, and one copy of its head (logits: 4 bytes x vocabulary
per token, about 1 MB per token for a 262k vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from evalsuite.errors import UsageError
from evalsuite.store.results import atomic_write, atomic_write_text

STATE_DIR = ".state"


def model_signature(source: str) -> list:
    """Names, sizes and mtimes of a local checkpoint's files (a Hub id is its own signature)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return [source]
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in path.iterdir() if f.is_file())


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def pass_writer(arrays: dict[str, np.ndarray], meta: dict):
    """A writer for atomic_write: one pass's per-token arrays and its JSON metadata in one .npz
    (the format of the resume state and of the reference cache)."""
    # UTF-8 bytes: a 0-d unicode array is 4 bytes a character, and str() of it went through numpy's
    # array printing (1.8 s for a 7B reference's observer snapshots on an H200 host)
    payload = {**arrays, "__meta__": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    return lambda fh: np.savez(fh, **payload)


def read_pass(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of a file written through `pass_writer`."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
        raw = data["__meta__"]
        meta = json.loads(raw.item() if raw.dtype.kind == "U" else raw.tobytes().decode())  # (older files: a unicode array)
    return arrays, meta


class RunState:
    """Files in `<out>/.state`; `enabled=False` makes every method a no-op (nothing is kept)."""

    def __init__(self, out_dir: Path, fields: dict, enabled: bool = True, fresh: bool = False,
                 subdir: str | None = None):
        self.root = Path(out_dir) / STATE_DIR
        if subdir:  # one per data-parallel rank
            self.root = self.root / subdir
        self.enabled = enabled
        self.writer = None  # a logits_io.BackgroundWriter: saves run while the next pass computes
        self.head_queued = False  # save_head was called (its files may still be being written)
        self.key = fingerprint(fields)
        if not enabled:
            return
        meta = self.root / "fingerprint.json"
        if fresh and self.root.exists():
            shutil.rmtree(self.root)
        if meta.is_file():
            try:
                stored = json.loads(meta.read_text()).get("key")
            except ValueError:
                stored = None
            if stored != self.key:
                raise UsageError(
                    f"{out_dir} holds an unfinished run with other settings (model, corpus, dtypes or options "
                    "differ); rerun with the same options to resume it, or pass --fresh to discard it"
                )
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(meta, json.dumps({"key": self.key, "fields": fields}, indent=1, default=str))

    # --- the segment plan (fixed by the first run: a resume must cut the corpus the same way) ---
    def plan(self) -> dict | None:
        path = self.root / "plan.json"
        return json.loads(path.read_text()) if self.enabled and path.is_file() else None

    def save_plan(self, plan: dict) -> None:
        if self.enabled:
            atomic_write_text(self.root / "plan.json", json.dumps(plan))

    # --- per-pass per-token arrays ---
    def _arrays_path(self, segment: int, name: str) -> Path:
        return self.root / f"seg{segment}-{name}.npz"

    def has(self, segment: int, name: str) -> bool:
        return self.enabled and self._arrays_path(segment, name).is_file()

    def save(self, segment: int, name: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        if not self.enabled:
            return
        path = self._arrays_path(segment, name)
        self._submit(lambda: atomic_write(path, pass_writer(arrays, meta)))

    def _submit(self, write) -> None:
        if self.writer is None:
            write()
        else:
            self.writer.submit(write)

    def load(self, segment: int, name: str) -> tuple[dict[str, np.ndarray], dict]:
        return read_pass(self._arrays_path(segment, name))

    # --- the reference's kept tensors for one segment: "logits" (N, V) or "hidden" (N, H) float32 ---
    def _tensor_path(self, segment: int, kind: str) -> Path:
        return self.root / f"seg{segment}-reference-{kind}.npy"

    def save_tensor(self, segment: int, kind: str, tensor: torch.Tensor) -> None:
        if self.enabled:
            from evalsuite.store.logits import write_logits

            path = self._tensor_path(segment, kind)  # durable: the resume state guards against crashes
            self._submit(lambda: atomic_write(path, lambda fh: write_logits(fh, tensor)))

    def load_tensor(self, segment: int, kind: str, device: torch.device) -> torch.Tensor:
        from evalsuite.store.logits import read_logits

        return read_logits(self._tensor_path(segment, kind), device)

    # --- the reference's FP32 LM head, once: the test passes re-apply it to the hidden states ---
    def has_head(self) -> bool:
        """Whether the head is saved or queued (a second segment does not write it again)."""
        return self.enabled and (self.head_queued or (self.root / "reference-head.json").is_file())

    def save_head(self, weight: torch.Tensor, bias: torch.Tensor | None, meta: dict) -> None:
        """weight (V, H), bias (V,) or None, meta (vocab, softcap); the JSON last: it says the head is whole."""
        if self.enabled:
            from evalsuite.store.logits import write_logits

            def write():
                for name, t in (("weight", weight), ("bias", bias)):
                    if t is not None:
                        atomic_write(self.root / f"reference-head-{name}.npy",
                                     lambda fh, t=t: write_logits(fh, t.reshape(-1, t.shape[-1])))
                atomic_write_text(self.root / "reference-head.json", json.dumps({**meta, "bias": bias is not None}))

            self.head_queued = True
            self._submit(write)

    def load_head(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        from evalsuite.store.logits import read_logits

        meta = json.loads((self.root / "reference-head.json").read_text())
        weight = read_logits(self.root / "reference-head-weight.npy", device)
        bias = read_logits(self.root / "reference-head-bias.npy", device)[0] if meta["bias"] else None
        return weight, bias, meta

    def drop_logits_when_done(self, segment: int, names: list[str]) -> None:
        """A segment every dtype has finished needs its logits or hidden states no more (checked after the queued saves)."""
        if self.enabled:
            def drop():
                if all(self._arrays_path(segment, n).is_file() for n in names):
                    for kind in ("logits", "hidden"):
                        self._tensor_path(segment, kind).unlink(missing_ok=True)

            self._submit(drop)

    def finish(self, everything: bool = False) -> None:
        """Remove this run's state; `everything`: the whole .state (all data-parallel ranks')."""
        if self.enabled:
            root = self.root.parent if everything and self.root.name != STATE_DIR else self.root
            shutil.rmtree(root, ignore_errors=True)
