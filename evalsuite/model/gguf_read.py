"""gguf's reader with arrays parsed whole: what the demo's one-time conversion reads its GGUF with.

Why: `gguf.GGUFReader` builds every element of a metadata array with its own numpy slices (four
numpy calls a number, eight a string), and transformers then turns each string's uint8 array into
a list of numpy scalars. Gemma 3's vocabulary is three arrays of 262,144 (tokens, scores, token
types): the reader's parse took 12 of the conversion's 42 s on the 2-core CPU.

Here an array of numbers is read with one view and split into one-element row views (the parts
gguf gives: same dtype, same values), and a string array's lengths are read with `struct`, each
string's part a `memoryview` of its bytes: what transformers (`list(part)`) and
`ReaderField.contents()` (`bytes(part)`) read, with `.nbytes` like an array. Nested arrays and a
file in the other byte order go through gguf's own code. tests/model/test_gguf_read.py holds the
fields equal to gguf's own reader's, value for value.
"""

from __future__ import annotations

import struct
import sys

import numpy as np


def fast_reader_class(base: type) -> type:
    """A subclass of `base` (gguf.GGUFReader) whose metadata arrays are parsed whole."""
    from gguf.constants import GGUFValueType

    class FastGGUFReader(base):
        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I" or sys.byteorder != "little":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            offs, n, itype = orig_offs + 12, int(alen[0]), GGUFValueType(raw_itype[0])
            nptype = self.gguf_scalar_to_np.get(itype)
            if n == 0 or (nptype is None and itype != GGUFValueType.STRING):
                return super()._get_field_parts(orig_offs, raw_type)  # empty or nested: gguf's own
            types = [GGUFValueType.ARRAY, itype]
            if nptype is not None:
                values = self._get(offs, nptype, n)  # (n,) one view of the file
                return 12 + values.nbytes, [raw_itype, alen, *values.reshape(n, 1)], list(range(2, 2 + n)), types
            end, strings = _strings(memoryview(self.data), offs, n)
            lengths = np.array([len(s) for s in strings], dtype=np.uint64).reshape(n, 1)  # (n, 1)
            parts: list = [raw_itype, alen]
            for length, data in zip(lengths, strings, strict=True):
                parts += (length, data)
            return end - orig_offs, parts, list(range(3, 3 + 2 * n, 2)), types

    return FastGGUFReader


def _strings(buf: memoryview, offs: int, n: int) -> tuple[int, list[memoryview]]:
    """(offset after the array, n memoryviews): GGUF strings are a uint64 length and that many bytes."""
    out = []
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(n):
        (length,) = unpack(buf, offs)
        out.append(buf[offs + 8 : offs + 8 + length])
        offs += 8 + length
    return offs, out
