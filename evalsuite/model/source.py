"""Where a checkpoint comes from, checked before any long work: a local directory or a Hub id.

Why here and not in `from_pretrained`'s error: transformers reports an unreadable config.json as
a tokenizer problem and, offline, retries the Hub for about a minute before saying that "the
checkpoint needs its tokenizer files". A user should hear the real cause, at once.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from evalsuite.errors import ModelLoadError
from evalsuite.log import say

HUB_PROBE_TIMEOUT_S = 3.0


def is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def check_model_source(source: str) -> None:
    """Fail fast on a path that cannot be a checkpoint, a config.json that does not parse, or a Hub id
    that can be neither downloaded nor found in the local cache."""
    if not is_local(source):
        _check_hub(source)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {source} does not exist; pass a checkpoint directory or a Hugging Face id")
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise ModelLoadError(f"{source} has no config.json; pass the directory written by save_pretrained")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config} is not valid JSON ({exc}); restore it from the original checkpoint") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{config} holds a {type(data).__name__}, not a model configuration object")


def max_positions(source: str) -> int | None:
    """`max_position_embeddings` of a local checkpoint's (text) config, where it says one."""
    return _positive_int(_local_text_config(source), "max_position_embeddings")


def local_vocab_size(source: str) -> int | None:
    """`vocab_size` of a local checkpoint's (text) config, read as JSON. Why not AutoConfig: the
    kernel's compile child (passes/prewarm.py) needs only this number, and transformers' import
    for it more than doubled that child's start-up (on the 2-core CPU: torch and Triton 1.7 s,
    then AutoConfig 2.0 s). loading.vocab_size reads it here first."""
    return _positive_int(_local_text_config(source), "vocab_size")


def _local_text_config(source: str) -> dict | None:
    """A local checkpoint's config.json as a dict (its `text_config` where it nests one), else None."""
    if not is_local(source):
        return None
    try:
        data = json.loads((Path(source).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return data["text_config"] if isinstance(data.get("text_config"), dict) else data


def _positive_int(data: dict | None, key: str) -> int | None:
    value = (data or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _check_hub(repo_id: str) -> None:
    """A Hub id: reachable, or cached (then transformers is told to stay offline instead of retrying)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if _reachable(endpoint):
        return
    if _cached(repo_id):
        os.environ["HF_HUB_OFFLINE"] = "1"  # this process only: no minute of retries before using the cache
        say(f"the Hugging Face Hub ({endpoint}) is unreachable: using the local cache of {repo_id}")
        return
    raise ModelLoadError(f"cannot reach the Hugging Face Hub ({endpoint}) to download {repo_id}, and it is not in "
                         "the local cache: pass a local checkpoint directory, or run once where the Hub is reachable "
                         "(afterwards HF_HUB_OFFLINE=1 uses the cache)")


def _reachable(endpoint: str) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is reported by from_pretrained in its own words
        return False
