"""Numerics diagnostics: each statistic against an independent recomputation, on tiny models with
planted problems, and on Gemma 3 270M (whose residual stream really does pass 65504)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import fp32_gemm_linears, run_config, run_pair
from tiny import build_model, build_planted
from transformers import AutoModelForCausalLM

from evalsuite.cli import main
from evalsuite.config import RunConfig
from evalsuite.model.loading import load_tokenizer
from evalsuite.model.modules import find_modules
from evalsuite.model.precision import DTYPES
from evalsuite.numerics.hooks import (
    HIST_BINS,
    HIST_BINS_PER_BIT,
    HIST_SHIFT,
    magnitude_histogram,
    percentile_from_histogram,
)
from evalsuite.numerics.layers import LayerError, LayerSample, compare, max_growth_layer, with_growth
from evalsuite.numerics.observer import NumericsObserver
from evalsuite.numerics.weights import SLICE, conversion_stats, tensor_stats
from evalsuite.store import corpus
from evalsuite.store.corpus import CorpusSpec

FP16, BF16, FP32 = DTYPES["fp16"], DTYPES["bf16"], DTYPES["fp32"]
DOWN0, DOWN1 = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"


def _cfg(tmp_path, **kw) -> RunConfig:
    return run_config(tmp_path, **kw)


def _run(path, tmp_path, **kw):
    cfg = _cfg(tmp_path, **kw)
    results, _ = run_pair(cfg, str(path), observers=(NumericsObserver(cfg, str(path)),))
    return results, results.to_dict()["numerics"]


# -- weight conversion -----------------------------------------------------------------------

def _weights_float64(x: np.ndarray, dtype) -> dict:
    """The statistics recomputed in numpy float64, from numpy's own float16 cast."""
    with np.errstate(over="ignore"):
        y = x.astype(np.float16).astype(np.float64) if dtype == FP16 else \
            torch.from_numpy(x).to(torch.bfloat16).double().numpy()  # numpy has no bfloat16
    x = x.astype(np.float64)
    keep = np.isfinite(y) & (y != 0)
    rel = np.abs(y[keep] - x[keep]) / np.abs(x[keep])
    return {"overflow": int((np.isinf(y) & np.isfinite(x)).sum()), "flushed_zero": int(((y == 0) & (x != 0)).sum()),
            "subnormal": int(((np.abs(y) < dtype.smallest_normal) & (y != 0)).sum()),
            "rel_err_mean": rel.mean() if rel.size else None, "rel_err_max": rel.max(initial=0.0)}


@pytest.mark.parametrize("p", [FP16, BF16], ids=lambda p: p.name)
def test_weight_stats_match_float64_numpy(p):
    gen = np.random.default_rng(0)
    x = np.concatenate([gen.normal(0, 0.02, 5000), [7e4, -1e5, 65504, 65519, 65520, 1e-9, -3e-8, 2.9e-8, 1e-6,
                                                   6e-5, 0.0, 3.4e38]]).astype(np.float32)
    v = tensor_stats(torch.from_numpy(x), [p], None)[0].tolist()
    _, absmax, overflow, flushed, subnormal, rel_sum, rel_max, n_rel, *_ = v
    want = _weights_float64(x, p)
    assert (overflow, flushed, subnormal) == (want["overflow"], want["flushed_zero"], want["subnormal"])
    assert rel_sum / n_rel == pytest.approx(want["rel_err_mean"], rel=1e-6)  # one float32 rounding per ratio
    assert rel_max == pytest.approx(want["rel_err_max"], rel=1e-6)
    assert absmax == np.abs(x).max()
    if p == FP16:  # 65519 rounds down to 65504; 65520 and above overflow
        assert overflow == 4 and flushed == 2  # 7e4, -1e5, 65520, 3.4e38; 1e-9 and 2.9e-8 (< 2^-25)


