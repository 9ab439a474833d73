"""The short terminal table printed after a run; reads only the results dict (no torch)."""

from __future__ import annotations

from evalsuite.fmt import fmt, pm

COLUMNS = [
    ("dtype", lambda n, d: n),
    ("status", lambda n, d: d["status"]),
    ("ppl", lambda n, d: pm(d["metrics"].get("ppl"), d["metrics"].get("ppl_se"))),
    ("bits/byte", lambda n, d: fmt(d["metrics"].get("bits_per_byte"))),
    ("ppl ratio", lambda n, d: pm(d["metrics"].get("ppl_ratio"), d["metrics"].get("ppl_ratio_se"), 6)),
    ("KL mean", lambda n, d: pm(d["metrics"].get("kl_mean"), d["metrics"].get("kl_mean_se"), 3)),
    ("KL p99", lambda n, d: fmt(d["metrics"].get("kl_p99"), 3)),
    ("top-1", lambda n, d: fmt(d["metrics"].get("top1_agreement"), 4)),
    ("Δp rms", lambda n, d: fmt(d["metrics"].get("delta_p_rms"), 3)),
    ("non-finite tok", lambda n, d: fmt(d["metrics"].get("nonfinite_tokens"))),
    ("tok/s", lambda n, d: fmt(d["metrics"].get("tokens_per_s"), 3)),
]


def format_table(results: dict) -> str:
    rows = [[title for title, _ in COLUMNS]]
    for name, d in results["dtypes"].items():
        rows.append([get(name, d) for _, get in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    noise = results.get("noise_floor") or {}
    if noise:
        lines.append(
            f"noise floor (reference vs reference, batch {noise.get('reference_batch_size')} vs "
            f"{noise.get('batch_size')}, {fmt(noise.get('n_tokens'))} tokens): KL mean {fmt(noise.get('kl_mean'), 3)}, "
            f"KL max {fmt(noise.get('kl_max'), 3)}, top-1 {fmt(noise.get('top1_agreement'))}"
        )
    for name, d in results["dtypes"].items():
        if d.get("message"):
            lines.append(f"{name}: {d['message']}")
    return "\n".join(lines)
