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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from evalsuite.store.logits import BackgroundWriter, read_logits, write_logits
from evalsuite.store.results import atomic_write, atomic_write_text
from evalsuite.store.state import pass_writer, read_pass

FORMAT = 2  # 2: hidden states (N, H) and the FP32 head instead of logits (N, V) for split models
_SKIP_SUFFIXES = (".md", ".lock")
_ROWS_PER_DIGEST_CHUNK = 256


# --- content hashes ----------------------------------------------------------------------------

_PIECE = 256 * 2**20
_READ = 16 * 2**20
# Threads that hash a checkpoint in the background (runner._digest_meanwhile) while the main thread
# imports and loads the tokenizer. All cores made that main thread's start-up slower than the hash
# itself: in a cProfile of a cold 7B run on an H200 host (perf/profile_cold.sh) its 47k stat()
# calls took 5.9 s against the plain script's 0.8 s, each waiting for the GIL behind 16 hashing
# threads. Four keep a 13 GB shard's hash shorter than the start-up it hides behind.
BACKGROUND_WORKERS = 4


def _sha256_piece(path: Path, offset: int) -> bytes:
    h = hashlib.sha256()
    buf = memoryview(bytearray(min(_READ, _PIECE)))  # one buffer a piece: no 16 MB allocation per read
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        left = _PIECE
        while left and (n := fh.readinto(buf[: min(len(buf), left)])):
            h.update(buf[:n])  # releases the GIL: pieces hash in parallel threads
            left -= n
    return h.digest()


def _sha256_file(path: Path, workers: int | None = None) -> str:
    """sha256 of the sha256s of the file's 256 MB pieces, hashed in parallel (`workers` threads, default all cores).

    One sha256 stream runs at ~1 GB/s: 12 s for a 7B checkpoint's single 13 GB shard (measured
    on the benchmark machine). Pieces on all cores make it I/O-bound; any changed byte still
    changes the digest.
    """
    size = path.stat().st_size
    offsets = range(0, max(size, 1), _PIECE)
    with ThreadPoolExecutor(max_workers=min(workers or 16, os.cpu_count() or 1)) as pool:
        pieces = list(pool.map(lambda o: _sha256_piece(path, o), offsets))
    return hashlib.sha256(b"".join(pieces) + str(size).encode()).hexdigest()


def checkpoint_files(source: str) -> Path | None:
    """The local directory of a checkpoint: the path itself, or a Hub id's cached snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=source, local_files_only=True))
    except Exception:  # not cached locally (or not a Hub id): no content hash, no cache
        return None


def checkpoint_digest(source: str, memo_file: Path | None = None, workers: int | None = None) -> str | None:
    """sha256 over the checkpoint's files (names and contents); None if they cannot be found.

    Per-file hashes are memoised in `memo_file` by (path, size, mtime_ns): an unchanged file is
    not read again, a rewritten one is.
    """
    root = checkpoint_files(source)
    if root is None:
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and not p.name.endswith(_SKIP_SUFFIXES))
    memo: dict = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except ValueError:
            memo = {}
    todo, digests = [], {}
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        known = memo.get(key)
        if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            digests[f] = known[2]
        else:
            todo.append((f, key, st))
    for f, key, st in todo:  # each file's pieces in parallel
        digests[f] = _sha256_file(f, workers)
        memo[key] = [st.st_size, st.st_mtime_ns, digests[f]]
    if todo and memo_file is not None:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo_file, json.dumps(memo))
        except OSError:
            pass  # the memo is an optimisation only
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{digests[f]}\n".encode())
    return h.hexdigest()


def tokens_digest(windows: list[np.ndarray]) -> str:
    """sha256 of the scored windows: token ids, window boundaries and (lm-eval windowing, windows.py)
    the unscored leading targets of each window; a plain list's digest is what it always was."""
    h = hashlib.sha256()
    for w in windows:
        h.update(np.int64(len(w)).tobytes())
        h.update(np.ascontiguousarray(w, dtype=np.int64).tobytes())
    unscored = getattr(windows, "unscored", None)
    if unscored is not None:
        h.update(b"unscored\0" + np.ascontiguousarray(unscored, dtype=np.int64).tobytes())
    return h.hexdigest()


def logits_digest(buffer: torch.Tensor) -> str:
    """Order-sensitive digest of a float32 (N, V) tensor, computed where it lives (no host copy).

    Per-row sums of the int32 bit patterns (exact integer arithmetic: the same on any device),
    then sha256 of those N sums on the host.
    """
    bits = buffer.view(torch.int32)  # (N, V)
    sums = torch.cat([chunk.sum(dim=1, dtype=torch.int64) for chunk in bits.split(_ROWS_PER_DIGEST_CHUNK)])
    return hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest()


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
            manifest = {"arrays_sha256": _sha256_file(path), "arrays_bytes": path.stat().st_size,
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
        if not path.is_file() or _sha256_file(path) != manifest.get("arrays_sha256"):
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


def code_digest() -> str:
    """sha256 of evalsuite's own source files: a changed computation (an edited checkout, a
    development install) is another key, even where the version string stayed the same."""
    root = Path(__file__).resolve().parents[1]  # the evalsuite package
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
