"""Recipes applied to a tiny model, each checked against an independent computation.

The independent side never goes through model/convert.py: weights are rounded by hand from the
safetensors file, and the FP32 residual stream is written out as an explicit loop over
transformers' own submodules with the casts done by hand.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny import build_model, build_planted

from evalsuite.errors import ModelLoadError
from evalsuite.model.convert import load_recipe
from evalsuite.model.loading import load_model
from evalsuite.model.precision import DTYPES
from evalsuite.model.recipes import parse_recipe

CPU = torch.device("cpu")
IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


def _auto(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def bf16_stored(tmp_path_factory):
    """A checkpoint saved in BF16: the user's story (trained in FP16, saved in BF16)."""
    return build_model(tmp_path_factory.mktemp("bf16") / "m", "llama", seed=3, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Layer 1's MLP output reaches 1.3e5 > 65504 in the FP32 reference; its weights stay inside FP16's range."""
    return build_planted(tmp_path_factory.mktemp("planted") / "m", {"model.layers.1.mlp.down_proj.weight": 2e4})


def test_weight_only_bf16_equals_an_fp32_model_with_hand_rounded_weights(tiny_llama):
    by_hand = _auto(tiny_llama, torch.float32)
    with torch.no_grad():
        for p in by_hand.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    recipe = load_recipe(str(tiny_llama), parse_recipe("bf16@fp32"), CPU)
    assert all(p.dtype == torch.float32 for p in recipe.parameters())
    assert torch.equal(_logits(recipe), _logits(by_hand))
    assert not torch.equal(_logits(recipe), _logits(_auto(tiny_llama, torch.float32)))  # the rounding did something


@pytest.mark.parametrize("text, steps, final", [
    ("bf16@fp16", [torch.bfloat16], torch.float16),
    ("fp16@bf16", [torch.float16], torch.bfloat16),
    ("bf16@fp16@fp32", [torch.bfloat16, torch.float16], torch.float32),
    ("fp32@fp16", [], torch.float16),
])
@pytest.mark.parametrize("checkpoint", ["tiny_llama", "bf16_stored"])
def test_chain_weights_equal_hand_rounded_weights_bit_for_bit(text, steps, final, checkpoint, request):
    path = request.getfixturevalue(checkpoint)
    stored = load_file(path / "model.safetensors")
    model = load_recipe(str(path), parse_recipe(text), CPU)
    params = dict(model.named_parameters())
    assert set(stored) == set(params)
    for name, value in stored.items():
        want = value.to(torch.float32)
        for dtype in steps:
            want = want.to(dtype).to(torch.float32)
        want = want.to(final)
        assert params[name].dtype == final and torch.equal(params[name].detach(), want), name


def test_plain_recipes_load_exactly_as_before(tiny_llama):
    for name in ("fp16", "bf16", "fp32"):
        a, b = load_recipe(str(tiny_llama), parse_recipe(name), CPU), load_model(str(tiny_llama), DTYPES[name], CPU)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _watch(model) -> dict[str, torch.dtype]:
    """Forward hooks recording the dtype of every module's (first) output."""
    seen: dict[str, torch.dtype] = {}

    def hook(name):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor):
                seen.setdefault(name, out.dtype)
        return record

    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(hook(name))
    return seen


def _param_dtypes(model) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters(remove_duplicate=False)}