def test_weight_stats_of_several_dtypes_at_once_match_float64_numpy():
    """The dtypes share one read of each slice (|x|, its inf/zero/NaN counts): each row still equals
    numpy's float64 recomputation, across slice boundaries, with inf and NaN inputs."""
    n = SLICE["cpu"]
    gen = np.random.default_rng(5)
    x = gen.normal(0, 0.02, 2 * n + 9).astype(np.float32)
    x[[3, n + 1, 2 * n + 2]] = [np.inf, np.nan, 7e4]
    x[[5, n + 5]] = [1e-9, 0.0]
    rows = tensor_stats(torch.from_numpy(x), [FP16, BF16], None).tolist()
    assert len(rows) == 2
    finite = x[np.isfinite(x)]
    for p, (count, absmax, overflow, flushed, subnormal, rel_sum, rel_max, n_rel, *_) in zip((FP16, BF16), rows,
                                                                                               strict=True):
        want = _weights_float64(finite, p)  # NaN and inf inputs add to none of the counts
        y = torch.from_numpy(finite).to(p.dtype).double().numpy()
        assert count == x.size and np.isnan(absmax)  # a NaN input makes the absmax NaN, as for one dtype
        assert n_rel == int((np.isfinite(y) & (y != 0)).sum())
        assert (overflow, flushed, subnormal) == (want["overflow"], want["flushed_zero"], want["subnormal"])
        assert rel_sum / n_rel == pytest.approx(want["rel_err_mean"], rel=1e-6)
        assert rel_max == pytest.approx(want["rel_err_max"], rel=1e-6)


def test_weight_stats_slices_combine():
    n = SLICE["cpu"]
    x = torch.randn(2 * n + 17, dtype=torch.float32)
    x[n + 3] = 1e5
    whole = tensor_stats(x, [FP16], None)[0].tolist()
    parts = [tensor_stats(x[i : i + n], [FP16], None)[0].tolist() for i in (0, n, 2 * n)]
    assert whole[0] == x.numel() and whole[1] == 1e5 and whole[2] == 1
    assert whole[6] == max(p[6] for p in parts) and whole[5] == pytest.approx(sum(p[5] for p in parts), rel=1e-12)


# -- activations ------------------------------------------------------------------------------

def test_percentile_from_histogram_within_one_bin():
    gen = np.random.default_rng(1)
    x = (gen.standard_t(3, size=(400, 300)) * 50).astype(np.float32)
    x[0, :3] = [0.0, 1e-40, -3e38]  # zero, a float32 subnormal, a huge value: all binned
    counts = magnitude_histogram(torch.from_numpy(x)).numpy()
    assert counts.sum() == x.size
    for q in (0.5, 0.99, 0.9999):
        exact = np.quantile(np.abs(x), q, method="inverted_cdf")
        est = percentile_from_histogram(counts, q)
        assert exact < est <= exact * (1 + 1 / HIST_BINS_PER_BIT), q  # 8 linear bins per power of two
    assert percentile_from_histogram(magnitude_histogram(torch.tensor([1.0, float("inf")])).numpy(), 0.9) == np.inf



def test_magnitude_histogram_counts_every_bin_exactly():
    """Against numpy's bincount of the same bit patterns, specials included, on fresh random inputs."""
    gen = np.random.default_rng(7)
    x = (gen.standard_normal(50_000) * 10.0 ** gen.integers(-40, 38, 50_000)).astype(np.float32)
    x[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45]
    keys = (x.view(np.int32) & 0x7FFFFFFF) >> HIST_SHIFT
    expect = np.bincount(keys, minlength=HIST_BINS)
    got = magnitude_histogram(torch.from_numpy(x)).numpy()
    assert got.dtype == np.int64 and got.shape == (HIST_BINS,)
    np.testing.assert_array_equal(got, expect)

