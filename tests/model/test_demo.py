"""model/demo.py: the embedded model's one-time conversion parses its GGUF once."""

from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")

from evalsuite.model import demo  # noqa: E402


def test_one_reader_serves_every_load_and_the_real_class_comes_back(monkeypatch):
    made = []

    class Reader:  # stands in for gguf.GGUFReader: counts the parses
        def __init__(self, path, mode="r"):
            made.append((path, mode))

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    with demo._one_gguf_reader():
        first = gguf.GGUFReader("/m.gguf")
        from gguf import GGUFReader  # as transformers imports it at each load

        assert GGUFReader("/m.gguf") is first
        assert GGUFReader("/other.gguf") is not first
    assert made == [("/m.gguf", "r"), ("/other.gguf", "r")]
    assert gguf.GGUFReader is Reader


@pytest.mark.slow
def test_the_converted_demo_equals_a_conversion_without_the_shared_reader(demo_model, tmp_path, monkeypatch):
    """The shared reader changes nothing converted: weights and files equal transformers' own three parses."""
    import filecmp

    import torch
    from safetensors.torch import load_file

    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "_one_gguf_reader", lambda: __import__("contextlib").nullcontext())
    plain = demo.demo_checkpoint()
    assert plain != demo_model
    a, b = (load_file(str(next(p.glob("*.safetensors")))) for p in (demo_model, plain))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(demo_model / f, plain / f, shallow=False), f
