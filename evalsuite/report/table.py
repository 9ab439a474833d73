"""The short terminal table printed after a run; reads only the results dict (no torch)."""

from __future__ import annotations

import math


def fmt(value, digits: int = 4) -> str:
    """A number with `digits` significant digits; '-' for missing or non-finite values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}"
    return f"{value:.{max(1, digits - 1)}e}"


def is_number(value) -> bool:
    """A finite int or float (not a bool): what can be plotted or formatted as a number."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def pct(value, digits: int = 4) -> str:
    """A fraction as a percentage ('99.57 %'); '-' when missing."""
    return f"{fmt(value * 100, digits)} %" if is_number(value) else "-"


def pm(value, se, digits: int = 4) -> str:
    if se is None or (isinstance(se, float) and not math.isfinite(se)):
        return fmt(value, digits)
    return f"{fmt(value, digits)} ± {fmt(se, 2)}"


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
    ("non-finite", lambda n, d: fmt(d["metrics"].get("nonfinite_logits"))),
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
