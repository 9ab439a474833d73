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
from evalsuite.model.precision import Precision
from evalsuite.model.source import local_vocab_size

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _quiet_transformers() -> None:
    """Our own progress bars and one-line messages replace transformers' loading chatter."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # --device-map auto: offloading is refused in one line
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


def text_config(config):
    """The text model's part of a config (a multimodal one keeps it apart), else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _text_config(source: str, trust_remote_code: bool):
    """The checkpoint's (text) config, or None where it cannot be read: for hints only."""
    _quiet_transformers()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        return text_config(config)
    except Exception:  # noqa: BLE001 - load_model reports a bad config in its own words
        return None


def hidden_size(source: str, trust_remote_code: bool = False) -> int | None:
    """The decoder's width from the checkpoint's config (None where it cannot be read): sizes batches."""
    width = getattr(_text_config(source, trust_remote_code), "hidden_size", None)
    return int(width) if width else None


def vocab_size(source: str, trust_remote_code: bool = False) -> int | None:
    """The vocabulary size from the config (None where unknown): a hint only, for the kernel's
    prewarm (passes/prewarm.py), where a wrong or missing one costs a compile, never a number.
    A local config.json is read as JSON (source.local_vocab_size), AutoConfig only where it says
    none (a Hub id): the prewarm child calls this, and AutoConfig imported transformers there, so
    on an H200 the run waited 4-5 s for the child's kernels at the Qwen2-0.5B shape and for Gemma 3,
    whose loads take 2-3 s (docs/performance.md, round 12)."""
    local = local_vocab_size(source)
    if local is not None:
        return local
    vocab = getattr(_text_config(source, trust_remote_code), "vocab_size", None)
    return int(vocab) if vocab else None


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
               attn_implementation: str | None = None, device_map: str | None = None,
               max_memory: dict[int | str, int | str] | None = None) -> torch.nn.Module:
    """Load `source` with its weights cast to `precision`, in eval mode.

    device_map None: everything straight onto `device`. "auto": accelerate spreads the modules over
    the visible GPUs (a model too large for one); `device` stays the run's device, where the
    caller keeps its buffers (forward.Scorer moves the logits there). On a CPU run "auto" may use
    only the CPU. Offloading to the CPU or to disk is refused: every module must sit on a device
    that runs it. `max_memory` ({GPU index or "cpu": bytes or "10GiB"}) caps accelerate's
    placement (tests shard a tiny model with it); only with device_map "auto".
    """
    if device_map not in (None, "auto"):
        raise ModelLoadError(f"device map {device_map!r} is not supported: use 'auto' or none")
    if max_memory is not None and device_map is None:
        raise ValueError("max_memory applies only with device_map 'auto'")
    _quiet_transformers()
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, object] = {"dtype": precision.dtype, "trust_remote_code": trust_remote_code}
    if device_map == "auto":
        kwargs["device_map"] = "auto"
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        elif device.type != "cuda":  # a CPU run keeps the model off any GPU that happens to be visible
            kwargs["max_memory"] = {"cpu": _cpu_memory()}
    elif device.type == "cuda":
        kwargs["device_map"] = {"": device.index if device.index is not None else 0}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    where = "the visible GPUs" if device_map == "auto" and device.type == "cuda" else str(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except torch.OutOfMemoryError as exc:
        hint = "use more or larger GPUs" if device_map == "auto" else "use a larger GPU, --device-map auto"
        raise ModelLoadError(
            f"{source} at {precision.name} does not fit on {where}: {hint}, --device cpu, or fewer dtypes"
        ) from exc
    except Exception as exc:
        raise _remote_code_error(source, exc) or ModelLoadError(
            f"could not load model {source} at {precision.name}: {_first_line(exc)}") from exc
    if device_map == "auto":
        offloaded = _offloaded(model)
        if offloaded:
            del model
            unload(None)
            what = "the whole model" if offloaded == ["(model)"] else \
                f"{len(offloaded)} module(s) ({', '.join(offloaded[:3])}{', ...' if len(offloaded) > 3 else ''})"
            hint = "use more or larger GPUs" if device.type == "cuda" else "free memory, or use GPUs"
            raise ModelLoadError(f"{source} at {precision.name} does not fit on {where}: accelerate would offload "
                                 f"{what} to the CPU or disk, which evalsuite does not run; {hint}")
    elif device.type != "cuda":
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _cpu_memory() -> int:
    """Bytes of memory available now (what accelerate would assume for the CPU)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _offloaded(model: torch.nn.Module) -> list[str]:
    """Modules accelerate offloaded (to the CPU for a GPU run, or to disk): their weights wait on the meta device."""
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if not meta:
        return []
    hf_map = getattr(model, "hf_device_map", None) or {}
    names = [name or "(model)" for name, where in hf_map.items() if where in ("cpu", "disk")
             and any(p.device.type == "meta" for p in model.get_submodule(name).parameters())]
    return names or meta


def model_part(model: torch.nn.Module, method: str):
    """model.method() (e.g. "get_output_embeddings"), or None where the architecture does not implement it."""
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


def placement(model: torch.nn.Module) -> dict[str, int]:
    """Where the model's parameters are: {device: number of parameters}, tied weights once.

    E.g. {"cuda:0": 3_800_000_000, "cuda:1": 3_200_000_000} for a model sharded by --device-map
    auto; one entry for a model on one device. For the run's provenance.
    """
    counts: Counter[torch.device] = Counter()
    for p in model.parameters():  # shared (tied) parameters are listed once
        counts[p.device] += p.numel()
    order = sorted(counts, key=lambda d: (d.type != "cuda", d.type, -1 if d.index is None else d.index))
    return {str(d): counts[d] for d in order}


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