def test_find_modules_kinds(tiny_llama, tiny_qwen_no_bos):
    for path in (tiny_llama, tiny_qwen_no_bos):
        model = AutoModelForCausalLM.from_pretrained(path)
        kinds = {}
        for w in find_modules(model):
            kinds.setdefault(w.kind, []).append(w.name)
        assert kinds["layer"] == ["model.layers.0", "model.layers.1"]
        assert kinds["attention"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        assert kinds["mlp"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert kinds["embedding"] == ["model.embed_tokens"] and kinds["lm_head"] == ["lm_head"]
        assert "model.norm" in kinds["norm"] and len(kinds["norm"]) == 5


def _hooked_reference(path, cfg):
    """Every watched module's output on every window, captured by plain hooks: the independent check."""
    tok = load_tokenizer(str(path))
    texts, _ = corpus.load_texts(cfg.corpus)
    windows = corpus.tokenize(texts, tok, cfg.seq_len, cfg.max_tokens).windows
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seen: dict[str, list[np.ndarray]] = {}
    for w in find_modules(model):
        w.module.register_forward_hook(
            lambda m, a, o, name=w.name: seen.setdefault(name, []).append((o[0] if isinstance(o, tuple) else o).numpy()))
    with torch.no_grad():
        for w in windows:
            model(torch.from_numpy(w)[None, :-1])
    return {k: np.concatenate([a.reshape(-1, a.shape[-1]) for a in v]) for k, v in seen.items()}


def test_activation_absmax_percentile_and_layer_error_match_recomputation(tiny_llama, tmp_path):
    cfg = _cfg(tmp_path, dtypes=(FP16,), batch_size=1)  # batch 1, as below: bitwise the same forward passes
    results, num = _run(tiny_llama, tmp_path, dtypes=(FP16,), batch_size=1)
    ref = _hooked_reference(tiny_llama, cfg)
    acts = {a["module"]: a for a in num["activations"]}
    assert set(acts) == set(ref)
    for name, x in ref.items():
        exact = np.abs(x).max()
        assert acts[name]["absmax"] == exact, name
        p = np.quantile(np.abs(x), 0.9999)
        assert p * (1 - 1e-6) <= acts[name]["p9999"] <= min(exact, p * 1.125), name
        assert acts[name]["headroom_bits"]["fp16"] == pytest.approx(math.log2(65504 / exact))
    m = results.dtypes["fp16"].metrics
    assert m["min_headroom_bits"] == pytest.approx(min(math.log2(65504 / np.abs(x).max()) for x in ref.values()))
    assert m["modules_near_overflow"] == 0 and m["first_nonfinite_module"] is None

    # layer-wise error: the same sampled positions, hidden states from hooks on a fresh FP16 model
    test_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).eval()
    fp32_gemm_linears(test_model)  # as the run computes half Linears on a CPU
    states = {}
    for name in ("model.embed_tokens", "model.layers.0", "model.layers.1"):
        test_model.get_submodule(name).register_forward_hook(
            lambda mod, a, o, name=name: states.setdefault(name, []).append(o[0] if isinstance(o, tuple) else o))
    tok = load_tokenizer(str(tiny_llama))
    windows = corpus.tokenize(corpus.load_texts(cfg.corpus)[0], tok, cfg.seq_len, cfg.max_tokens).windows
    with torch.no_grad():
        for w in windows:
            test_model(torch.from_numpy(w)[None, :-1])
    sample = num["settings"]["layer_sample"]
    pos = np.arange(sample["tokens"]) * sample["stride"]
    for i, name in enumerate(("model.embed_tokens", "model.layers.0", "model.layers.1")):
        t = torch.cat([s.reshape(-1, s.shape[-1]) for s in states[name]]).double().numpy()[pos]
        r = ref[name][pos].astype(np.float64)
        rel = np.linalg.norm(t - r, axis=1) / np.linalg.norm(r, axis=1)
        cos = (t * r).sum(1) / np.linalg.norm(t, axis=1) / np.linalg.norm(r, axis=1)
        got = num["layer_error"]["fp16"][i]
        assert got["layer"] == i - 1 and got["n_tokens"] == len(pos)
        assert got["rel_error"] == pytest.approx(rel.mean(), rel=1e-9)
        assert got["rel_error_max"] == pytest.approx(rel.max(), rel=1e-9)
        assert got["cosine"] == pytest.approx(cos.mean(), rel=1e-12)


def test_layer_sample_positions_and_compare():
    s = LayerSample(n_tokens=1500, n_slots=3, hidden=4, device=torch.device("cpu"))
    assert s.count == 512 and s.stride == 2
    data = torch.arange(1500 * 4, dtype=torch.float32).reshape(1500, 4) + 1
    for offset in range(0, 1500, 96):  # batches that do not align with the stride
        n = min(96, 1500 - offset)
        for slot in (1, 2):
            s.set_batch(offset, n)
            s.capture(slot, data[offset : offset + n].reshape(2, -1, 4))  # (B, T, H)
    assert torch.equal(s.buf[1], data[: 2 * 512 : 2])
    other = s.like()
    other.buf[1], other.buf[2] = s.buf[1] * 1.01, s.buf[2] * 1.04
    errors = compare(s.buf, other.buf)
    assert errors[0].n_tokens == 0 and errors[0].rel_error is None  # slot 0 never filled: NaN, no tokens
    assert errors[1].rel_error == pytest.approx(0.01) and errors[1].cosine == pytest.approx(1.0)
    assert errors[2].growth == pytest.approx(4.0) and max_growth_layer(errors) == 1
    other.buf[2, 5, 0] = float("inf")
    errors = compare(s.buf, other.buf)
    assert errors[2].n_nonfinite == 1 and errors[2].n_tokens == 511 and max_growth_layer(errors) == 1


def test_max_growth_layer():
    def e(layer, rel, bad=0):
        return LayerError(layer, rel, rel, 1.0, 1.0, 10, bad)

    assert max_growth_layer(with_growth([e(-1, 1e-3), e(0, 2e-3), e(1, 8e-3), e(2, 9e-3)])) == 1
    assert max_growth_layer(with_growth([e(-1, 1e-3), e(0, 2e-3), e(1, 1e-1, bad=3), e(2, None, bad=10)])) == 1
    assert max_growth_layer(with_growth([e(-1, 0.0), e(0, 0.0)])) is None  # identical to the reference


def test_segmented_run_gives_the_same_diagnostics(tiny_llama, tmp_path, monkeypatch):
    from evalsuite.passes import reference

    _, one = _run(tiny_llama, tmp_path / "a")
    monkeypatch.setattr(reference, "FORCE", "hidden-states")  # not the measured rule: segments of 200 tokens
    many, num = _run(tiny_llama, tmp_path / "b", buffer_gib=200 * 64 * 4 / 2**30)  # kept in segments
    assert many.provenance["n_segments"] > 1
    for key in ("first_nonfinite", "weights", "verdicts"):
        assert num[key] == one[key], key
    first_segment = many.provenance["buffer_tokens"]  # the layer sample lies in the first segment
    assert num["settings"]["layer_sample"]["tokens"] <= first_segment < one["settings"]["layer_sample"]["tokens"]
    for name in ("fp16", "bf16"):
        errors = num["layer_error"][name]
        assert len(errors) == 3 and all(e["n_tokens"] == num["settings"]["layer_sample"]["tokens"] for e in errors)
    for a, b in zip(one["activations"], num["activations"], strict=True):  # max over segments = over all
        assert a["module"] == b["module"] and a["absmax"] == pytest.approx(b["absmax"], rel=1e-6)


# -- planted problems, end to end -------------------------------------------------------------

def test_fp16_fine_is_ok(tiny_llama, tmp_path):
    results, num = _run(tiny_llama, tmp_path)
    for name in ("fp16", "bf16"):
        m = results.dtypes[name].metrics
        assert m["verdict"] == "ok" and m["first_nonfinite_module"] is None
        assert m["weights_overflow"] == 0 and m["modules_near_overflow"] == 0 and m["min_headroom_bits"] > 10
        assert num["verdicts"][name]["reasons"] and "no overflow" in num["verdicts"][name]["reasons"][0]
    assert results.dtypes["fp32"].metrics["first_nonfinite_module"] is None
    # fp16 has 3 more mantissa bits than bf16: 8x smaller rounding error of weights and hidden states...
    totals = {d: num["weights"]["by_dtype"][d]["totals"] for d in ("fp16", "bf16")}
    assert totals["fp16"]["rel_err_mean"] < totals["bf16"]["rel_err_mean"] / 6
    assert results.dtypes["bf16"].metrics["weights_rel_err_max"] <= 2**-8  # round to nearest, normal range
    # ...but its narrower exponent range leaves a few tiny weights on subnormals, which lose more
    assert totals["fp16"]["subnormal"] > 0 and results.dtypes["fp16"].metrics["weights_rel_err_max"] > 2**-11
    assert num["layer_error"]["fp16"][-1]["rel_error"] < num["layer_error"]["bf16"][-1]["rel_error"] / 4
    json.dumps(results.to_dict(), allow_nan=False)  # the section is strict JSON


def test_planted_weight_past_65504(tmp_path):
    path = build_planted(tmp_path / "w", {DOWN1: 1e6})
    results, num = _run(path, tmp_path / "out")
    fp16, bf16 = results.dtypes["fp16"].metrics, results.dtypes["bf16"].metrics
    w = AutoModelForCausalLM.from_pretrained(path).get_parameter(DOWN1).detach()
    assert fp16["weights_overflow"] == int((w.abs() >= 65520).sum()) > 0  # 65504 < |w| < 65520 rounds down
    assert bf16["weights_overflow"] == 0
    problems = num["weights"]["by_dtype"]["fp16"]["problem_tensors"]
    assert problems[0]["name"] == DOWN1 and problems[0]["overflow"] == fp16["weights_overflow"]
    assert fp16["verdict"] == "broken" and bf16["verdict"] != "broken"
    reasons = " ".join(num["verdicts"]["fp16"]["reasons"])
    assert DOWN1 in reasons and "> 65504" in reasons and "BF16 or FP32" in reasons


def test_planted_activation_overflows_only_in_fp16(tmp_path):
    path = build_planted(tmp_path / "a", {DOWN0: 2e4})  # MLP output ~1.5e5; its weights stay < 13000
    results, num = _run(path, tmp_path / "out")
    fp16, bf16 = results.dtypes["fp16"].metrics, results.dtypes["bf16"].metrics
    assert fp16["weights_overflow"] == 0  # the weights fit: only the activation overflows
    assert fp16["first_nonfinite_module"] == "model.layers.0.mlp"  # before the residual add of layer 0
    assert bf16["first_nonfinite_module"] is None and results.dtypes["fp32"].metrics["first_nonfinite_module"] is None
    ff = num["first_nonfinite"]["fp16"]
    acts = {a["module"]: a for a in num["activations"]}
    assert ff["reference_absmax"] == acts["model.layers.0.mlp"]["absmax"] > 65504
    assert fp16["min_headroom_bits"] < 0 and fp16["modules_near_overflow"] > 0 and bf16["modules_near_overflow"] == 0
    assert fp16["layer_max_error_growth"] == 0
    assert fp16["verdict"] == "broken" and bf16["verdict"] == "ok"
    reason = num["verdicts"]["fp16"]["reasons"][0]
    assert reason.startswith("FP16 overflows at model.layers.0.mlp: reference activations reach 1.")
    assert "> 65504; serve this model in BF16 or FP32" in reason


def test_planted_near_overflow_is_degraded(tmp_path):
    path = build_planted(tmp_path / "n", {DOWN0: 5e3})  # MLP output ~3.8e4: finite, under 1 bit from 65504
    results, num = _run(path, tmp_path / "out")
    fp16 = results.dtypes["fp16"].metrics
    assert fp16["first_nonfinite_module"] is None and fp16["nonfinite_logits"] == 0
    assert 0 < fp16["min_headroom_bits"] < 1 and fp16["modules_near_overflow"] >= 1
    assert fp16["verdict"] == "degraded" and results.dtypes["bf16"].metrics["verdict"] == "ok"
    assert "bits of headroom at model.layers.0" in num["verdicts"]["fp16"]["reasons"][0]
    # the margin is the user's: at 0.5 bits nothing is flagged
    results, _ = _run(path, tmp_path / "out2", headroom_margin_bits=0.1)
    assert results.dtypes["fp16"].metrics["modules_near_overflow"] == 0


def test_planted_values_below_fp16_subnormal(tmp_path):
    o_proj, up = "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight"
    path = build_planted(tmp_path / "u", {o_proj: 1e-9, up: 1e-6})
    results, num = _run(path, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(path)
    want = {n: _weights_float64(model.get_parameter(n).detach().numpy().ravel(), FP16) for n in (o_proj, up)}
    assert want[o_proj]["flushed_zero"] == model.get_parameter(o_proj).numel()  # all below 2^-25: zero
    assert want[up]["subnormal"] > 0 and want[up]["flushed_zero"] > 0
    total = sum(p.numel() for p in model.parameters())
    fp16 = results.dtypes["fp16"].metrics
    planted = sum(w["flushed_zero"] + w["subnormal"] for w in want.values())
    others = sum(t["flushed_zero"] + t["subnormal"] for t in num["weights"]["by_dtype"]["fp16"]["problem_tensors"]
                 if t["name"] not in want)
    assert fp16["weights_underflow_frac"] == pytest.approx((planted + others) / total, rel=1e-12)
    tensors = {t["name"]: t for t in num["weights"]["by_dtype"]["fp16"]["problem_tensors"]}
    for n, w in want.items():
        assert (tensors[n]["flushed_zero"], tensors[n]["subnormal"]) == (w["flushed_zero"], w["subnormal"])
    assert results.dtypes["bf16"].metrics["weights_underflow_frac"] == 0  # BF16 keeps FP32's exponent range
    reason = num["verdicts"]["fp16"]["reasons"][0]
    assert fp16["verdict"] == "degraded" and "no overflow" not in reason
    assert any(f"100% of {n}'s values underflow in FP16" in reason for n in want) and "1 more tensor(s)" in reason


def test_stored_fp16_served_bf16_conversion(tmp_path):
    path = build_model(tmp_path / "half", "llama", seed=2, dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stats = conversion_stats(model, [BF16, FP16], "float16")
    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    changed = (x.to(torch.bfloat16).float() != x).sum().item()
    back = (x.to(torch.bfloat16).to(torch.float16).float() != x).sum().item()
    assert sum(t.changed for t in stats["bf16"]) == changed > 0
    assert sum(t.roundtrip_changed for t in stats["bf16"]) == back == changed  # 10 -> 7 mantissa bits: lost
    assert all(t.changed is None for t in stats["fp16"])  # served as stored: no conversion
    results, num = _run(path, tmp_path / "out")
    assert results.dtypes["bf16"].metrics["weights_changed_frac"] == pytest.approx(changed / x.numel())
    assert "weights_changed_frac" not in results.dtypes["fp16"].metrics
    assert num["weights"]["stored_dtype"] == "float16"


def test_cli_switch_and_report(tiny_llama, tmp_path):
    args = ["run", "--model", str(tiny_llama), "--device", "cpu", "--seq-len", "64", "--max-tokens", "300",
            "--no-progress", "--tasks", "none"]
    assert main([*args, "--out", str(tmp_path / "on"), "--headroom-margin-bits", "2"]) == 0
    on = json.loads((tmp_path / "on" / "results.json").read_text())
    assert on["config"]["numerics"] is True and on["numerics"]["settings"]["headroom_margin_bits"] == 2
    html = (tmp_path / "on" / "report.html").read_text()
    assert 'id="numerics"' in html and 'id="layers"' in html and 'id="headroom"' in html
    assert "no overflow" in html  # the verdict's reason, from numerics.verdicts
    assert main([*args, "--out", str(tmp_path / "off"), "--no-numerics"]) == 0
    off = json.loads((tmp_path / "off" / "results.json").read_text())
    assert "numerics" not in off and "verdict" not in off["dtypes"]["fp16"]["metrics"]
    assert off["config"]["numerics"] is False
    assert main([*args, "--out", str(tmp_path / "bad"), "--headroom-margin-bits", "nan"]) == 2


def test_resumed_run_keeps_the_numerics(tiny_llama, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    args = [sys.executable, "-m", "evalsuite", "run", "--model", str(tiny_llama), "--device", "cpu", "--seq-len",
            "64", "--max-tokens", "300", "--no-progress", "--tasks", "none"]
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    faultrun = str(Path(__file__).resolve().parents[1] / "faultrun.py")
    killed = [sys.executable, faultrun, "kill-after:fp16", *args[3:]]
    assert subprocess.run([*killed, "--out", str(tmp_path / "r")], capture_output=True).returncode != 0
    resumed = subprocess.run([*args, "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed" in resumed.stderr, resumed.stderr
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "r"))
    for key in ("activations", "layer_error", "first_nonfinite", "verdicts", "weights"):
        assert a["numerics"][key] == b["numerics"][key], key


# -- the real model ---------------------------------------------------------------------------

@pytest.mark.slow
def test_gemma_fp16_failure_is_located(demo_model, shared_dir, tmp_path):
    text = shared_dir / "data/peoples-daily-1998/199801.txt"
    cfg = _cfg(tmp_path, model=str(demo_model), corpus=CorpusSpec(source=str(text)), seq_len=256, max_tokens=256,
               batch_size=None)
    results, _ = run_pair(cfg, str(demo_model), observers=(NumericsObserver(cfg, str(demo_model)),))
    num = results.to_dict()["numerics"]
    fp16, bf16 = results.dtypes["fp16"].metrics, results.dtypes["bf16"].metrics
    module = fp16["first_nonfinite_module"]
    model_names = {n for n, _ in AutoModelForCausalLM.from_pretrained(demo_model).named_modules()}
    assert module in model_names and module.startswith("model.layers.")  # a real module, inside the decoder
    ff = num["first_nonfinite"]["fp16"]
    assert ff["reference_absmax"] > 65504  # the reference's residual stream there exceeds FP16's range
    assert fp16["verdict"] == "broken" and f"FP16 overflows at {module}" in num["verdicts"]["fp16"]["reasons"][0]
    assert fp16["modules_near_overflow"] > 0 and fp16["min_headroom_bits"] < 0
    # BF16 keeps FP32's exponent range: not broken, nothing near overflow, no inf/NaN anywhere
    assert bf16["verdict"] != "broken" and bf16["first_nonfinite_module"] is None
    assert bf16["modules_near_overflow"] == 0 and bf16["min_headroom_bits"] > 100
    assert bf16["weights_overflow"] == 0 and fp16["weights_overflow"] == 0
    assert all(e["n_nonfinite"] == 0 for e in num["layer_error"]["bf16"])
