"""The repair search as plain functions: candidates from the findings, pruning, choice, and its sentences.

A fake `measure` stands in for the passes: it declares a recipe finite exactly when it covers a
planted overflow, so the test knows the one right answer.
"""

from __future__ import annotations

import math

from evalsuite.model.precision import FORMATS
from evalsuite.model.recipes import parse_recipe
from evalsuite.numerics import repair

FP16 = parse_recipe("fp16")


def _modules(n_layers: int, absmax: dict[str, float]) -> list[dict]:
    """Findings' module list in execution order, with headroom under FP16."""
    out = [{"module": "model.embed_tokens", "kind": "embedding", "layer": None}]
    for i in range(n_layers):
        for kind, child in (("attention", "self_attn"), ("mlp", "mlp")):
            out.append({"module": f"model.layers.{i}.{child}", "kind": kind, "layer": i})
        out.append({"module": f"model.layers.{i}", "kind": "layer", "layer": i})
    out += [{"module": "model.norm", "kind": "norm", "layer": None}, {"module": "lm_head", "kind": "lm_head", "layer": None}]
    for m in out:
        m["absmax"] = absmax.get(m["module"], 10.0)
        m["headroom_bits"] = math.log2(65504.0 / m["absmax"])
    return out


def _findings(n_layers, absmax, first):
    return {"first_failure": first, "modules": _modules(n_layers, absmax), "margin_bits": 1.0}


def _fake_measure(findings, covers):
    """measure(recipe): finite iff covers(recipe); the cost is what passes/repair.py would count."""
    calls = []

    def measure(p):
        calls.append(p.name)
        ok = covers(p)
        h, where = repair.headroom(p, findings["modules"])
        layers = 0 if p.residual_fp32_from is None else 6 - p.residual_fp32_from
        return repair.Outcome(p, {"n_tokens": 100, "nonfinite_tokens": 0 if ok else 40, "kl_mean": 0.001},
                              None if ok else {"module": "model.layers.4", "kind": "layer", "layer": 4}, h, where,
                              (len(p.islands) * 1000 + (64 if p.residual_fp32_from is not None else 0), layers))
    return measure, calls


def test_residual_overflow_is_repaired_by_a_stream_from_the_layer_at_risk():
    # the residual stream grows past FP16's range at layer 4 (7e4) and stays there; layer 3 comes within 1 bit
    absmax = {"model.layers.3": 4.0e4, "model.layers.4": 7.0e4, "model.layers.5": 9.0e4}
    findings = _findings(6, absmax, {"module": "model.layers.4", "kind": "layer", "layer": 4})
    measure, calls = _fake_measure(findings, lambda p: p.residual_fp32_from is not None and p.residual_fp32_from <= 4)
    outcomes = repair.search(FP16, findings, measure)
    chosen, kind = repair.choose(outcomes, 1.0)
    assert kind == "safe" and chosen.recipe.name == "fp16+res32:3"  # layer 3 lacks the margin: the stream starts there
    tried = {o.recipe.name: o for o in outcomes}
    assert "fp16+clamp" in tried and "fp16+fp32:model.layers.4" in tried  # the cheaper tries, measured and rejected
    # the latest start that can work is short of headroom at layer 3 (0.71 bits, from the reference's
    # activations): it cannot be safe, so pruning lists it without a pass
    later = tried["fp16+res32:4"]
    assert not later.measured and "fp16+res32:4" not in calls
    assert not later.finite and not repair.is_safe(later, 1.0) and later.tight_module == "model.layers.3"
    assert later.min_headroom_bits == math.log2(65504.0 / 4.0e4)
    assert repair.rejection(later, 1.0, chosen).startswith("not measured: 0.71 bits of headroom at model.layers.3")
    assert len(calls) == len(set(calls)) <= repair.REPAIR_PASSES


