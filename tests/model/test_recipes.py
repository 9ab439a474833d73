"""The --dtypes recipe grammar: every form parsed, normalised and described; malformed ones in one line."""

from __future__ import annotations

import pytest
import torch

from evalsuite.errors import UsageError
from evalsuite.model.precision import DTYPES, FORMATS, Island, pass_flags, tf32_compute, unsupported_reason
from evalsuite.model.recipes import matches, module_formats, parse_recipe, weights_format

F32, F16, B16 = FORMATS["fp32"], FORMATS["fp16"], FORMATS["bf16"]

# text -> (name, storage, compute, tf32, residual_fp32_from, islands, clamp)
FORMS = {
    "fp16": ("fp16", (F16,), F16, False, None, (), False),
    "FP16@fp16": ("fp16", (F16,), F16, False, None, (), False),
    "bf16": ("bf16", (B16,), B16, False, None, (), False),
    "fp32": ("fp32", (F32,), F32, False, None, (), False),
    "tf32": ("tf32", (F32,), F32, True, None, (), False),
    "bf16@tf32": ("bf16@tf32", (B16,), F32, True, None, (), False),
    "bf16@fp16": ("bf16@fp16", (B16,), F16, False, None, (), False),
    "fp16@bf16": ("fp16@bf16", (F16,), B16, False, None, (), False),
    "bf16@fp32": ("bf16@fp32", (B16,), F32, False, None, (), False),
    "fp16@fp32": ("fp16@fp32", (F16,), F32, False, None, (), False),
    "bf16@bf16@fp16": ("bf16@fp16", (B16,), F16, False, None, (), False),  # rounding twice is rounding once
    "bf16@fp16@fp32": ("bf16@fp16@fp32", (B16, F16), F32, False, None, (), False),
    "fp32@fp16": ("fp32@fp16", (F32,), F16, False, None, (), False),
    "fp16+res32": ("fp16+res32", (F16,), F16, False, 0, (), False),
    "fp16+res32:0": ("fp16+res32", (F16,), F16, False, 0, (), False),
    "fp16+res32:7": ("fp16+res32:7", (F16,), F16, False, 7, (), False),
    "fp16+fp32:layers.7.mlp": ("fp16+fp32:layers.7.mlp", (F16,), F16, False, None,
                               (Island("layers.7.mlp", F32),), False),
    "bf16+fp16:layers.%.self_attn": ("bf16+fp16:layers.%.self_attn", (B16,), B16, False, None,
                                     (Island("layers.%.self_attn", F16),), False),
    "fp16+clamp": ("fp16+clamp", (F16,), F16, False, None, (), True),
    "fp16+CLAMP+res32:3": ("fp16+res32:3+clamp", (F16,), F16, False, 3, (), True),
    "bf16@fp16+fp32:mlp+res32:2+fp32:mlp": ("bf16@fp16+res32:2+fp32:mlp", (B16,), F16, False, 2,
                                            (Island("mlp", F32),), False),
}


@pytest.mark.parametrize("text", list(FORMS))
def test_each_form_parses_to_its_record(text):
    name, storage, compute, tf32, res, islands, clamp = FORMS[text]
    p = parse_recipe(text)
    assert (p.name, p.storage, p.compute, p.tf32, p.residual_fp32_from, p.islands, p.clamp) == \
        (name, storage, compute, tf32, res, islands, clamp)
    assert parse_recipe(p.name) == p  # the normalised name is itself a recipe, of the same record
    d = p.describe()
    assert d["storage"] == [f.name for f in storage] and d["compute"] == compute.name and d["tf32"] is tf32
    assert d["residual_fp32_from"] == res and d["clamp"] is clamp
    assert d["islands"] == [{"pattern": i.pattern, "dtype": i.format.name} for i in islands]
    assert isinstance(d["summary"], str) and d["summary"]


def test_plain_names_are_the_plain_dtypes():
    for name in ("fp16", "bf16", "fp32"):
        p = parse_recipe(name)
        assert p == DTYPES[name] and p.is_plain
    for text in ("bf16@fp16", "fp16@fp32", "fp16+res32", "fp16+clamp", "tf32", "fp32@fp16"):
        assert not parse_recipe(text).is_plain, text


def test_is_half_and_ranges_follow_the_compute_format():
    assert parse_recipe("bf16@fp16").is_half and parse_recipe("bf16@fp16").finite_max == 65504.0
    assert parse_recipe("fp16+res32").is_half
    assert not parse_recipe("fp16@fp32").is_half and not parse_recipe("tf32").is_half
    assert parse_recipe("fp16@bf16").finite_max == torch.finfo(torch.bfloat16).max


def test_summaries_say_what_the_recipe_does():
    assert parse_recipe("bf16@fp16").describe()["summary"] == "weights rounded to BF16; computed in FP16"
    text = parse_recipe("fp16+res32:7+fp32:layers.7.mlp").describe()["summary"]
    assert "FP32 residual stream from decoder layer 7" in text and "layers.7.mlp in FP32" in text


