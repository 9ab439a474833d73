"""Recipes and repair through whole runs: results keyed by recipe, the weights/compute split, the repair.

Every figure the run reports is recomputed here another way: KL means with numpy float64 from the
per-token arrays or from logits computed by calling the models directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import fp32_gemm_linears, run_config, run_pair
from tiny import build_planted

from evalsuite.cli import main
from evalsuite.model.convert import load_recipe
from evalsuite.model.recipes import parse_recipe
from evalsuite.store.results import load_results, write_results

FAST = ["--device", "cpu", "--seq-len", "64", "--max-tokens", "320", "--no-progress", "--tasks", "none",
        "--no-reference-cache"]
RECIPES = ["fp16", "bf16@fp16", "fp16@fp32", "fp16+res32"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Layer 1's MLP output reaches 1.3e5 > 65504 in FP32; its weights stay inside FP16's range."""
    return build_planted(tmp_path_factory.mktemp("planted") / "m", {"model.layers.1.mlp.down_proj.weight": 2e4})


@pytest.fixture(scope="module")
def recipe_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipes") / "out"
    rc = main(["run", "--model", str(tiny_llama), "--dtypes", ",".join(RECIPES), "--out", str(out), *FAST])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    with np.load(out / "per_token.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return out, data, arrays


def test_results_are_keyed_by_recipe_with_their_descriptions(recipe_run):
    _, data, arrays = recipe_run
    assert data["schema_version"] == 2 and data["config"]["dtypes"] == RECIPES
    assert list(data["dtypes"]) == ["fp32", *RECIPES]
    for name in RECIPES:
        d = data["dtypes"][name]
        assert d["status"] == "ok" and d["recipe"] == parse_recipe(name).describe()
        assert d["metrics"]["kl_mean"] == pytest.approx(float(np.mean(arrays[f"{name}/kl"])), rel=1e-12)
    assert data["dtypes"]["bf16@fp16"]["recipe"]["storage"] == ["bf16"]
    assert data["dtypes"]["fp16+res32"]["recipe"]["residual_fp32_from"] == 0
    assert set(data["provenance"]["test_flags"]) == set(RECIPES)  # the flags in force, per precision
    assert data["dtypes"]["fp16@fp32"]["metrics"]["kl_mean"] > 0  # the weights alone cost something


def test_weights_and_compute_split_from_the_per_token_arrays(recipe_run):
    _, data, arrays = recipe_run
    split = data["recipe_attribution"]["fp16"]
    kl16, kl_w = float(np.mean(arrays["fp16/kl"])), float(np.mean(arrays["fp16@fp32/kl"]))
    assert split["weights_recipe"] == "fp16@fp32" and split["exact"] is True
    assert split["kl_mean"]["weights"] == pytest.approx(kl_w, rel=1e-12)
    assert split["kl_mean"]["compute"] == pytest.approx(kl16 - kl_w, rel=1e-9, abs=1e-15)
    d16 = float(np.mean(arrays["fp16/nll"] - arrays["fp32/nll"]))
    dw = float(np.mean(arrays["fp16@fp32/nll"] - arrays["fp32/nll"]))
    assert split["delta_nll"]["total"] == pytest.approx(d16, rel=1e-9)
    assert split["delta_nll"]["compute"] == pytest.approx(d16 - dw, rel=1e-9, abs=1e-15)
    # bf16@fp16's exact counterpart (bf16@fp16@fp32) did not run, nor its stored half bf16@fp32: no split
    assert "bf16@fp16" not in data["recipe_attribution"]
    assert "fp16+res32" in data["recipe_attribution"]  # its weights are fp16@fp32's too


def test_report_shows_the_recipes_table_and_chains(recipe_run):
    out, data, _ = recipe_run
    html = (out / "report.html").read_text()
    assert 'id="recipes"' in html and "bf16@fp16" in html and "weights rounded to BF16" in html
    assert "compute share" in html


def test_version_1_results_still_load_and_render(recipe_run, tmp_path):
    _, data, _ = recipe_run
    old = {k: v for k, v in data.items() if k != "recipe_attribution"}
    old["schema_version"] = 1
    old["dtypes"] = {n: {k: v for k, v in d.items() if k != "recipe"} for n, d in data["dtypes"].items()}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    loaded = load_results(path)
    assert loaded.schema_version == 1 and loaded.dtypes["fp16"].recipe is None
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 0
    assert main(["gate", str(path), "--gate", "default"]) in (0, 1)


def test_tf32_is_skipped_with_a_message_on_cpu(tiny_llama, tmp_path):
    cfg = run_config(tmp_path / "o", dtypes=(parse_recipe("tf32"), parse_recipe("bf16")), max_tokens=128,
                     numerics=False)
    results, _ = run_pair(cfg, str(tiny_llama))
    assert results.dtypes["tf32"].status == "skipped" and "TF32" in results.dtypes["tf32"].message
    assert results.dtypes["tf32"].recipe["tf32"] is True and results.dtypes["bf16"].status == "ok"


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    cfg = run_config(tmp_path_factory.mktemp("repair") / "o", max_tokens=512, repair_tokens=128)
    from evalsuite.numerics.observer import NumericsObserver

    results, per_token = run_pair(cfg, str(planted), observers=(NumericsObserver(cfg, str(planted)),))
    return results, per_token


def test_repair_finds_the_planted_module_and_nothing_more(planted_run):
    results, _ = planted_run
    fp16 = results.dtypes["fp16"]
    assert fp16.status == "broken" and fp16.metrics["first_nonfinite_module"] == "model.layers.1.mlp"
    r = results.sections["repair"]["fp16"]
    chosen = parse_recipe(r["chosen"])
    assert r["chosen_kind"] == "safe" and chosen.residual_fp32_from == 1
    assert [i.pattern for i in chosen.islands] == ["model.layers.1.mlp"]
    assert fp16.metrics["repair_recipe"] == r["chosen"] and fp16.metrics["repair_nonfinite_tokens"] == 0
    rows = {c["recipe"]: c for c in r["candidates"]}
    assert rows[r["chosen"]]["status"] == "chosen" and rows[r["chosen"]]["first_nonfinite_module"] is None
    assert all(c["status"] in ("rejected", "not measured") and c["why"] for n, c in rows.items() if n != r["chosen"])
    assert rows["fp16+clamp"]["first_nonfinite_module"] == "model.layers.1.mlp"  # no NaN in the logits is not safe
    reasons = results.sections["numerics"]["verdicts"]["fp16"]["reasons"]
    assert reasons[-1].startswith("repair: FP16 with an FP32 residual stream from layer 1") and r["chosen"] in reasons[-1]
    assert "bf16" not in results.sections["repair"]  # BF16 is fine: nothing to repair
    assert "repair" not in results.sections["numerics"]["first_nonfinite"]  # candidates stay out of numerics
    assert set(results.sections["numerics"]["first_nonfinite"]) == {"fp32", "fp16", "bf16"}


@torch.no_grad()
def _kl_by_hand(source: str, recipe: str, windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-token KL(ref || test) and non-finite flags, from logits of each window computed one at a time."""
    ref_model = load_recipe(source, parse_recipe("fp32"), torch.device("cpu"))
    test_model = load_recipe(source, parse_recipe(recipe), torch.device("cpu"))
    fp32_gemm_linears(test_model)  # as the run computes half Linears on a CPU (--cpu-half-gemm auto)
    kls, bad = [], []
    for w in windows:
        ids = torch.from_numpy(w[:-1].astype(np.int64))[None]
        ref = ref_model(input_ids=ids).logits[0].double().numpy()
        test = test_model(input_ids=ids).logits[0].double().numpy()
        lr = ref - ref.max(-1, keepdims=True)
        lr = lr - np.log(np.exp(lr).sum(-1, keepdims=True))
        lt = test - test.max(-1, keepdims=True)
        lt = lt - np.log(np.exp(lt).sum(-1, keepdims=True))
        kls.append((np.exp(lr) * (lr - lt)).sum(-1))
        bad.append(~np.isfinite(test).all(-1))
    return np.concatenate(kls), np.concatenate(bad)


def test_repair_figures_match_an_independent_computation(planted_run, planted):
    results, per_token = planted_run
    r = results.sections["repair"]["fp16"]
    t = r["tokens"]
    from evalsuite.store import corpus

    windows = corpus.tokenize(*[corpus.load_texts(corpus.CorpusSpec())[0]], _tokenizer(planted), 64, 512).windows
    chosen_windows = windows[t["first_window"]:t["first_window"] + t["n_windows"]]
    assert sum(len(w) - 1 for w in chosen_windows) == t["n_tokens"] >= 128
    kl, bad = _kl_by_hand(str(planted), r["chosen"], chosen_windows)
    chosen = next(c for c in r["candidates"] if c["status"] == "chosen")
    assert not bad.any() and chosen["nonfinite_tokens"] == 0
    assert chosen["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-9)
    lo, n = t["first_token"], t["n_tokens"]
    assert r["baseline"]["nonfinite_tokens"] == int((per_token["fp16/nonfinite"][lo:lo + n] > 0).sum()) > 0
    assert r["others"]["bf16"]["kl_mean"] == pytest.approx(float(np.mean(per_token["bf16/kl"][lo:lo + n])), rel=1e-12)
    assert t["reference_nll_max_abs_diff"] == 0.0  # the repair's reference reproduced the main one


def _tokenizer(path):
    from evalsuite.model.loading import load_tokenizer

    return load_tokenizer(str(path))


def test_no_repair_leaves_a_broken_precision_alone(planted, tmp_path):
    from evalsuite.numerics.observer import NumericsObserver

    cfg = run_config(tmp_path / "a", max_tokens=256, dtypes=(parse_recipe("fp16"),), repair="off")
    results, _ = run_pair(cfg, str(planted), observers=(NumericsObserver(cfg, str(planted)),))
    assert results.dtypes["fp16"].status == "broken" and "repair" not in results.sections
    assert "repair_recipe" not in results.dtypes["fp16"].metrics


def test_forced_repair_of_a_precision_short_of_headroom(tmp_path):
    """--repair: a finite FP16 whose MLP output comes within 1 bit of 65504 gets a recipe with the margin."""
    from evalsuite.numerics.observer import NumericsObserver

    path = build_planted(tmp_path / "m", {"model.layers.1.mlp.down_proj.weight": 1e4})
    for mode in ("auto", "on"):
        cfg = run_config(tmp_path / mode, max_tokens=256, dtypes=(parse_recipe("fp16"),), repair=mode,
                         repair_tokens=128)
        results, _ = run_pair(cfg, str(path), observers=(NumericsObserver(cfg, str(path)),))
        fp16 = results.dtypes["fp16"]
        assert fp16.status == "ok" and fp16.metrics["min_headroom_bits"] < 1.0
        if mode == "auto":
            assert "repair" not in results.sections
            continue
        r = results.sections["repair"]["fp16"]
        chosen = next(c for c in r["candidates"] if c["status"] == "chosen")
        assert r["chosen_kind"] == "safe" and chosen["min_headroom_bits"] >= 1.0 and chosen["nonfinite_tokens"] == 0
        assert "model.layers.1.mlp" in r["chosen"]


def test_results_round_trip_with_repair(planted_run, tmp_path):
    results, _ = planted_run
    write_results(tmp_path / "r.json", results)
    again = load_results(tmp_path / "r.json")
    assert again.sections["repair"]["fp16"]["chosen"] == results.sections["repair"]["fp16"]["chosen"]


@pytest.mark.slow
def test_gemma_fp16_repair_reports_a_finite_recipe_beside_bf16(demo_model, tmp_path):
    """The real Gemma 3 270M on CPU: FP16 overflows at model.layers.7; the repair makes it finite."""
    from evalsuite.numerics.observer import NumericsObserver

    cfg = run_config(tmp_path / "o", model=str(demo_model), seq_len=128, max_tokens=256, batch_size=2,
                     repair_tokens=128)
    results, _ = run_pair(cfg, str(demo_model), observers=(NumericsObserver(cfg, str(demo_model)),))
    assert results.dtypes["fp16"].status == "broken"
    r = results.sections["repair"]["fp16"]
    chosen = next(c for c in r["candidates"] if c["status"] == "chosen")
    assert chosen["nonfinite_tokens"] == 0 and chosen["first_nonfinite_module"] is None
    assert r["others"]["bf16"]["kl_mean"] is not None and chosen["kl_mean"] is not None
    assert "BF16:" in r["sentence"]
    print(json.dumps({"chosen": r["chosen"], "kind": r["chosen_kind"], "sentence": r["sentence"],
                      "candidates": [{k: c.get(k) for k in ("recipe", "status", "why", "nonfinite_tokens", "kl_mean",
                                                            "kl_p99", "top1_agreement", "tokens_per_s",
                                                            "min_headroom_bits", "fp32_params")}
                                     for c in r["candidates"]],
                      "baseline": {k: r["baseline"].get(k) for k in ("nonfinite_tokens", "tokens_per_s")},
                      "bf16": r["others"]["bf16"], "repair_s": results.provenance["run_timing"].get("repair_s")},
                     indent=1))
