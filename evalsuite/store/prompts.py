"""Prompts for the generation step: a user's file, corpus prefixes, benchmark question contexts.

Every prompt is token ids fed as the corpus windows are (README, "How tokens are scored"): the
tokenizer's BOS first when it has one, then the text without special tokens. The choices are
deterministic: the same corpus, count and --seed give the same prompts.

- A file (`--gen-prompts`): `.txt`, one prompt per non-empty line; `.jsonl`, the `--gen-column`
  field of each record. Taken in order, at most --gen-count of them.
- Corpus prefixes: `count` documents evenly spaced over the corpus (the first at a seeded offset
  inside the first gap), each giving its first `prefix` tokens. A corpus with fewer documents
  than prompts gives m = ceil(count / documents) prompts per document, starting at 0, L/m,
  2L/m, ... of its L tokens, and `count` of those are taken, evenly spaced the same way.
- Benchmark contexts (passes/generate.py picks the questions): the full prompt lm-eval scores,
  description and few-shot examples included, ending where the answer letter would follow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evalsuite.errors import UsageError


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # what the model is fed, BOS included
    text: str  # the prompt as text (for a corpus prefix: its tokens decoded)
    source: str  # "file", "corpus" or "benchmark"
    origin: str  # where it came from: "line 3", "document 5 token 0", "zh_mc_math #12"
    choices: tuple[str, ...] = ()  # benchmark prompts: the answer letters an answer is read from
    gold: int = -1  # benchmark prompts: index of the right choice


def _bos(tokenizer) -> list[int]:
    return [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []


def encode(text: str, tokenizer) -> list[int]:
    return _bos(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def evenly_spaced(n: int, count: int, seed: int) -> list[int]:
    """`min(n, count)` indices into range(n), evenly spaced, the first at a seeded offset in the first gap."""
    count = min(n, count)
    if count <= 0:
        return []
    step = n / count
    offset = np.random.default_rng(seed).uniform(0, step)
    return [min(n - 1, int(offset + i * step)) for i in range(count)]


def read_texts(path: Path, column: str) -> list[tuple[str, str]]:
    """(text, origin) of every prompt in a --gen-prompts file; a bad file is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--gen-prompts {path} does not exist; give a .txt (one prompt per line) or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").lstrip("\ufeff").splitlines()
    except UnicodeDecodeError as exc:
        raise UsageError(f"--gen-prompts {path} is not UTF-8 (byte {exc.start}); convert it") from exc
    out = []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            out.append((line, f"line {number}"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--gen-prompts {path}:{number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            raise UsageError(f"--gen-prompts {path}:{number} has no text field {column!r}; use --gen-column")
        if record[column].strip():
            out.append((record[column], f"line {number}"))
    if not out:
        raise UsageError(f"--gen-prompts {path} holds no prompt; give at least one non-empty line")
    return out


def file_prompts(path: Path, column: str, tokenizer, count: int) -> list[Prompt]:
    return [Prompt(tuple(encode(text, tokenizer)), text, "file", origin)
            for text, origin in read_texts(path, column)[:count]]


def corpus_prompts(texts: list[str], tokenizer, count: int, seed: int, prefix: int) -> list[Prompt]:
    """`count` prompts of `prefix` tokens from evenly spaced documents (see the module docstring)."""
    per_doc = max(1, math.ceil(count / len(texts))) if texts else 1
    if per_doc == 1:  # tokenize only the documents chosen
        candidates = [(d, 0) for d in evenly_spaced(len(texts), count, seed)]
        chosen = range(len(candidates))
    else:
        candidates = [(d, j) for d in range(len(texts)) for j in range(per_doc)]
        chosen = evenly_spaced(len(candidates), count, seed)
    bos, out, cache = _bos(tokenizer), [], {}
    for c in chosen:
        d, j = candidates[c]
        if d not in cache:
            cache[d] = list(tokenizer(texts[d], add_special_tokens=False)["input_ids"])
        ids = cache[d]
        start = j * len(ids) // per_doc if per_doc > 1 else 0
        piece = ids[start : start + prefix]
        if piece:
            out.append(Prompt(tuple(bos + piece), tokenizer.decode(piece), "corpus", f"document {d} token {start}"))
    return out


def benchmark_prompts(questions, contexts: list[str], tokenizer, count: int, seed: int) -> list[Prompt]:
    """Prompts from `count` evenly spaced questions (bench.tasks.Question) and their lm-eval contexts."""
    out = []
    for i in evenly_spaced(len(questions), count, seed):
        q = questions[i]
        out.append(Prompt(tuple(encode(contexts[i], tokenizer)), contexts[i], "benchmark", f"{q.subject} #{q.doc_id}",
                          tuple(q.choices), q.gold))
    return out
