"""store/digests.py: the content digests behind the reference cache's key and its file checks."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from evalsuite.store import digests


def test_checkpoint_digest_is_memoised_and_sees_changes(tiny_llama, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    memo = tmp_path / "memo.json"
    reads: list[str] = []
    real = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda p, *a: reads.append(p.name) or real(p, *a))
    d1 = digests.checkpoint_digest(str(model), memo)
    assert reads
    reads.clear()
    assert digests.checkpoint_digest(str(model), memo) == d1
    assert reads == []  # unchanged files are not read again
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    d2 = digests.checkpoint_digest(str(model), memo)
    assert reads == ["config.json"] and d2 != d1
    assert digests.checkpoint_digest(str(tmp_path / "absent-model-id"), memo) is None


def test_logits_digest_is_exact_and_order_sensitive():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(300, 97, generator=gen)
    d = digests.logits_digest(x)
    assert digests.logits_digest(x.clone()) == d
    assert digests.logits_digest(x.flip(0)) != d  # rows swapped
    y = x.clone()
    y.view(torch.int32)[123, 45] ^= 1  # one bit of one float
    assert digests.logits_digest(y) != d


def test_tokens_digest_sees_window_boundaries():
    a = [np.arange(5), np.arange(5, 10)]
    b = [np.arange(4), np.arange(4, 10)]
    assert digests.tokens_digest(a) != digests.tokens_digest(b)
    assert digests.tokens_digest(a) == digests.tokens_digest([w.copy() for w in a])
