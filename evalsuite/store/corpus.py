"""Evaluation text -> token windows in which every corpus token is predicted exactly once.

Window rule (documented in README "How tokens are scored"):
- The corpus is one token stream: each document (line, JSONL record, dataset row) is tokenized
  without special tokens, with a trailing newline, and the documents are concatenated.
- The stream is cut into consecutive, non-overlapping windows of `seq_len` scored tokens; the
  last window may be shorter (it is run on its own, so no padding is ever needed).
- If the tokenizer has a BOS token, every window is fed as [BOS, t_1..t_L] and all L tokens
  are scored: the first token of a window is predicted from BOS alone. If it has none, each
  window is fed with the token just before it as its only context ([t_0, t_1..t_L]); the very
  first token of the stream is then the one token that is never scored.
- Bits per byte divide the summed NLL (in bits) by the UTF-8 bytes of the text the scored
  tokens cover (from the tokenizer's offsets), so tokenizers with different vocabularies compare.

This is `--windowing stream`, the default. `--windowing lm-eval` (rolling.py) scores each document
on its own as lm-eval's `loglikelihood_rolling` does; the window type both make is windows.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from evalsuite.errors import CorpusError, MissingExtraError
from evalsuite.store.windows import TokenWindows

__all__ = ["BUNDLED_CORPUS", "CorpusSpec", "TokenWindows", "load_texts", "tokenize"]

BUNDLED_CORPUS = "bundled:zh"


@dataclass(frozen=True)
class CorpusSpec:
    """Where the evaluation text comes from. `source` is "bundled:zh", a file path, or "hf:NAME"."""

    source: str = BUNDLED_CORPUS
    column: str = "text"  # JSONL/parquet/dataset column holding the text
    hf_config: str | None = None
    hf_split: str = "test"


def load_texts(spec: CorpusSpec) -> tuple[list[str], dict[str, object]]:
    """Read documents; return them with the corpus identity (source and content hash)."""
    if spec.source == BUNDLED_CORPUS:
        raw = resources.files("evalsuite").joinpath("data/zh_corpus.txt").read_bytes()
        texts = _decode_lines(raw, "the bundled corpus")
    elif spec.source.startswith("hf:"):
        texts = _load_hf(spec)
    else:
        texts = _load_file(Path(spec.source), spec.column)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CorpusError(f"corpus {spec.source} holds no text; give a file with at least one non-empty line")
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    identity = {
        "source": spec.source,
        "column": spec.column if not spec.source.startswith("bundled:") else None,
        "sha256": digest,
        "n_documents": len(texts),
        "n_chars": sum(len(t) for t in texts),
        "n_bytes": sum(len(t.encode("utf-8")) for t in texts),
    }
    return texts, identity


def _decode_lines(raw: bytes, what: str) -> list[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{what} is not UTF-8 (byte {exc.start}); convert it, e.g. `iconv -f GB18030 -t UTF-8`") from exc
    return text.lstrip("\ufeff").splitlines()


def _load_file(path: Path, column: str) -> list[str]:
    if not path.is_file():
        raise CorpusError(f"corpus file {path} does not exist; pass a .txt, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise MissingExtraError("reading .parquet needs pyarrow: pip install 'evalsuite[data]'") from exc
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several unrelated types for bad files
            raise CorpusError(f"corpus file {path} is not a readable parquet file ({exc})") from exc
        if column not in table.column_names:
            raise CorpusError(f"{path} has no column {column!r} (columns: {', '.join(table.column_names)}); use --corpus-column")
        return [str(v) for v in table.column(column).to_pylist() if v is not None]
    lines = _decode_lines(path.read_bytes(), f"corpus file {path}")
    if suffix in (".jsonl", ".ndjson"):
        texts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or column not in record:
                raise CorpusError(f"{path}:{number} has no field {column!r}; use --corpus-column")
            texts.append(str(record[column]))
        return texts
    return lines


def _load_hf(spec: CorpusSpec) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise MissingExtraError("Hugging Face datasets need `datasets`: pip install 'evalsuite[data]'") from exc
    name = spec.source[3:]
    try:
        ds = datasets.load_dataset(name, spec.hf_config, split=spec.hf_split)
    except Exception as exc:  # datasets raises many types (network, missing config, bad split)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorpusError(f"could not load dataset {name!r} (config {spec.hf_config}, split {spec.hf_split}): {first}") from exc
    if spec.column not in ds.column_names:
        raise CorpusError(f"dataset {name} has no column {spec.column!r} (columns: {', '.join(ds.column_names)}); use --corpus-column")
    return [str(v) for v in ds[spec.column] if v is not None]


def tokenize(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> TokenWindows:
    """Tokenize once per run and cut into windows (see the module docstring for the rules).

    Documents are encoded in blocks until `max_tokens` are there: a 2,048-token run on a 2 M-character
    corpus does not tokenize all of it (each document is encoded on its own, so the tokens are the
    same either way). After the first block, each block is sized from the tokens per document seen
    so far (10 % over), not doubled, so little is tokenized beyond what the run needs.
    """
    docs = [t + "\n" for t in texts]
    need = None if max_tokens is None else max_tokens + 1
    ids_parts, bytes_parts = [], []
    total, i, block = 0, 0, 64
    while i < len(docs) and (need is None or total < need):
        part = docs[i : i + block]
        ids, offsets = _encode(tokenizer, part)
        kept = [np.asarray(x, dtype=np.int64) for x in ids if len(x)]
        ids_parts += kept
        total += sum(len(x) for x in kept)
        if offsets is not None:
            bytes_parts.append(_bytes_from_offsets(part, ids, offsets))
        else:  # slow tokenizers have no offsets: decode each token (close, not exact)
            bytes_parts += [np.array([len(tokenizer.decode([t]).encode("utf-8")) for t in x], dtype=np.int64)
                            for x in kept]
        i += len(part)
        per_doc = total / i
        block = len(docs) if need is None or per_doc == 0 else max(64, int((need - total) / per_doc * 1.1) + 1)
    if not ids_parts:
        raise CorpusError("the corpus tokenized to zero tokens; check the tokenizer and the text")
    stream = np.concatenate(ids_parts)
    stream_bytes = np.concatenate(bytes_parts)

    bos = tokenizer.bos_token_id
    context = "bos" if bos is not None else "previous-token"
    first = 0 if bos is not None else 1  # without BOS the first token has no context
    limit = len(stream) if max_tokens is None else min(len(stream), first + max_tokens)
    if limit - first < 1:
        raise CorpusError("the corpus is too short: it gives no token to score; give more text")
    windows = []
    for start in range(first, limit, seq_len):
        stop = min(start + seq_len, limit)
        prefix = np.array([bos], dtype=np.int64) if bos is not None else stream[start - 1 : start]
        windows.append(np.concatenate([prefix, stream[start:stop]]))
    return TokenWindows(windows=windows, target_bytes=stream_bytes[first:limit], context=context, seq_len=seq_len)


def _encode(tokenizer, docs: list[str]) -> tuple[list, list | None]:
    """(token ids per doc, (start, end) character offsets per doc or None for a slow tokenizer).

    A fast tokenizer whose backend has no truncation, padding or special-token splitting set is
    called directly: what `tokenizer(docs, add_special_tokens=False)` does, without building a
    Python dict per document (a third of the time on a 262k-token corpus)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        encodings = backend.encode_batch(docs, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    enc = tokenizer(docs, add_special_tokens=False, return_offsets_mapping=bool(tokenizer.is_fast))
    return enc["input_ids"], (enc["offset_mapping"] if tokenizer.is_fast else None)


def _bytes_from_offsets(docs: list[str], ids: list, offsets: list) -> np.ndarray:
    """UTF-8 bytes per token of the docs that have tokens, in order: each token covers the text from
    the previous token's end (its doc's start, for a doc's first token) to its own end; a doc's
    last token also takes the doc's tail. Computed over the whole block at once."""
    text = "".join(docs)
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    char_bytes = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    byte_at = np.concatenate([[0], np.cumsum(char_bytes, dtype=np.int64)])  # (n_chars + 1,)
    doc_start = np.concatenate([[0], np.cumsum([len(d) for d in docs])])  # (n_docs + 1,) in characters
    counts = np.array([len(x) for x in ids], dtype=np.int64)  # (n_docs,) tokens per doc
    has = counts > 0
    if not has.any():
        return np.zeros(0, dtype=np.int64)
    ends = np.fromiter((end for doc in offsets for _, end in doc), dtype=np.int64, count=int(counts.sum()))
    ends += np.repeat(doc_start[:-1], counts)  # doc-relative -> block character positions
    last = np.cumsum(counts)[has] - 1  # index of each doc's last token
    first = last - counts[has] + 1
    ends = np.maximum.accumulate(ends)  # docs occupy increasing ranges: as per doc
    ends[last] = doc_start[1:][has]
    starts = np.empty_like(ends)
    starts[1:] = ends[:-1]
    starts[first] = doc_start[:-1][has]
    return byte_at[ends] - byte_at[starts]
