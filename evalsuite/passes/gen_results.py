"""Decoded continuations -> each precision's `gen_*` metrics, the `generation` section, generations.jsonl.

Metrics (flat; docs/results-schema.md): each test precision gets the summary of its comparison
with the reference (metrics/generation.py) and the noise floor's under the same names prefixed
`noise_` (as `noise_kl_mean` sits beside `kl_mean`, so a gate on `gen_identical` is checked
against `noise_gen_identical`), `gen_within_noise` (its identical share is at least the floor's)
and `gen_tokens_per_s`; the reference gets the floor's and its own `gen_tokens_per_s`. The section
holds the survival curves, the most divergent examples and the settings, so the report needs
results.json alone; generations.jsonl keeps every prompt with every continuation.
"""

from __future__ import annotations

import json

import numpy as np

from evalsuite.log import say
from evalsuite.metrics.generation import NEAR_TIE, compare, summary, survival
from evalsuite.model.decode import TOP_K
from evalsuite.passes.generate import letters, scored_part

RECORDS_FILE = "generations.jsonl"
MAX_EXAMPLES = 6  # most divergent prompts per precision kept in results.json; all are in generations.jsonl


def _split(tokenizer, tokens: np.ndarray, d: int) -> tuple[str, str]:
    """(text of the first d tokens, text of the rest): where the report highlights the divergence."""
    head, full = tokenizer.decode(tokens[:d].tolist()), tokenizer.decode(tokens.tolist())
    return (head, full[len(head):]) if full.startswith(head) else (head, tokenizer.decode(tokens[d:].tolist()))


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def _examples(step, name: str, comp, ref_lp: list, test_lp: list) -> list[dict]:
    """The prompts where `name` parted earliest from the reference (ties: the lower reference log-prob)."""
    tok, ref, test = step.tokenizer, step.decoded[step.reference], step.decoded[name]
    order = sorted(np.flatnonzero(~comp.identical).tolist(),
                   key=lambda i: (comp.first_div[i], (_mean(test_lp[i]) or 0.0) - (_mean(ref_lp[i]) or 0.0)))
    out = []
    for i in order[:MAX_EXAMPLES]:
        d = int(comp.first_div[i])
        common, ref_rest = _split(tok, ref.tokens[i], d)
        _, test_rest = _split(tok, test.tokens[i], d)
        top = [] if d >= ref.topk_ids.shape[1] else [
            {"token": tok.decode([int(t)]), "logprob": float(lp)}
            for t, lp in zip(ref.topk_ids[i, d], ref.topk_logprobs[i, d], strict=True) if np.isfinite(lp)]
        out.append({"index": i, "origin": step.prompts[i].origin, "prompt": step.prompts[i].text,
                    "first_divergence": d, "margin": float(comp.margin[i]), "in_ref_topk": bool(comp.in_topk[i] == 1),
                    "nonfinite": bool(comp.nonfinite[i]), "common": common, "reference_rest": ref_rest,
                    "test_rest": test_rest, "reference_top": top})
    return out


def _record(step, i: int, comps: dict, lp: dict) -> dict:
    """One prompt with the reference's continuation and every other one, compared."""
    tok, p, ref = step.tokenizer, step.prompts[i], step.decoded[step.reference]
    rec = {"index": i, "source": p.source, "origin": p.origin, "prompt": p.text, "prompt_tokens": len(p.ids)}
    if p.source == "benchmark":
        rec.update(choices=list(p.choices), gold=p.gold)
    n = len(ref.tokens[i])
    rec["reference"] = {"name": step.reference, "tokens": ref.tokens[i].tolist(), "text": tok.decode(ref.tokens[i].tolist()),
                        "ended": "eos" if n and int(ref.tokens[i][-1]) in step.eos else "limit",
                        "margins": [round(float(m), 4) for m in ref.margins[i, :n]],
                        "ref_logprob": _mean(lp[step.reference][i])}
    rec["continuations"] = {}
    for name, c in comps.items():
        d = step.decoded[name]
        rec["continuations"][name] = {
            "tokens": d.tokens[i].tolist(), "text": tok.decode(d.tokens[i].tolist()), "identical": bool(c.identical[i]),
            "first_divergence": int(c.first_div[i]) if not c.identical[i] else None,
            "margin_at_divergence": float(c.margin[i]) if np.isfinite(c.margin[i]) else None,
            "in_ref_topk": None if c.identical[i] else bool(c.in_topk[i] == 1),
            "nonfinite_step": int(d.first_nonfinite[i]) if d.first_nonfinite[i] >= 0 else None,
            "scored_tokens": len(scored_part(d, i)), "ref_logprob": _mean(lp[name][i])}
    return rec


def build(step) -> tuple[dict, dict, dict[str, str]]:
    """(metric additions by precision, {"generation": section}, {"generations.jsonl": text})."""
    ref_name = step.reference
    ref = step.decoded.get(ref_name)
    settings = {"prompts": len(step.prompts), "tokens": step.horizon, "batch_size": step.batch,
                "noise_batch_size": step.noise_batch, "noise_order": "reversed", "top_k": TOP_K,
                "near_tie_nats": NEAR_TIE, "sources": _sources(step.prompts)}
    if ref is None or "noise" not in step.decoded:
        return {}, {"generation": {"settings": settings, "failed": step.failed, "timing": step.timing}}, {}
    comps = {name: compare(ref.tokens, ref.topk_ids, ref.margins, ref.first_nonfinite, d.tokens, d.first_nonfinite,
                           step.horizon)
             for name, d in step.decoded.items() if name != ref_name}
    lp = step.logprobs
    bench = any(p.source == "benchmark" for p in step.prompts)
    ref_letters = letters(step, ref) if bench else None
    stats = {name: summary(c, lp[ref_name], lp[name], (ref_letters, letters(step, step.decoded[name])) if bench else None)
             for name, c in comps.items()}
    floor = {f"noise_{k}": v for k, v in stats["noise"].items()}
    speed = {n: t.get("tokens_per_s") for n, t in step.timing.items() if "decode_s" in t}
    additions = {ref_name: {**floor, "gen_tokens_per_s": speed.get(ref_name)}}
    for name, m in stats.items():
        if name != "noise":
            additions[name] = {**m, **floor, "gen_within_noise": bool(m["gen_identical"] >= stats["noise"]["gen_identical"]),
                               "gen_tokens_per_s": speed.get(name)}
            say(_summary_line(name, ref_name, m, stats["noise"]))
    records = [_record(step, i, comps, lp) for i in range(len(step.prompts))]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    section = {
        "reference": ref_name, "dtypes": [n for n in comps if n != "noise"], "settings": settings,
        "records_file": RECORDS_FILE, "stats": stats,
        "survival": {name: survival(c.first_div, step.horizon).tolist() for name, c in comps.items()},
        "examples": {name: _examples(step, name, c, lp[ref_name], lp[name]) for name, c in comps.items()},
        "timing": step.timing, "failed": step.failed,
    }
    return additions, {"generation": section}, {RECORDS_FILE: text}


def _sources(prompts) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in prompts:
        out[p.source] = out.get(p.source, 0) + 1
    return out


def _summary_line(name: str, ref: str, m: dict, floor: dict) -> str:
    within = " (within the noise floor)" if m["gen_identical"] >= floor["gen_identical"] else ""
    return (f"{name} vs {ref}: {m['gen_identical']:.0%} of {m['gen_prompts']} continuations identical{within}, "
            f"floor {floor['gen_identical']:.0%}; first divergence median {m['gen_first_div_median']:g} tokens")