BAD = ["fp8", "", "fp16 bf16", "fp16>bf16", "fp16@", "@fp16", "tf32@fp16", "fp16+", "fp16+res32:x",
       "fp16+res32+res32:3", "bf16+clamp", "fp16@fp32+clamp", "tf32+res32", "fp16+fp32:layers.*.mlp",
       "fp16+fp32:", "fp16+fp32:layers..mlp", "fp16+int8:mlp", "fp16+clamp:3", "fp16+fp32:layers.[7].mlp"]


@pytest.mark.parametrize("text", BAD)
def test_malformed_recipes_are_one_line_listing_the_valid_forms(text):
    with pytest.raises(UsageError) as info:
        parse_recipe(text)
    msg = str(info.value)
    assert "\n" not in msg and repr(text) in msg
    assert "fp32, fp16, bf16, tf32" in msg and "STORAGE@...@COMPUTE" in msg and "res32:LAYER" in msg


def test_patterns_match_whole_segments_at_the_end():
    assert matches("layers.7.mlp", "model.layers.7.mlp")
    assert matches("mlp", "model.layers.3.mlp") and not matches("mlp", "model.layers.3.mlp.down_proj")
    assert matches("layers.%.mlp", "model.layers.12.mlp") and not matches("layers.%.mlp", "model.layers.12")
    assert not matches("layers.1.mlp", "model.layers.11.mlp")  # segments, not substrings
    assert not matches("a.model.layers.1", "model.layers.1")


WATCHED = [("model.embed_tokens", "embedding", None), ("model.layers.0.input_layernorm", "norm", 0),
           ("model.layers.0.self_attn", "attention", 0), ("model.layers.0.mlp", "mlp", 0), ("model.layers.0", "layer", 0),
           ("model.layers.1.self_attn.q_norm", "norm", 1), ("model.layers.1.self_attn", "attention", 1),
           ("model.layers.1.input_layernorm", "norm", 1), ("model.layers.1.mlp", "mlp", 1), ("model.layers.1", "layer", 1),
           ("model.norm", "norm", None), ("lm_head", "lm_head", None)]


def test_formats_each_module_hands_on():
    f = module_formats(parse_recipe("fp16+res32:1"), WATCHED)
    assert [f[n].name for n, _, _ in WATCHED] == ["fp16", "fp16", "fp16", "fp16", "fp16",
                                                  "fp16", "fp16", "fp32", "fp16", "fp32", "fp32", "fp16"]
    f = module_formats(parse_recipe("fp16+res32"), WATCHED)
    assert f["model.embed_tokens"] == F32 and f["model.layers.0"] == F32 and f["model.layers.0.mlp"] == F16
    # an island's output is cast back to the format around it: FP16 outside the stream, FP32 inside it
    f = module_formats(parse_recipe("fp16+fp32:layers.%.mlp+res32:1"), WATCHED)
    assert f["model.layers.0.mlp"] == F16 and f["model.layers.1.mlp"] == F32
    f = module_formats(parse_recipe("fp16+fp32:layers.1.self_attn"), WATCHED)
    assert f["model.layers.1.self_attn.q_norm"] == F32 and f["model.layers.1.self_attn"] == F16
    assert module_formats(parse_recipe("fp16+fp32:lm_head"), WATCHED)["lm_head"] == F32  # logits leave as computed
    assert set(module_formats(DTYPES["bf16"], WATCHED).values()) == {B16}


def test_weights_format_is_the_single_rounding():
    assert weights_format(parse_recipe("fp16@fp32")) == F16 and weights_format(parse_recipe("fp16+res32:3")) == F16
    assert weights_format(parse_recipe("bf16@fp16")) is None and weights_format(parse_recipe("bf16")) == B16


def test_tf32_needs_an_ampere_gpu():
    reason = unsupported_reason(parse_recipe("tf32"), torch.device("cpu"))
    assert reason and "TF32" in reason and "8.0" in reason
    assert unsupported_reason(parse_recipe("bf16@fp32"), torch.device("cpu")) is None


def test_tf32_flags_are_set_for_the_pass_and_restored():
    before = pass_flags_now()
    with tf32_compute() as flags:
        assert flags["cuda_matmul_allow_tf32"] is True and flags["cudnn_allow_tf32"] is True
        assert flags["cuda_matmul_allow_fp16_reduced_precision_reduction"] is False
    assert pass_flags_now() == before
    with pass_flags(parse_recipe("tf32")) as flags:
        assert flags["cuda_matmul_allow_tf32"] is True
    with pass_flags(parse_recipe("fp16")) as flags:
        assert flags == before  # every other precision runs under the process's own flags


def pass_flags_now() -> dict:
    from evalsuite.model.precision import numeric_flags

    return numeric_flags()
