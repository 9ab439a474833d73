"""model/gguf_read.py: the whole-array reader gives every field and tensor gguf's own reader gives."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from evalsuite.model.gguf_read import fast_reader_class  # noqa: E402

V = gguf.GGUFValueType


def _write(path, endianess=gguf.GGUFEndian.LITTLE):
    rng = np.random.default_rng(11)
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "", "héllo", "▁世界", "a" * 300, "\n"])
    w.add_array("tokenizer.ggml.scores", rng.standard_normal(6).astype(np.float32).tolist())
    w.add_key_value("tokenizer.ggml.token_type", [1, 3, 1, 1, 6, 1], V.ARRAY, V.INT32)
    w.add_key_value("test.u8s", [0, 255, 7], V.ARRAY, V.UINT8)
    w.add_key_value("test.bools", [True, False, True], V.ARRAY, V.BOOL)
    w.add_key_value("test.f64s", [1e300, -2.5], V.ARRAY, V.FLOAT64)
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_string("general.name", "tiny")
    w.add_uint32("test.scalar", 42)
    w.add_float32("test.float", 0.5)
    w.add_bool("test.flag", True)
    w.add_tensor("w", rng.standard_normal((3, 5)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _values(field):
    """What transformers reads of a field: each data part as its _gguf_parse_value gives it."""
    from transformers.integrations.ggml import _gguf_parse_value

    return [_gguf_parse_value(field.parts[i], field.types) for i in field.data]


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_fields_and_tensors_equal_ggufs_own_reader(tmp_path, endianess):
    path = tmp_path / "m.gguf"
    _write(path, endianess)
    real, fast = gguf.GGUFReader(str(path)), fast_reader_class(gguf.GGUFReader)(str(path))
    assert list(fast.fields) == list(real.fields)
    for name, a in real.fields.items():
        b = fast.fields[name]
        assert (b.offset, b.name, b.types, b.data) == (a.offset, a.name, a.types, a.data), name
        assert [bytes(p) for p in b.parts] == [bytes(p) for p in a.parts], name  # the same bytes of the file
        assert sum(int(p.nbytes) for p in b.parts) == sum(int(p.nbytes) for p in a.parts), name
        assert b.contents() == a.contents(), name
        if endianess == gguf.GGUFEndian.LITTLE and name.startswith("tokenizer"):
            assert _values(b) == _values(a), name  # transformers reads the native-order file only
    assert [(t.name, t.tensor_type, t.data_offset, t.data.tobytes()) for t in fast.tensors] == [
        (t.name, t.tensor_type, t.data_offset, t.data.tobytes()) for t in real.tensors]


def test_the_fast_path_reads_strings_and_numbers_as_the_file_holds_them(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path)
    fast = fast_reader_class(gguf.GGUFReader)(str(path))
    tokens = fast.fields["tokenizer.ggml.tokens"]
    assert all(isinstance(tokens.parts[i], memoryview) for i in tokens.data)  # the fast path was taken
    assert tokens.contents() == ["<s>", "", "héllo", "▁世界", "a" * 300, "\n"]
    assert fast.fields["test.u8s"].contents() == [0, 255, 7]
    assert fast.fields["test.bools"].contents() == [True, False, True]
    assert fast.fields["test.f64s"].contents() == [1e300, -2.5]
    assert fast.fields["test.nested"].contents() == gguf.GGUFReader(str(path)).fields["test.nested"].contents()
