"""Verdicts: the word, and reasons a user can act on, from metrics and numerics evidence (no model)."""

from __future__ import annotations

import pytest

from evalsuite.model.precision import DTYPES
from evalsuite.numerics.verdict import Evidence, Thresholds, decide, limit, num, serve_in

FP16, BF16 = DTYPES["fp16"], DTYPES["bf16"]
CLEAN = {"nonfinite_logits": 0, "nonfinite_tokens": 0, "n_tokens": 512, "kl_mean": 1.1e-3, "kl_p99": 4e-3,
         "top1_agreement": 0.97, "ppl_ratio": 1.004, "ppl_ratio_se": 0.002, "noise_kl_mean": 0.0,
         "noise_kl_p99": 0.0, "noise_top1_agreement": 1.0}
SAFE = ["fp16", "bf16", "fp32"]


def test_ok_says_why():
    v = decide(BF16, CLEAN, Evidence(), SAFE)
    assert v.word == "ok" and "KL mean 0.0011 nats" in v.reasons[0] and "97.0%" in v.reasons[0]


def test_overflow_located_is_broken_and_names_the_fix():
    m = {**CLEAN, "nonfinite_logits": 10**6, "nonfinite_tokens": 256, "n_tokens": 256}
    ev = Evidence(first_failure={"module": "model.layers.7", "reference_absmax": 68398.47})
    v = decide(FP16, m, ev, ["bf16", "fp32"])
    assert v.word == "broken"
    assert v.reasons[0] == ("FP16 overflows at model.layers.7: reference activations reach 6.84e4 > 65504; "
                            "serve this model in BF16 or FP32")
    assert v.reasons[1] == "FP16 gives non-finite logits on 256 of 256 tokens"


def test_overflow_inside_a_module_is_explained():
    ev = Evidence(first_failure={"module": "model.layers.3.self_attn", "reference_absmax": 812.0})
    v = decide(FP16, CLEAN, ev, SAFE)  # outputs within range: the inf arises inside the module
    assert v.word == "broken" and "although the reference output there stays within range (up to 812)" in v.reasons[0]
    assert "serve this model in BF16 or FP32" in v.reasons[0]  # never suggests the broken dtype itself


def test_nonfinite_logits_alone_are_broken():
    v = decide(FP16, {**CLEAN, "nonfinite_logits": 3, "nonfinite_tokens": 1}, Evidence(), ["fp32"])
    assert v.word == "broken" and v.reasons == ("FP16 gives non-finite logits on 1 of 512 tokens; serve this model in FP32",)


def test_weight_overflow_is_broken():
    ev = Evidence(overflow_tensors=({"name": "model.layers.1.mlp.down_proj.weight", "overflow": 12, "absmax": 9.1e5},))
    v = decide(FP16, CLEAN, ev, SAFE)
    assert v.word == "broken"
    assert v.reasons[0].startswith("12 weight value(s) overflow to inf when cast to FP16 "
                                   "(model.layers.1.mlp.down_proj.weight reaches 9.1e5 > 65504)")


@pytest.mark.parametrize("change, flagged", [
    ({"kl_mean": 0.03}, "KL mean 0.03 nats > 0.01"),
    ({"kl_p99": 0.5}, "KL p99 0.5 nats > 0.1"),
    ({"top1_agreement": 0.9}, "top-1 agreement 90.0% < 95%"),
    ({"ppl_ratio": 1.05, "ppl_ratio_se": 0.01}, "perplexity ratio 1.0500 > 1.01"),
])
def test_divergence_beyond_bounds_is_degraded(change, flagged):
    ev = Evidence(growth={"layer": 5, "factor": 9.0})
    v = decide(BF16, {**CLEAN, **change}, ev, SAFE)
    assert v.word == "degraded" and flagged in v.reasons[0]
    assert "grows most at decoder layer 5 (x9)" in v.reasons[0] and v.reasons[0].endswith(
        "check BF16 on your own task, or serve this model in FP16 or FP32")


@pytest.mark.parametrize("change", [
    {"kl_mean": 0.03, "noise_kl_mean": 0.01},  # within 10x the noise floor: not distinguishable
    {"top1_agreement": 0.9, "noise_top1_agreement": 0.95},
    {"ppl_ratio": 1.05, "ppl_ratio_se": 0.03},  # within 2 standard errors of 1
    {"kl_mean": 0.009},  # within the bound
])
def test_divergence_within_noise_or_bounds_is_ok(change):
    assert decide(BF16, {**CLEAN, **change}, Evidence(), SAFE).word == "ok"


def test_missing_noise_floor_uses_the_bounds_alone():
    m = {k: v for k, v in CLEAN.items() if not k.startswith("noise_")} | {"kl_mean": 0.02}
    assert decide(BF16, m, Evidence(), SAFE).word == "degraded"


def test_near_overflow_is_degraded():
    near = ({"module": "model.layers.0.mlp", "absmax": 38000.0, "headroom_bits": 0.785},
            {"module": "model.layers.0", "absmax": 37000.0, "headroom_bits": 0.82})
    v = decide(FP16, CLEAN, Evidence(near_overflow=near), SAFE, Thresholds(margin_bits=1.0))
    assert v.word == "degraded"
    assert v.reasons[0] == ("FP16 has 0.79 bits of headroom at model.layers.0.mlp: reference activations reach "
                            "3.8e4, close to FP16's max 65504 (1 more module(s) within 1 bit(s)); longer or "
                            "different inputs may overflow: serve this model in BF16 or FP32, or test FP16 on "
                            "your own data")


def test_underflowing_tensor_is_degraded():
    ev = Evidence(underflow_tensors=({"name": "model.norm.weight", "underflow_frac": 0.4},))
    v = decide(FP16, CLEAN, ev, SAFE)
    assert v.word == "degraded" and v.reasons[0].startswith("40% of model.norm.weight's values underflow in FP16")


def test_broken_overrides_degraded_reasons():
    ev = Evidence(first_failure={"module": "lm_head", "reference_absmax": 9e4},
                  near_overflow=({"module": "lm_head", "absmax": 9e4, "headroom_bits": -0.46},))
    v = decide(FP16, {**CLEAN, "kl_mean": 0.5}, ev, SAFE)
    assert v.word == "broken" and len(v.reasons) == 1 and "lm_head" in v.reasons[0]


def test_formatting():
    assert [num(x) for x in (68398.47, 9876, 0.0011, 2.8e-6, 1.5, 3.39e38, None)] == \
        ["6.84e4", "9876", "0.0011", "2.8e-6", "1.5", "3.39e38", "None"]
    assert (limit(FP16), limit(BF16)) == ("65504", "3.39e38")  # a dtype's range, as users know it
    assert serve_in(["bf16"]) == "serve this model in BF16"
    assert serve_in(["fp16", "bf16", "fp32"]) == "serve this model in FP16, BF16 or FP32"
