"""Prompts for --generate: files, corpus prefixes (evenly spaced, seeded), benchmark contexts, bad files."""

from __future__ import annotations

import json

import pytest
from tiny import build_tokenizer

from evalsuite.errors import UsageError
from evalsuite.store.prompts import (
    benchmark_prompts,
    corpus_prompts,
    evenly_spaced,
    file_prompts,
    read_texts,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(with_bos=True)


def test_evenly_spaced_by_hand():
    for seed in range(20):
        idx = evenly_spaced(100, 8, seed)
        gaps = {b - a for a, b in zip(idx, idx[1:], strict=False)}
        assert len(idx) == 8 and gaps <= {12, 13} and 0 <= idx[0] < 12.5  # a seeded offset in the first gap of 12.5
    assert evenly_spaced(5, 8, 0) == [0, 1, 2, 3, 4]  # never more than there are
    assert evenly_spaced(100, 8, 3) == evenly_spaced(100, 8, 3)
    assert {tuple(evenly_spaced(100, 8, s)) for s in range(10)} != {tuple(evenly_spaced(100, 8, 0))}


def test_txt_and_jsonl_files(tmp_path, tok):
    txt = tmp_path / "p.txt"
    txt.write_text("第一个提示\n\n  \n第二个 <b>提示</b>\n", encoding="utf-8")
    got = file_prompts(txt, "text", tok, 10)
    assert [p.text for p in got] == ["第一个提示", "第二个 <b>提示</b>"] and [p.origin for p in got] == ["line 1", "line 4"]
    assert got[0].ids[0] == tok.bos_token_id and list(got[0].ids[1:]) == tok("第一个提示", add_special_tokens=False).input_ids
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"q": f"问题{i}"}, ensure_ascii=False) for i in range(5)), encoding="utf-8")
    got = file_prompts(jsonl, "q", tok, 3)
    assert [p.text for p in got] == ["问题0", "问题1", "问题2"] and {p.source for p in got} == {"file"}


@pytest.mark.parametrize(("name", "content", "column", "words"), [
    ("missing.txt", None, "text", "does not exist"),
    ("bad.jsonl", '{"text": "a"}\nnot json\n', "text", "bad.jsonl:2 is not valid JSON"),
    ("col.jsonl", '{"prompt": "a"}\n', "text", "no text field 'text'; use --gen-column"),
    ("empty.txt", "\n \n", "text", "holds no prompt"),
    ("gbk.txt", "中文".encode("gbk"), "text", "is not UTF-8"),
])
def test_bad_files_are_one_line_usage_errors(tmp_path, name, content, column, words):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=words) as info:
        read_texts(path, column)
    assert "\n" not in str(info.value)


def test_corpus_prefixes(tok):
    docs = [f"第{i}篇文章的开头，后面还有很多很多的文字内容。" * 3 for i in range(40)]
    got = corpus_prompts(docs, tok, 8, seed=0, prefix=12)
    chosen = [int(p.origin.split()[1]) for p in got]
    assert chosen == evenly_spaced(40, 8, 0)
    for p, d in zip(got, chosen, strict=True):
        ids = tok(docs[d], add_special_tokens=False).input_ids
        assert list(p.ids) == [tok.bos_token_id] + ids[:12] and p.text == tok.decode(ids[:12])
    assert [p.ids for p in corpus_prompts(docs, tok, 8, 0, 12)] == [p.ids for p in got]  # deterministic
    assert [p.origin for p in corpus_prompts(docs, tok, 8, 1, 12)] != [p.origin for p in got]  # seeded


def test_more_prompts_than_documents(tok):
    docs = ["一二三四五六七八九十" * 4, "甲乙丙丁戊己庚辛壬癸" * 4]
    got = corpus_prompts(docs, tok, 5, seed=0, prefix=6)  # ceil(5 / 2) = 3 starts per document
    assert len(got) == 5
    for p in got:
        d, start = int(p.origin.split()[1]), int(p.origin.split()[3])
        ids = tok(docs[d], add_special_tokens=False).input_ids
        assert start in {0, len(ids) // 3, 2 * len(ids) // 3} and list(p.ids[1:]) == ids[start : start + 6]
    assert len({p.origin for p in got}) == 5


def test_benchmark_prompts(tok):
    class Q:
        def __init__(self, i):
            self.subject, self.doc_id, self.choices, self.gold = "zh_mc_math", i, ("A", "B", "C", "D"), i % 4

    questions = [Q(i) for i in range(10)]
    contexts = [f"问题{i}\nA. 一\nB. 二\n答案：" for i in range(10)]
    got = benchmark_prompts(questions, contexts, tok, 4, seed=0)
    picked = evenly_spaced(10, 4, 0)
    assert [p.text for p in got] == [contexts[i] for i in picked]
    assert [p.origin for p in got] == [f"zh_mc_math #{i}" for i in picked]
    assert all(p.source == "benchmark" and p.choices == ("A", "B", "C", "D") for p in got)
