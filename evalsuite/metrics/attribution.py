"""A recipe's loss split into the weights' share and the compute's share, where the run measured both.

How: for a recipe R that computes in a narrower format than FP32 (e.g. `bf16@fp16`), its
weight-only counterpart W rounds the weights exactly as R does, the cast to R's compute format
included, and computes in exact FP32 (`bf16@fp16@fp32`; for plain `fp16` it is `fp16@fp32`).
R and W see the same weights, so W's divergence from the reference is what the weights cost and
R's minus W's is what the compute costs:

    weights = metric(W),  compute = metric(R) - metric(W)      (kl_mean, delta_nll)
    ppl_ratio: weights = ratio(W), compute = ratio(R) / ratio(W)

Where only `STORAGE@fp32` ran (`bf16@fp32` beside `bf16@fp16`), the split is the stored weights'
rounding against everything serving in the compute format adds (the cast of the weights to it
included), marked `exact: false`. A TF32 recipe keeps the weights exact: all of its loss is
compute. KL is not exactly additive, so the compute share is a difference of means, which can
come out slightly negative when compute costs nothing: it is reported as measured.
Pure over the results' `recipe` dicts; no torch.
"""

from __future__ import annotations

METRICS = ("kl_mean", "delta_nll")


def _collapse(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if not out or out[-1] != n:
            out.append(n)
    return out


def _weight_only(recipe: dict) -> bool:
    return (recipe.get("compute") == "fp32" and not recipe.get("tf32") and recipe.get("residual_fp32_from") is None
            and not recipe.get("islands") and not recipe.get("clamp"))


def _counterpart(recipe: dict, candidates: dict[str, dict]) -> tuple[str, bool] | None:
    """(name of the weight-only recipe holding R's weights, whether exactly) among `candidates`."""
    exact = _collapse([*recipe["storage"], recipe["compute"]])
    stored = _collapse(list(recipe["storage"]))
    for want, is_exact in ((exact, True), (stored, False)):
        for name, r in candidates.items():
            if _collapse(list(r["storage"])) == want:
                return name, is_exact
    return None


def _split(total, weights, ratio: bool = False) -> dict | None:
    if total is None or weights is None:
        return None
    return {"total": total, "weights": weights,
            "compute": (total / weights if weights else None) if ratio else total - weights}


def attribution(dtypes: dict) -> dict:
    """{"recipe_attribution": {recipe: split}} for every test recipe that can be split; {} if none can."""
    measured = {n: d for n, d in dtypes.items()
                if d.role == "test" and d.recipe and d.status in ("ok", "broken") and d.metrics}
    weight_only = {n: d.recipe for n, d in measured.items() if _weight_only(d.recipe) and d.recipe["storage"] != ["fp32"]}
    out = {}
    for name, d in measured.items():
        r, m = d.recipe, d.metrics
        if r.get("tf32") and r["storage"] == ["fp32"]:
            split = {"weights_recipe": None, "exact": True,
                     **{k: _split(m.get(k), 0.0) for k in METRICS}, "ppl_ratio": _split(m.get("ppl_ratio"), 1.0, True)}
        elif r["compute"] == "fp32" or r.get("tf32"):
            continue  # weight-only recipes are the counterparts themselves
        else:
            found = _counterpart(r, weight_only)
            if found is None:
                continue
            w = measured[found[0]].metrics
            split = {"weights_recipe": found[0], "exact": found[1],
                     **{k: _split(m.get(k), w.get(k)) for k in METRICS},
                     "ppl_ratio": _split(m.get("ppl_ratio"), w.get("ppl_ratio"), True)}
        split["finite_only"] = bool(m.get("finite_only"))
        out[name] = split
    return {"recipe_attribution": out} if out else {}
