"""model/source.py: what a local checkpoint's config.json says, read without transformers (and
loading.vocab_size, which reads it there first)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from transformers import AutoConfig

from evalsuite.model import loading
from evalsuite.model.source import local_vocab_size, max_positions


def test_the_vocabulary_read_as_json_is_the_one_autoconfig_reads(tiny_llama, tiny_qwen_no_bos):
    for model in (tiny_llama, tiny_qwen_no_bos):
        config = AutoConfig.from_pretrained(model)
        assert local_vocab_size(str(model)) == config.vocab_size
        assert max_positions(str(model)) == config.max_position_embeddings


def test_a_nested_text_config_is_the_one_read(tmp_path):
    """Multimodal checkpoints (Gemma 3's 4B and up) keep the decoder's numbers under text_config."""
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gemma3", "vocab_size": 7, "text_config": {"vocab_size": 262208, "max_position_embeddings": 131072}}))
    assert local_vocab_size(str(tmp_path)) == 262208
    assert max_positions(str(tmp_path)) == 131072


def test_nothing_is_guessed_where_the_config_does_not_say(tmp_path):
    assert local_vocab_size("org/some-model") is None  # a Hub id: not read here
    assert local_vocab_size(str(tmp_path)) is None  # no config.json
    (tmp_path / "config.json").write_text("{not json")
    assert local_vocab_size(str(tmp_path)) is None
    for bad in ([1, 2], {"vocab_size": True}, {"vocab_size": -3}, {"vocab_size": "32000"}, {"model_type": "llama"}):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        assert local_vocab_size(str(tmp_path)) is None, bad


def test_vocab_size_asks_autoconfig_only_where_no_local_config_says(tiny_llama, monkeypatch):
    asked = []
    monkeypatch.setattr(loading, "_text_config", lambda source, trust: asked.append(source) or SimpleNamespace(vocab_size=321))
    assert loading.vocab_size(str(tiny_llama)) == AutoConfig.from_pretrained(tiny_llama).vocab_size and not asked
    assert loading.vocab_size("org/some-model") == 321 and asked == ["org/some-model"]
