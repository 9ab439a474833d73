"""The reference cache: a rerun reads the reference instead of computing it; any key change misses."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import run_config, run_pair

from evalsuite.config import RunConfig
from evalsuite.model.forward import Scorer
from evalsuite.model.precision import DTYPES
from evalsuite.numerics.observer import NumericsObserver
from evalsuite.passes import loop as passloop
from evalsuite.passes import reference
from evalsuite.store import logits as logits_io
from evalsuite.store import refcache

TIMINGS = {"tokens_per_s"}


def _config(tmp_path, cache, **kw) -> RunConfig:
    return run_config(tmp_path / "out", **{"max_tokens": 400, "reference_cache": cache, **kw})


@pytest.fixture
def loads(monkeypatch):
    """Which precisions were loaded as models during a run."""
    seen: list[str] = []
    real = passloop.load_model

    def counting(source, precision, *args, **kw):
        seen.append(precision.name)
        return real(source, precision, *args, **kw)

    monkeypatch.setattr(passloop, "load_model", counting)
    return seen


def _metrics(results) -> dict:
    return {k: {m: v for m, v in d.metrics.items() if m not in TIMINGS} for k, d in results.dtypes.items()}


def _run(cfg, model, numerics=False):
    observers = (NumericsObserver(cfg, str(model)),) if numerics else ()
    results, per_token = run_pair(cfg, str(model), observers=observers)
    return results, per_token


def test_rerun_reads_the_reference_from_the_cache(tiny_llama, tmp_path, loads):
    cache = tmp_path / "cache"
    cfg = _config(tmp_path, cache)
    first, tok1 = _run(cfg, tiny_llama, numerics=True)
    assert loads == ["fp32", "fp16", "bf16"]
    assert first.provenance["reference_cache"]["status"] == "stored"
    assert list(cache.rglob("seg0-hidden.npy")) and list(cache.rglob("head-weight.npy"))  # not its logits
    assert not list(cache.rglob("*-logits.npy"))
    assert first.provenance["reference_stored"] == "hidden-states"
    loads.clear()
    second, tok2 = _run(replace(cfg, out_dir=tmp_path / "out2"), tiny_llama, numerics=True)
    assert loads == ["fp16", "bf16"]  # the reference model was never loaded
    assert second.provenance["reference_cache"]["status"] == "hit"
    assert second.provenance["reference_cache"]["key"] == first.provenance["reference_cache"]["key"]
    assert _metrics(second) == _metrics(first)  # numerics findings included (restored from the cache)
    assert second.noise_floor == first.noise_floor
    for k in tok1:
        np.testing.assert_array_equal(tok1[k], tok2[k])


def test_other_test_dtypes_reuse_the_reference(tiny_llama, tmp_path, loads):
    cache = tmp_path / "cache"
    _run(_config(tmp_path, cache, dtypes=(DTYPES["fp16"],)), tiny_llama)
    loads.clear()
    results, _ = _run(_config(tmp_path, cache, dtypes=(DTYPES["bf16"],), out_dir=tmp_path / "o2"), tiny_llama)
    assert loads == ["bf16"]
    assert results.provenance["reference_cache"]["status"] == "hit"


def test_a_change_to_evalsuite_itself_misses(tiny_llama, tmp_path, loads, monkeypatch):
    """Edited evalsuite code (same version string) must not read a reference the old code computed."""
    cache = tmp_path / "cache"
    cfg = _config(tmp_path, cache, dtypes=(DTYPES["bf16"],))
    first, _ = _run(cfg, tiny_llama)
    assert len(refcache.code_digest()) == 64 and refcache.code_digest() == refcache.code_digest()
    monkeypatch.setattr(refcache, "code_digest", lambda: "0" * 64)
    loads.clear()
    second, _ = _run(replace(cfg, out_dir=tmp_path / "o2"), tiny_llama)
    assert loads == ["fp32", "bf16"] and second.provenance["reference_cache"]["status"] == "stored"
    assert second.provenance["reference_cache"]["key"] != first.provenance["reference_cache"]["key"]


def test_a_reference_cheaper_to_recompute_than_to_read_is_not_kept(tiny_llama, tmp_path, loads, monkeypatch, capsys):
    """With reading back slower than the pass (here: 1 byte/s), nothing is written and nothing is reused."""
    assert reference.worth_keeping(10.0, 2 * 2**30) and not reference.worth_keeping(0.5, 2 * 2**30)
    assert not reference.worth_keeping(1.5, 2 * 2**30, reapply_s=0.6)  # re-applying the head counts too
    monkeypatch.setattr(reference, "KEEP_READ_BYTES_PER_S", 1.0)
    cache = tmp_path / "cache"
    cfg = _config(tmp_path, cache, dtypes=(DTYPES["bf16"],))
    first, tok1 = _run(cfg, tiny_llama)
    info = first.provenance["reference_cache"]
    assert info["status"] == "not stored" and "quicker than reading back" in info["reason"]
    assert "reference not kept for reuse" in capsys.readouterr().err
    assert not list(cache.rglob("*.npy")) and not list(cache.rglob("*.bin"))  # no logits written
    loads.clear()
    second, tok2 = _run(replace(cfg, out_dir=tmp_path / "o2"), tiny_llama)
    assert loads == ["fp32", "bf16"]  # computed again
    assert _metrics(second) == _metrics(first)
    np.testing.assert_array_equal(tok1["bf16/kl"], tok2["bf16/kl"])


@pytest.mark.parametrize("change", ["max_tokens", "seq_len", "batch_size", "noise_tokens", "weights"])
def test_any_key_change_misses(tiny_llama, tmp_path, loads, change):
    cache = tmp_path / "cache"
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cfg = _config(tmp_path, cache, dtypes=(DTYPES["bf16"],))
    first, _ = _run(cfg, model)
    if change == "weights":  # same names, sizes and config; one weight differs
        from safetensors.torch import load_file, save_file

        f = next(model.glob("*.safetensors"))
        tensors = load_file(f)
        name = next(k for k in tensors if k.endswith("down_proj.weight"))
        tensors[name][0, 0] += 0.5
        save_file(tensors, f, metadata={"format": "pt"})
        cfg2 = cfg
    else:
        cfg2 = replace(cfg, **{change: {"max_tokens": 300, "seq_len": 32, "batch_size": 2, "noise_tokens": 32}[change]})
    loads.clear()
    second, _ = _run(replace(cfg2, out_dir=tmp_path / "o2"), model)
    assert loads == ["fp32", "bf16"]
    assert second.provenance["reference_cache"]["status"] == "stored"
    assert second.provenance["reference_cache"]["key"] != first.provenance["reference_cache"]["key"]
    if change == "weights":
        assert second.dtypes["fp32"].metrics["mean_nll"] != first.dtypes["fp32"].metrics["mean_nll"]


@pytest.mark.parametrize("damage", ["hidden", "head", "head-json", "arrays", "manifest", "logits"])
def test_a_corrupt_entry_is_dropped_and_recomputed(tiny_llama, tmp_path, loads, capsys, damage, monkeypatch):
    """Format 2 keeps hidden states and the head (damaged: a float flipped, head.json truncated); a model
    without the split keeps logits ("logits": run as a full forward)."""
    if damage == "logits":
        monkeypatch.setattr(Scorer, "_verified_split", lambda self: False)
    cache = tmp_path / "cache"
    cfg = _config(tmp_path, cache, dtypes=(DTYPES["bf16"],))
    first, _ = _run(cfg, tiny_llama)
    entry = next(d for d in cache.iterdir() if d.is_dir())
    files = {"hidden": "seg0-hidden.npy", "head": "head-weight.npy", "logits": "seg0-logits.npy"}
    if damage in files:  # flip one float in the middle of the file: same size, other content
        path = entry / files[damage]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "head-json":
        (entry / "head.json").write_text("{truncated")
    elif damage == "arrays":
        (entry / "seg0-reference.npz").write_bytes(b"not a zip")
    else:
        (entry / "seg0.json").write_text("{truncated")
    loads.clear()
    second, _ = _run(replace(cfg, out_dir=tmp_path / "o2"), tiny_llama)
    assert loads == ["fp32", "bf16"]
    assert "discarded" in second.provenance["reference_cache"].get("problem", "")
    said = [line for line in capsys.readouterr().err.splitlines() if "discarded" in line]
    assert len(said) == 1 and (damage not in files or files[damage] in said[0])  # one line naming the file
    assert _metrics(second) == _metrics(first)
    third, _ = _run(replace(cfg, out_dir=tmp_path / "o3"), tiny_llama)  # the recomputed entry is good again
    assert third.provenance["reference_cache"]["status"] == "hit"


def test_off_writes_nothing(tiny_llama, tmp_path, loads):
    results, _ = _run(_config(tmp_path, None, dtypes=(DTYPES["bf16"],)), tiny_llama)
    assert results.provenance["reference_cache"] == {"status": "off"}
    assert not (tmp_path / "cache").exists()


def test_least_recently_used_entries_are_evicted(tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    for i, n in enumerate([300, 350]):
        _run(_config(tmp_path, cache, dtypes=(DTYPES["bf16"],), max_tokens=n, out_dir=tmp_path / f"o{i}"),
             tiny_llama)
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2
    _run(_config(tmp_path, cache, dtypes=(DTYPES["bf16"],), max_tokens=380, out_dir=tmp_path / "o3",
                 reference_cache_gib=1e-9), tiny_llama)
    left = [d for d in cache.iterdir() if d.is_dir()]
    assert len(left) == 1  # only the entry just written survives a cap smaller than any entry



def test_logits_round_trip_in_small_chunks_and_truncation_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(logits_io, "_IO_CHUNK_BYTES", 4 * 97 * 7)  # 7 rows per chunk: a ragged last chunk
    x = torch.randn(50, 97, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "l.npy"
    with open(path, "wb") as fh:
        logits_io.write_logits(fh, x)
    np.testing.assert_array_equal(np.load(path), x.numpy())  # a plain .npy file
    assert torch.equal(logits_io.read_logits(path, torch.device("cpu")), x)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="shorter"):
        logits_io.read_logits(path, torch.device("cpu"))
