"""The only place that calls `from_pretrained`: checkpoints, tokenizers, what dtype they store.

Safe by default: `trust_remote_code` is off unless the user asks, safetensors are preferred,
and transformers loads any pickle-based `.bin` with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import struct
from collections import Counter
from pathlib import Path

import torch

from evalsuite.errors import ModelLoadError
from evalsuite.precision import Precision

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _quiet_transformers() -> None:
    """Our own progress bars and one-line messages replace transformers' loading chatter."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _remote_code_error(source: str, exc: BaseException) -> ModelLoadError | None:
    text = str(exc)
    if "custom code" in text or "trust_remote_code" in text:
        return ModelLoadError(f"{source} ships its own model code, which evalsuite does not run unless asked: "
                              "read it, then pass --trust-remote-code if you trust it")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_model_source(source: str) -> None:
    """Fail fast, before any long work, on a local path that cannot be a checkpoint."""
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.exists()
    if not looks_local:
        return  # a hub id: resolved (or refused) by from_pretrained
    if not path.exists():
        raise ModelLoadError(f"model path {source} does not exist; pass a checkpoint directory or a Hugging Face id")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"{source} has no config.json; pass the directory written by save_pretrained")


def load_tokenizer(source: str, trust_remote_code: bool = False):
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, and others
        remote = _remote_code_error(source, exc)
        if remote is not None:
            raise remote from exc
        raise ModelLoadError(
            f"could not load a tokenizer from {source}: {_first_line(exc)}; the checkpoint needs its tokenizer files"
        ) from exc


def load_model(source: str, precision: Precision, device: torch.device, trust_remote_code: bool = False,
               attn_implementation: str | None = None) -> torch.nn.Module:
    """Load `source` with its weights cast to `precision`, straight onto `device`, in eval mode."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, object] = {"dtype": precision.dtype, "trust_remote_code": trust_remote_code}
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index if device.index is not None else 0}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"{source} at {precision.name} does not fit on {device}: use a larger GPU, --device cpu, or fewer dtypes"
        ) from exc
    except Exception as exc:
        raise _remote_code_error(source, exc) or ModelLoadError(
            f"could not load model {source} at {precision.name}: {_first_line(exc)}") from exc
    if device.type != "cuda":
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def unload(model: torch.nn.Module | None) -> None:
    """Free a model's device memory before the next one is loaded (one resident at a time)."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stored_dtype(source: str) -> str | None:
    """The dtype the checkpoint's weights are stored in (majority over safetensors headers).

    Reads only the JSON headers, so it costs nothing even for a 70B checkpoint.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        counts: Counter[str] = Counter()
        for file in sorted(path.glob("*.safetensors")):
            try:
                with open(file, "rb") as fh:
                    (size,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(size))
            except (OSError, ValueError, struct.error):
                continue
            for name, info in header.items():
                if name != "__metadata__" and isinstance(info, dict):
                    n = 1
                    for d in info.get("shape", []):
                        n *= d
                    counts[_SAFETENSORS_DTYPES.get(info.get("dtype"), str(info.get("dtype")).lower())] += n
        if counts:
            return counts.most_common(1)[0][0]
        config = path / "config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text())
            except ValueError:
                return None
            return data.get("dtype") or data.get("torch_dtype")
    return None