def test_a_block_that_overflows_gets_an_island_and_nothing_more():
    absmax = {"model.layers.2.mlp": 1.3e5, "model.layers.2": 1.3e5, "model.layers.3": 1.3e5}
    findings = _findings(4, absmax, {"module": "model.layers.2.mlp", "kind": "mlp", "layer": 2})

    def covers(p):
        return (p.residual_fp32_from is not None and p.residual_fp32_from <= 2
                and any(i.pattern == "model.layers.2.mlp" for i in p.islands))

    measure, _ = _fake_measure(findings, covers)
    outcomes = repair.search(FP16, findings, measure)
    chosen, kind = repair.choose(outcomes, 1.0)
    assert kind == "safe" and chosen.recipe.residual_fp32_from == 2
    assert [(i.pattern, i.format) for i in chosen.recipe.islands] == [("model.layers.2.mlp", FORMATS["fp32"])]
    # the island was tried away and put back: without it the stream alone is not finite
    assert any(o.recipe.name == "fp16+res32:2" and not o.finite for o in outcomes)


def test_a_failure_before_the_stream_moves_its_start_earlier():
    findings = _findings(6, {"model.layers.4": 7e4}, {"module": "model.layers.4", "kind": "layer", "layer": 4})

    def measure(p):
        start = p.residual_fp32_from
        ok = start is not None and start <= 1
        fail = None if ok else {"module": "model.layers.1", "kind": "layer", "layer": 1}
        h, where = repair.headroom(p, findings["modules"])
        return repair.Outcome(p, {"n_tokens": 10, "nonfinite_tokens": 0 if ok else 3}, fail, h, where, (0, 0))

    chosen, kind = repair.choose(repair.search(FP16, findings, measure), 1.0)
    assert kind == "safe" and chosen.recipe.residual_fp32_from == 1


def test_nothing_works_within_the_budget():
    findings = _findings(3, {"model.layers.1": 7e4}, {"module": "model.layers.1", "kind": "layer", "layer": 1})
    measure, calls = _fake_measure(findings, lambda p: False)
    outcomes = repair.search(FP16, findings, measure, max_passes=3)
    assert len(outcomes) == 3 and repair.choose(outcomes, 1.0) == (None, "none")


def test_clamp_is_only_tried_for_fp16_compute():
    findings = _findings(2, {"model.layers.1": 1e39}, {"module": "model.layers.1", "kind": "layer", "layer": 1})
    measure, calls = _fake_measure(findings, lambda p: p.residual_fp32_from is not None)
    repair.search(parse_recipe("bf16"), findings, measure)
    assert not any("clamp" in c for c in calls)


def test_headroom_uses_the_recipe_formats():
    mods = _modules(2, {"model.layers.1": 7e4, "model.layers.1.mlp": 3e4})
    assert repair.headroom(FP16, mods) == (math.log2(65504 / 7e4), "model.layers.1")
    h, where = repair.headroom(parse_recipe("fp16+res32:1"), mods)  # the layer's output is FP32 now
    assert where == "model.layers.1.mlp" and h == math.log2(65504 / 3e4)


def test_price_sentence_names_the_fix_and_the_comparison():
    o = repair.Outcome(parse_recipe("fp16+res32:7"), {"n_tokens": 2048, "nonfinite_tokens": 0, "kl_mean": 0.0021,
                                                      "kl_p99": 0.02, "top1_agreement": 0.981, "tokens_per_s": 1234.0,
                                                      "peak_memory_gib": None}, None, 3.0, "x")
    text = repair.price(o, {"nonfinite_tokens": 312, "tokens_per_s": 1400.0}, {"bf16": {"kl_mean": 0.0013}})
    assert text == ("0 non-finite tokens over 2048 (FP16: 312), KL mean 0.0021 nats (BF16: 0.0013), KL p99 0.02, "
                    "top-1 98.1%, 1234 tok/s (FP16: 1400)")
    assert repair.phrase(o.recipe, FP16) == "FP16 with an FP32 residual stream from layer 7"