def test_residual_stream_keeps_the_stream_in_fp32(tiny_llama):
    model = load_recipe(str(tiny_llama), parse_recipe("fp16+res32:1"), CPU)
    out = _watch(model)
    _logits(model)
    params = _param_dtypes(model)
    for name, dtype in params.items():
        stream = name.startswith(("model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                                  "model.norm"))
        assert dtype == (torch.float32 if stream else torch.float16), name
    assert out["model.layers.0"] == torch.float16 and out["model.layers.1"] == torch.float32
    assert out["model.layers.1.input_layernorm"] == torch.float32 and out["model.norm"] == torch.float32
    assert out["model.layers.1.self_attn.q_proj"] == torch.float16 and out["model.layers.1.mlp.down_proj"] == torch.float16
    assert out["model.layers.1.mlp"] == torch.float32  # cast at its boundary, back into the stream
    assert out["lm_head"] == torch.float16


def test_residual_stream_from_layer_0_includes_the_embedding_and_unties_nothing_it_should_not(tiny_llama):
    model = load_recipe(str(tiny_llama), parse_recipe("fp16+res32"), CPU)
    out = _watch(model)
    _logits(model)
    assert out["model.embed_tokens"] == torch.float32 and out["model.layers.0"] == torch.float32
    assert _param_dtypes(model)["lm_head.weight"] == torch.float16


@pytest.mark.parametrize("start", [0, 1])
def test_residual_stream_equals_an_explicit_loop_over_the_submodules(tiny_llama, start):
    """The recipe's logits equal a hand-written forward: stream, norms and adds in FP32, attention/MLP in FP16."""
    recipe = load_recipe(str(tiny_llama), parse_recipe(f"fp16+res32:{start}"), CPU)
    m = _auto(tiny_llama, torch.float16)
    inner = m.model
    pos = torch.arange(IDS.shape[1])[None].expand(IDS.shape[0], -1)
    with torch.no_grad():
        h = inner.embed_tokens.float()(IDS) if start == 0 else inner.embed_tokens(IDS)
        for i, layer in enumerate(inner.layers):
            if i < start:
                h = layer(h, position_embeddings=inner.rotary_emb(h, pos), attention_mask=None)
                continue
            h = h.float()
            cos, sin = inner.rotary_emb(h, pos)
            attn = layer.self_attn(hidden_states=layer.input_layernorm.float()(h).half(),
                                   position_embeddings=(cos.half(), sin.half()), attention_mask=None)[0]
            h = h + attn.float()
            h = h + layer.mlp(layer.post_attention_layernorm.float()(h).half()).float()
        by_hand = m.lm_head(inner.norm.float()(h).half())
    assert torch.equal(_logits(recipe), by_hand)
    assert not torch.equal(by_hand, _logits(_auto(tiny_llama, torch.float16)))  # and differs from plain FP16


def test_island_computes_in_fp32_with_casts_at_its_boundary(tiny_llama):
    model = load_recipe(str(tiny_llama), parse_recipe("fp16+fp32:layers.1.mlp"), CPU)
    out = _watch(model)
    _logits(model)
    for name, dtype in _param_dtypes(model).items():
        assert dtype == (torch.float32 if name.startswith("model.layers.1.mlp.") else torch.float16), name
    assert out["model.layers.1.mlp.down_proj"] == torch.float32  # inside: FP32
    assert out["model.layers.1.mlp"] == torch.float16 and out["model.layers.1"] == torch.float16  # cast back
    by_hand = _auto(tiny_llama, torch.float16)  # the same, written out: the MLP run in FP32 on FP16 weights
    mlp = by_hand.model.layers[1].mlp.float()
    mlp.register_forward_pre_hook(lambda mod, args: (args[0].float(),))
    mlp.register_forward_hook(lambda mod, args, output: output.half())
    assert torch.equal(_logits(model), _logits(by_hand))


def test_patterns_with_any_segment_select_every_layer(tiny_llama):
    model = load_recipe(str(tiny_llama), parse_recipe("fp16+fp32:layers.%.self_attn"), CPU)
    dtypes = _param_dtypes(model)
    assert all(d == torch.float32 for n, d in dtypes.items() if ".self_attn." in n)
    assert all(d == torch.float16 for n, d in dtypes.items() if ".self_attn." not in n)


def test_tied_embedding_is_untied_when_its_two_ends_need_two_formats(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path / "tied"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, tie_word_embeddings=True))
    model.save_pretrained(path)
    converted = load_recipe(str(path), parse_recipe("fp16+res32"), CPU)
    assert converted.model.embed_tokens.weight.dtype == torch.float32
    assert converted.lm_head.weight.dtype == torch.float16
    assert torch.equal(converted.lm_head.weight.float(), converted.model.embed_tokens.weight)


def test_clamp_is_transformers_fp16_clamp_on_each_layer_output(planted):
    plain, clamped = load_model(str(planted), DTYPES["fp16"], CPU), load_recipe(str(planted), parse_recipe("fp16+clamp"), CPU)
    seen_plain, seen_clamped = {}, {}
    plain.model.layers[1].register_forward_hook(lambda m, a, o: seen_plain.setdefault("out", o))
    clamped.model.layers[1].register_forward_hook(lambda m, a, o: seen_clamped.setdefault("out", o))
    _logits(plain), _logits(clamped)
    raw = seen_plain["out"]
    assert torch.isinf(raw).any()  # the planted overflow
    limit = torch.finfo(torch.float16).max - 1000  # where an inf is present (T5LayerFF's rule)
    assert torch.equal(seen_clamped["out"], torch.clamp(raw, -limit, limit))


def test_clamp_leaves_finite_layers_alone(tiny_llama):
    a, b = load_model(str(tiny_llama), DTYPES["fp16"], CPU), load_recipe(str(tiny_llama), parse_recipe("fp16+clamp"), CPU)
    assert torch.equal(_logits(a), _logits(b))


@pytest.mark.parametrize("text, words", [("fp16+fp32:layers.9.mlp", "no module of this model matches"),
                                         ("fp16+res32:5", "has 2 (0 to 1)")])
def test_a_recipe_this_model_cannot_take_is_one_line(tiny_llama, text, words):
    with pytest.raises(ModelLoadError) as info:
        load_recipe(str(tiny_llama), parse_recipe(text), CPU)
    assert words in str(info.value) and "\n" not in str(info.value)
