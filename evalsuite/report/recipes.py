"""The report's precision-recipes view: one row per recipe, the chain of roundings, the repair's candidates.

Reads only the results dict (each dtype's `recipe`, `recipe_attribution`, `repair`), so a results
file of schema version 1 (no recipes) simply has no such section. Shown only when the run has a
recipe beyond the plain dtypes, a weights/compute split or a repair.
"""

from __future__ import annotations

from evalsuite.fmt import fmt, is_number, pct

VERDICT_CLASS = {"ok": "ok", "degraded": "warn", "broken": "bad", "failed": "bad", "skipped": "skip"}


def _plain(recipe: dict) -> bool:
    return (recipe.get("storage") == [recipe.get("compute")] and not recipe.get("tf32")
            and recipe.get("residual_fp32_from") is None and not recipe.get("islands") and not recipe.get("clamp"))


def _row(name: str, d: dict, flips: list[str]) -> dict:
    m, t = d.get("metrics") or {}, d.get("timing") or {}
    word = m.get("verdict") if isinstance(m.get("verdict"), str) else d.get("status") or "-"
    return {"name": name, "summary": str((d.get("recipe") or {}).get("summary") or ""),
            "ppl_ratio": fmt(m.get("ppl_ratio"), 6), "kl_mean": fmt(m.get("kl_mean"), 3), "kl_p99": fmt(m.get("kl_p99"), 3),
            "top1": pct(m.get("top1_agreement")), "flips": [pct(m.get(f"flips/{task}"), 3) for task in flips],
            "nonfinite": fmt(m.get("nonfinite_tokens")), "tok_s": fmt(m.get("tokens_per_s"), 3),
            "peak": fmt(t.get("peak_memory_gib"), 3), "verdict": str(word), "cls": VERDICT_CLASS.get(word, "unknown"),
            "repair": str(m.get("repair_recipe") or "")}


def _collapse(names: list) -> list:
    out: list = []
    for n in names:
        if not out or out[-1] != n:
            out.append(n)
    return out


def _weight_only_kl(dtypes: dict, storage: list) -> str | None:
    """KL mean of the test recipe that holds weights rounded through `storage` and computes in exact FP32."""
    for name, d in dtypes.items():
        r = d.get("recipe") or {}
        if (d.get("role") == "test" and r.get("compute") == "fp32" and not r.get("tf32") and not r.get("islands")
                and r.get("residual_fp32_from") is None and _collapse(r.get("storage") or []) == storage):
            kl = (d.get("metrics") or {}).get("kl_mean")
            return f"{fmt(kl, 3)} ({name})" if is_number(kl) else None
    return None


def _chain(name: str, d: dict, dtypes: dict, stored: str | None, split: dict | None) -> dict:
    """reference -> storage roundings -> compute, each step with the KL measured after it where a recipe ran."""
    r = d["recipe"]
    steps = [{"label": f"checkpoint ({stored or 'stored dtype unknown'})", "kl": None}]
    storage = list(r.get("storage") or [])
    for i, fmt_name in enumerate(storage):
        if fmt_name == "fp32" and i == 0:
            continue
        steps.append({"label": f"round to {fmt_name.upper()}", "kl": _weight_only_kl(dtypes, _collapse(storage[:i + 1]))})
    compute = "TF32" if r.get("tf32") else str(r.get("compute", "?")).upper()
    if r.get("compute") not in (storage[-1] if storage else None, "fp32"):
        steps.append({"label": f"cast to {compute}", "kl": _weight_only_kl(dtypes, _collapse([*storage, r["compute"]]))})
    extras = []
    if r.get("residual_fp32_from") is not None:
        extras.append("FP32 residual stream" + (f" from layer {r['residual_fp32_from']}" if r["residual_fp32_from"] else ""))
    extras += [f"{i.get('pattern')} in {str(i.get('dtype')).upper()}" for i in r.get("islands") or []]
    if r.get("clamp"):
        extras.append("FP16 clamp")
    kl = (d.get("metrics") or {}).get("kl_mean")
    steps.append({"label": f"compute in {compute}" + (f" ({'; '.join(extras)})" if extras else ""),
                  "kl": f"{fmt(kl, 3)} ({name})" if is_number(kl) else None})
    out = {"name": name, "steps": steps, "split": None}
    if split:
        k = split.get("kl_mean") or {}
        total, w, c = k.get("total"), k.get("weights"), k.get("compute")
        share = f" ({pct(w / total, 3)} of it)" if is_number(w) and is_number(total) and total > 0 else ""
        out["split"] = {"weights": f"{fmt(w, 3)}{share}", "compute": fmt(c, 3), "total": fmt(total, 3),
                        "from": str(split.get("weights_recipe") or "exact weights"), "exact": bool(split.get("exact")),
                        "finite_only": bool(split.get("finite_only"))}
    return out


def _candidate(c: dict) -> dict:
    return {"recipe": str(c.get("recipe")), "status": str(c.get("status")), "why": str(c.get("why") or ""),
            "nonfinite": fmt(c.get("nonfinite_tokens")),
            "first": str(c.get("first_nonfinite_module") or ("-" if c.get("status") == "not measured" else "none")),
            "kl_mean": fmt(c.get("kl_mean"), 3), "kl_p99": fmt(c.get("kl_p99"), 3), "top1": pct(c.get("top1_agreement")),
            "headroom": fmt(c.get("min_headroom_bits"), 3), "fp32": fmt(c.get("fp32_params"), 3),
            "tok_s": fmt(c.get("tokens_per_s"), 3), "peak": fmt(c.get("peak_memory_gib"), 3),
            "error": str(c.get("error") or "")}


def _repairs(results: dict) -> list[dict]:
    out = []
    for name, r in (results.get("repair") or {}).items():
        if not isinstance(r, dict):
            continue
        others = {str(n): fmt((v or {}).get("kl_mean"), 3) for n, v in (r.get("others") or {}).items()}
        rows = [_candidate(r["baseline"])] if isinstance(r.get("baseline"), dict) else []
        rows += [_candidate(c) for c in r.get("candidates") or [] if isinstance(c, dict)]
        t = r.get("tokens") or {}
        out.append({"name": str(name), "sentence": str(r.get("sentence") or ""), "rows": rows, "others": others,
                    "tokens": fmt(t.get("n_tokens")), "windows": fmt(t.get("n_windows")),
                    "first_token": fmt(t.get("first_token")), "chosen": str(r.get("chosen") or "none")})
    return out


def context(results: dict) -> dict:
    """Rows for templates/recipes.html, or {} when the run has nothing beyond plain dtypes."""
    dtypes = results.get("dtypes") or {}
    recipes = {n: d for n, d in dtypes.items() if isinstance(d, dict) and isinstance(d.get("recipe"), dict)}
    splits = results.get("recipe_attribution") or {}
    repairs = _repairs(results)
    if not repairs and not splits and all(_plain(d["recipe"]) for d in recipes.values()):
        return {}
    flips = sorted({k.split("/", 1)[1] for d in dtypes.values() for k in (d.get("metrics") or {}) if k.startswith("flips/")})
    stored = (results.get("model") or {}).get("stored_dtype")
    tests = {n: d for n, d in recipes.items() if d.get("role") == "test"}
    return {"rows": [_row(n, d, flips) for n, d in tests.items()], "flips": flips,
            "chains": [_chain(n, d, dtypes, stored, splits.get(n)) for n, d in tests.items()
                       if d.get("status") in ("ok", "broken")],
            "repairs": repairs}
