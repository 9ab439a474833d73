"""`--windowing lm-eval`: each document scored on its own, as lm-eval's `loglikelihood_rolling` does.

Why: evalsuite's default stream windowing (corpus.py) concatenates the documents, so its
perplexity and bits per byte differ from lm-eval's per-document figures of the same model
(Gemma 3 270M: 1.696 vs 2.070 bits/byte). This windowing reproduces lm-eval 0.4's HFLM
(`lm_eval/models/huggingface.py`, `lm_eval/utils.py`) token for token:

- Tokens: `tok_encode(document)`, i.e. `tokenizer.encode(document)` with the tokenizer's own
  special tokens (a tokenizer that adds BOS puts it in the token list, where it is *scored*),
  except that a document starting with the prefix token's text is encoded without them.
- The prefix token: BOS, else EOS (HFLM.prefix_token_id); a tokenizer with neither is refused.
- Windows of `max_length` = `seq_len` (get_rolling_token_windows with context_len=1, then
  make_disjoint_window): the first is [prefix, t_0 .. t_{L-2}] predicting t_0 .. t_{L-1}; each
  later one is the L tokens before its last target, predicting the next min(L, left) tokens.
  The last window of a long document thus has L inputs but scores only its last k targets:
  its first L - k targets are unscored (windows.WindowList).
- A document's log-likelihood is the sum over its scored tokens; bits per byte divide by the
  UTF-8 bytes of the document strings (lm-eval's count_bytes), word perplexity by its
  count_words, len(re.split(r"\\s+", document)).
- --max-tokens: whole documents in order; the first one that would pass the cap is cut to it
  (its token list's prefix, windowed the same way).
"""

from __future__ import annotations

import re

import numpy as np

from evalsuite.errors import CorpusError
from evalsuite.store.corpus import _bytes_from_offsets
from evalsuite.store.windows import LM_EVAL, TokenWindows, WindowList

BLOCK = 64  # documents per tokenizer call


def prefix_token(tokenizer) -> tuple[int, str]:
    """(id, "bos" or "eos"): HFLM.prefix_token_id, the token each document's first window starts from."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id), "bos"
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id), "eos"
    raise CorpusError("--windowing lm-eval needs a tokenizer with a BOS or EOS token (lm-eval's prefix token); "
                      "this one has neither: use --windowing stream")


def rolling_windows(tokens: np.ndarray, prefix: int, seq_len: int) -> tuple[list[np.ndarray], list[int]]:
    """One document's windows (each (T + 1,) int64) and unscored leading targets per window.

    lm-eval's window (context, continuation) is fed (context + continuation)[-(L+1):][:-1] and
    scores the continuation; as one array that is (context + continuation)[-(L+1):], whose
    targets before the continuation are unscored.
    """
    n, L = len(tokens), seq_len
    if n == 0:
        return [], []
    first = min(L, n)
    windows = [np.concatenate([np.array([prefix], dtype=np.int64), tokens[:first]])]  # (first + 1,)
    unscored, predicted = [0], first
    while predicted < n:
        k = min(n - predicted, L)  # targets this window scores
        end = predicted + k
        windows.append(tokens[end - L - 1 : end])  # (L + 1,): L inputs, the last k targets scored
        unscored.append(L - k)
        predicted = end
    return windows, unscored


def _encode_block(tokenizer, docs: list[str], prefix_text: str) -> tuple[list, list]:
    """(ids, per-token UTF-8 bytes) per document, encoded as HFLM.tok_encode does."""
    plain = [not d.startswith(prefix_text) for d in docs]  # lm-eval's has_bos_prefix ("" prefixes every document)
    ids: list = [None] * len(docs)
    nbytes: list = [None] * len(docs)
    for special in (True, False):
        which = [i for i, p in enumerate(docs) if plain[i] == special]
        if not which:
            continue
        part = [docs[i] for i in which]
        kwargs = {} if special else {"add_special_tokens": False}  # {}: the tokenizer's own default
        if tokenizer.is_fast:
            enc = tokenizer(part, return_offsets_mapping=True, **kwargs)
            got, counts = enc["input_ids"], _bytes_from_offsets(part, enc["input_ids"], enc["offset_mapping"])
            splits = np.cumsum([len(x) for x in got])[:-1]
            per_doc = np.split(counts, splits) if len(got) > 1 else [counts]
        else:
            got = [tokenizer.encode(d, **kwargs) for d in part]
            per_doc = [_decoded_bytes(tokenizer, x, d) for x, d in zip(got, part, strict=True)]
        for i, x, b in zip(which, got, per_doc, strict=True):
            ids[i], nbytes[i] = np.asarray(x, dtype=np.int64), np.asarray(b, dtype=np.int64)
    return ids, nbytes


def _decoded_bytes(tokenizer, ids: list[int], doc: str) -> np.ndarray:
    """A slow tokenizer has no offsets: each token's decoded bytes, the remainder on the last token so
    the document's sum is its UTF-8 length (what bits per byte needs exactly)."""
    out = np.array([len(tokenizer.decode([t]).encode("utf-8")) for t in ids], dtype=np.int64)
    if len(out):
        out[-1] += len(doc.encode("utf-8")) - int(out.sum())
    return out


def tokenize(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> TokenWindows:
    """lm-eval's windows of each document (see the module docstring), documents in corpus order."""
    prefix, context = prefix_token(tokenizer)
    prefix_text = tokenizer.decode(prefix)
    windows, unscored, nbytes, documents, n_words = [], [], [], [], 0
    total = 0
    for start in range(0, len(texts), BLOCK):
        block = texts[start : start + BLOCK]
        for j, (ids, b) in enumerate(zip(*_encode_block(tokenizer, block, prefix_text), strict=True)):
            if max_tokens is not None and total + len(ids) > max_tokens:
                ids, b = ids[: max_tokens - total], b[: max_tokens - total]
            w, u = rolling_windows(ids, prefix, seq_len)
            windows += w
            unscored += u
            nbytes.append(b)
            documents.append(np.full(len(ids), start + j, dtype=np.int64))
            n_words += len(re.split(r"\s+", block[j])) if len(ids) else 0
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if total == 0:
        raise CorpusError("the corpus tokenized to zero tokens; check the tokenizer and the text")
    return TokenWindows(windows=WindowList(windows, unscored), target_bytes=np.concatenate(nbytes), context=context,
                        seq_len=seq_len, windowing=LM_EVAL, documents=np.concatenate(documents), n_words=n_words)
