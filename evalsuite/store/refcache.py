"""The reference cache: pay for the FP32 reference pass once per checkpoint, tokens and settings.

The reference is the most expensive pass by far (FP32 matmuls with TF32 off run at a fraction of
the BF16 rate: ~8x a BF16 pass on a 7B model), and CI gates re-run against the same base
checkpoint again and again. So a finished reference pass (its per-token results, the noise floor,
the observers' findings and, segment by segment, its final hidden states (N, H) plus one copy of
its FP32 head, from which the test passes re-apply its logits bit for bit; its float32 logits
(N, V) for a model without the decoder/head split) is kept in `<cache>/<key>/` and a later run
with the same key reads it instead of loading the reference model.

The key is a hash of everything that changes a reference number: the checkpoint's *content*
(sha256 of its files; memoised by size and mtime so a 26 GB checkpoint is hashed once), the exact
token windows that are scored (hash of the token ids, so the corpus, tokenizer, --seq-len and
--max-tokens are all in it), the reference dtype, batch size, noise-floor size, attention
implementation, the observers' settings, and the software and device (evalsuite's version and a
digest of its source files, torch, transformers, GPU name; the numeric flags are fixed by the torch version and `exact_fp32`).
A different key is a different directory: nothing stale can be read. What the test dtypes are
is *not* in the key, so adding a dtype reuses the reference.

Verified on load: each segment's manifest records the sizes and a digest of its files (sha256 of
the small per-token file; per-row integer sums of the float32 bit patterns, computed on the device
where they sit, for the hidden states or logits), and head.json the same digest of the head. A file that fails the check is reported in one
line, the entry is dropped and the reference recomputed. Entries are evicted least recently used
first beyond `--reference-cache-gib`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from evalsuite.store.digests import code_digest, logits_digest
from evalsuite.store.filehash import sha256_file
from evalsuite.store.logits import BackgroundWriter, read_logits, write_logits
from evalsuite.store.results import atomic_write, atomic_write_text
from evalsuite.store.state import pass_writer, read_pass

FORMAT = 2  # 2: hidden states (N, H) and the FP32 head instead of logits (N, V) for split models


# --- the cache ---------------------------------------------------------------------------------

class ReferenceCache:
    """One cache entry, `<root>/<key[:24]>/`: the same methods as RunState for the reference."""

    def __init__(self, root: Path, fields: dict, cap_gib: float, writer: BackgroundWriter):
        self.root = Path(root)
        self.fields = fields
        self.key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
        self.dir = self.root / self.key[:24]
        self.cap_bytes = cap_gib * 2**30
        self.writer = writer
        self.hit_segments: set[int] = set()
        self.problem: str | None = None  # why an entry was dropped, for the one-line message
        self._pending: dict[int, dict] = {}  # segment -> tensor manifest, until its arrays are written
        self.head_queued = False  # save_head was called (its files may still be being written)
        self.reopen()

    def reopen(self) -> None:
        meta = self.dir / "entry.json"
        if meta.is_file():
            try:
                stored = json.loads(meta.read_text())
            except ValueError:
                stored = {}
            if stored.get("key") != self.key or stored.get("format") != FORMAT:
                self.drop("its entry.json does not match the key")
        if not meta.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(meta, json.dumps({"format": FORMAT, "key": self.key, "fields": self.fields},
                                               indent=1, default=str))
        os.utime(meta)  # least recently used = oldest entry.json mtime

    def drop(self, why: str) -> None:
        self.problem = f"reference cache entry {self.dir} was discarded: {why}"
        self.head_queued = False
        shutil.rmtree(self.dir, ignore_errors=True)

    # the segment plan
    def plan(self) -> dict | None:
        path = self.dir / "plan.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_plan(self, plan: dict) -> None:
        atomic_write_text(self.dir / "plan.json", json.dumps(plan))

    # per-token results and observers' findings of the reference, per segment
    def _seg(self, segment: int) -> Path:
        return self.dir / f"seg{segment}.json"

    def has(self, segment: int, name: str = "reference") -> bool:
        return self._seg(segment).is_file()

    def save(self, segment: int, name: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Queued behind this segment's logits: the manifest appears only when both are on disk."""
        write_arrays = pass_writer(arrays, meta)

        def write():
            path = self.dir / f"seg{segment}-reference.npz"
            atomic_write(path, write_arrays, durable=False)
            manifest = {"arrays_sha256": sha256_file(path), "arrays_bytes": path.stat().st_size,
                        **self._pending.pop(segment, {})}
            atomic_write_text(self._seg(segment), json.dumps(manifest))
            self._evict()

        self.writer.submit(write)

    def _manifest(self, segment: int) -> dict:
        try:
            manifest = json.loads(self._seg(segment).read_text())
        except (OSError, ValueError) as exc:
            raise CacheCorrupt(f"its manifest {self._seg(segment).name} cannot be read ({exc})") from exc
        if not isinstance(manifest, dict):
            raise CacheCorrupt(f"its manifest {self._seg(segment).name} is not a JSON object")
        return manifest

    def load(self, segment: int, name: str = "reference") -> tuple[dict[str, np.ndarray], dict]:
        manifest = self._manifest(segment)
        path = self.dir / f"seg{segment}-reference.npz"
        if not path.is_file() or sha256_file(path) != manifest.get("arrays_sha256"):
            raise CacheCorrupt(f"{path.name} is missing or does not match its manifest")
        arrays, meta = read_pass(path)
        self.hit_segments.add(segment)
        return arrays, meta

    # the reference's kept tensors: "hidden" (N, H) states (split models) or "logits" (N, V), float32
    def save_tensor(self, segment: int, kind: str, tensor: torch.Tensor) -> None:
        digest = logits_digest(tensor)  # on the device, before the tensor is shared with anything
        self._pending[segment] = {f"{kind}_digest": digest, f"{kind}_shape": list(tensor.shape)}

        def write():
            atomic_write(self.dir / f"seg{segment}-{kind}.npy", lambda fh: write_logits(fh, tensor), durable=False)

        self.writer.submit(write)

    def load_tensor(self, segment: int, kind: str, device: torch.device) -> torch.Tensor:
        manifest = self._manifest(segment)
        return _verified(self.dir / f"seg{segment}-{kind}.npy", device, manifest.get(f"{kind}_shape"),
                         manifest.get(f"{kind}_digest"))

    # the reference's FP32 LM head (V, H), once per entry: what the test passes re-apply
    def has_head(self) -> bool:
        """Whether the head is saved or queued (a second segment does not write it again)."""
        return self.head_queued or (self.dir / "head.json").is_file()

    def save_head(self, weight: torch.Tensor, bias: torch.Tensor | None, meta: dict) -> None:
        """Kept in the entry, not re-read from the checkpoint: a hit loads no reference model, and the
        head's exact FP32 values are those the reference pass used (whatever the loader does)."""
        parts = {"weight": weight, **({"bias": bias.reshape(1, -1)} if bias is not None else {})}
        manifest = {**meta, **{f"{k}_digest": logits_digest(t) for k, t in parts.items()},
                    **{f"{k}_shape": list(t.shape) for k, t in parts.items()}}

        def write():
            for k, t in parts.items():
                atomic_write(self.dir / f"head-{k}.npy", lambda fh, t=t: write_logits(fh, t), durable=False)
            atomic_write_text(self.dir / "head.json", json.dumps(manifest))  # last: the head is whole

        self.head_queued = True
        self.writer.submit(write)

    def load_head(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        try:
            meta = json.loads((self.dir / "head.json").read_text())
        except (OSError, ValueError) as exc:
            raise CacheCorrupt(f"its head.json cannot be read ({exc})") from exc
        weight = _verified(self.dir / "head-weight.npy", device, meta.get("weight_shape"), meta.get("weight_digest"))
        bias = None
        if "bias_digest" in meta:
            bias = _verified(self.dir / "head-bias.npy", device, meta.get("bias_shape"), meta.get("bias_digest"))[0]
        return weight, bias, meta

    def _evict(self) -> None:
        entries = []
        for d in self.root.iterdir():
            meta = d / "entry.json"
            if d.is_dir() and meta.is_file():
                size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
                entries.append((meta.stat().st_mtime, size, d))
        total = sum(s for _, s, _ in entries)
        for _, size, d in sorted(entries):
            if total <= self.cap_bytes:
                break
            if d != self.dir:
                shutil.rmtree(d, ignore_errors=True)
                total -= size


def _verified(path: Path, device: torch.device, shape, digest) -> torch.Tensor:
    """A float32 matrix file read onto `device`, checked against its manifest's shape and digest."""
    try:
        tensor = read_logits(path, device)
    except (OSError, ValueError) as exc:
        raise CacheCorrupt(f"{path.name} cannot be read ({exc})") from exc
    if list(tensor.shape) != shape:
        raise CacheCorrupt(f"{path.name} has shape {list(tensor.shape)}, its manifest says {shape}")
    if logits_digest(tensor) != digest:
        raise CacheCorrupt(f"{path.name} does not match the digest in its manifest")
    return tensor


class CacheCorrupt(Exception):
    """A cache file failed verification; the runner drops the entry and recomputes."""


def cache_fields(base: dict, device: torch.device) -> dict:
    """The software and device half of the key (the run supplies the data half)."""
    import transformers

    import evalsuite

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {**base, "format": FORMAT, "evalsuite": evalsuite.__version__, "evalsuite_code": code_digest(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": name}
