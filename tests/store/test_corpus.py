"""Corpus sources and the windowing rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evalsuite.errors import CorpusError
from evalsuite.model.loading import load_tokenizer
from evalsuite.store.corpus import CorpusSpec, load_texts, tokenize

TEXTS = ["人民日报：今天天气很好。", "第二行 with English, 数字 2024 年。", "第三行"]


def test_bundled_corpus_identity():
    texts, ident = load_texts(CorpusSpec())
    assert len(texts) >= 10 and ident["n_chars"] > 5000
    assert len(ident["sha256"]) == 64 and ident["source"] == "bundled:zh"


def test_txt_jsonl_parquet_give_the_same_texts(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"content": t}, ensure_ascii=False) for t in TEXTS))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": TEXTS}), tmp_path / "c.parquet")
    got = [load_texts(CorpusSpec(str(tmp_path / f"c.{ext}"), column="content"))[0] for ext in ("txt", "jsonl", "parquet")]
    assert got[0] == got[1] == got[2] == TEXTS
    hashes = {load_texts(CorpusSpec(str(tmp_path / f"c.{e}"), column="content"))[1]["sha256"] for e in ("txt", "jsonl")}
    assert len(hashes) == 1  # the identity is the text, not the container


def test_hugging_face_dataset_from_a_local_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "test.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in TEXTS))
    texts, ident = load_texts(CorpusSpec(f"hf:{folder}", hf_split="test"))
    assert texts == TEXTS and ident["source"] == f"hf:{folder}"


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "no text"), (b"\n \n", "no text"), ("中文".encode("gb18030"), "not UTF-8")],
)
def test_bad_text_files(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=match):
        load_texts(CorpusSpec(str(path)))


def test_missing_file_and_bad_jsonl(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_texts(CorpusSpec(str(tmp_path / "nope.txt")))
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(CorpusError, match=r"x.jsonl:2 is not valid JSON"):
        load_texts(CorpusSpec(str(tmp_path / "x.jsonl")))
    (tmp_path / "y.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(CorpusError, match="no field 'text'"):
        load_texts(CorpusSpec(str(tmp_path / "y.jsonl")))


def test_windows_score_every_token_once(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    texts, _ = load_texts(CorpusSpec())
    w = tokenize(texts, tok, seq_len=100)
    stream = np.concatenate([tok(t + "\n", add_special_tokens=False)["input_ids"] for t in texts])
    assert np.array_equal(w.targets, stream)  # every token, in order, exactly once
    assert all(len(x) == 101 for x in w.windows[:-1]) and 2 <= len(w.windows[-1]) <= 101
    assert w.target_bytes.sum() == sum(len((t + "\n").encode("utf-8")) for t in texts)
    capped = tokenize(texts, tok, seq_len=100, max_tokens=250)
    assert capped.n_tokens == 250 and [len(x) - 1 for x in capped.windows] == [100, 100, 50]


class _OneTokenTokenizer:
    """A tokenizer without BOS that turns any document into a single token."""

    is_fast = False
    bos_token_id = None

    def __call__(self, docs, add_special_tokens=False, return_offsets_mapping=False):
        return {"input_ids": [[7] for _ in docs]}

    def decode(self, ids):
        return "x"


def test_too_short_corpus():
    # Without BOS the first token has no context, so a one-token corpus has nothing to score.
    with pytest.raises(CorpusError, match="too short"):
        tokenize(["x"], _OneTokenTokenizer(), seq_len=8)
    assert tokenize(["x", "y"], _OneTokenTokenizer(), seq_len=8).n_tokens == 1


def _naive_bytes(docs, ids, offsets):
    """Per token, the UTF-8 bytes from the previous token's end (doc start for the first) to its end."""
    out = []
    for doc, doc_ids, doc_offsets in zip(docs, ids, offsets, strict=True):
        prev, high = 0, 0
        for k, (_, end) in enumerate(doc_offsets[: len(doc_ids)]):
            high = max(high, end)
            stop = len(doc) if k == len(doc_ids) - 1 else high
            out.append(len(doc[prev:stop].encode("utf-8")))
            prev = stop
    return np.array(out, dtype=np.int64)


def test_bytes_per_token_against_a_naive_loop():
    from evalsuite.store.corpus import _bytes_from_offsets

    rng = np.random.default_rng(0)
    alphabet = list("ab 中文字\n") + ["😀", "é"]
    docs, ids, offsets = [], [], []
    for _ in range(40):
        doc = "".join(rng.choice(alphabet, size=int(rng.integers(1, 30)))) + "\n"
        n = int(rng.integers(0, 6))  # some docs give no token at all
        ends = np.sort(rng.integers(0, len(doc) + 1, size=n))
        if n and rng.random() < 0.3:
            ends = ends[::-1].copy()  # offsets need not grow (byte-fallback tokens): a running max is used
        docs.append(doc)
        ids.append(list(range(n)))
        offsets.append([(0, int(e)) for e in ends])
    got = _bytes_from_offsets(docs, ids, offsets)
    np.testing.assert_array_equal(got, _naive_bytes(docs, ids, offsets))
    assert got.sum() == sum(len(d.encode("utf-8")) for d, x in zip(docs, ids, strict=True) if x)


def test_direct_backend_encoding_matches_the_tokenizer_call(tiny_llama):
    from evalsuite.store.corpus import _encode

    tok = load_tokenizer(str(tiny_llama))
    docs = [line + "\n" for line in load_texts(CorpusSpec())[0][:50]] + ["<s> special </s>\n"]
    enc = tok(docs, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = _encode(tok, docs)
    assert [list(x) for x in ids] == enc["input_ids"]
    assert [[tuple(o) for o in x] for x in offsets] == [[tuple(o) for o in x] for x in enc["offset_mapping"]]
    tok.backend_tokenizer.enable_truncation(4)  # set in a tokenizer.json: the tokenizer call turns it off
    ids, _ = _encode(tok, docs)
    assert [list(x) for x in ids] == enc["input_ids"]
