"""Inline SVG charts built as strings, so a report is one file that opens with no network.

Plain functions, no plotting library: the report must render on a machine without
matplotlib, and an SVG string is easy to test. Every label that may come from data (dtype
names, run labels, module names, tick values) goes through `markupsafe.escape`; the result
is returned as `Markup` so the template can place it without `|safe`. Points that a log axis
cannot show (zero, negative, None, NaN) are dropped rather than drawn at a fake position.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from markupsafe import Markup, escape

from evalsuite.fmt import is_number as _finite

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 28, 54  # plot margins (px in viewBox units)


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.1e}"


def log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Decade ticks (10ⁿ) enclosing [lo, hi]; every k-th decade when the span is wide (≤ 8 ticks)."""
    # within 10^±200, so that even the widest step (29 decades) stays below 10.0**309, which overflows;
    # a value beyond is drawn at the plot's edge (the axis clamps)
    a, b = (min(max(e, -200), 200) for e in (math.floor(math.log10(lo)), math.ceil(math.log10(hi))))
    b = max(b, a + 1)
    step = max(1, math.ceil((b - a) / 7))
    return [(10.0**k, "10" + str(k).translate(_SUPERSCRIPT)) for k in range(a, b + step, step)]


def linear_ticks(lo: float, hi: float, target: int = 5) -> list[tuple[float, str]]:
    """'Nice' ticks (1, 2, 5 × 10ⁿ) covering [lo, hi]."""
    lo, hi = (min(max(v, -1e300), 1e300) for v in (lo, hi))  # hi - lo must stay finite; beyond, the axis clamps
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)  # the ticks enclose the data
    return [(k * step, _tick_label(round(k * step, 12))) for k in range(first, last + 1)]


class _Axis:
    """Maps data values to pixels along one axis, linear or log10."""

    def __init__(self, values: Sequence[float], log: bool, p0: float, p1: float, include: Sequence[float] = ()):
        vals = [v for v in (*values, *include) if _finite(v) and (v > 0 or not log)]
        lo, hi = (min(vals), max(vals)) if vals else (1.0, 10.0)
        self.log = log
        self.ticks = log_ticks(lo, hi) if log else linear_ticks(lo, hi)
        self.lo, self.hi = self.ticks[0][0], self.ticks[-1][0]
        self.p0, self.p1 = p0, p1

    def ok(self, v) -> bool:
        return _finite(v) and (v > 0 or not self.log)

    def __call__(self, v: float) -> float:
        f = (lambda t: math.log10(t)) if self.log else (lambda t: t)
        span = f(self.hi) - f(self.lo) or 1.0
        share = min(max((f(v) - f(self.lo)) / span, 0.0), 1.0)  # clamp to the plot: never draw outside it
        return self.p0 + share * (self.p1 - self.p0)


def line_chart(
    series: Sequence[dict],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_log: bool = False,
    y_log: bool = False,
    hlines: Sequence[tuple[float, str]] = (),
    vlines: Sequence[tuple[float, str]] = (),
    width: int = 560,
    height: int = 300,
) -> Markup:
    """A line chart with labelled axes and a legend.

    series: [{"name": str, "points": [(x, y), ...], "dashed": bool, "colour": int}], coloured in
    palette order unless "colour" gives the palette index (e.g. one colour per dtype across runs).
    hlines/vlines: reference lines (e.g. the FP16 limit 65504) with a label each.
    """
    per_row = 3
    top = _TOP + 18 * ((len(series) - 1) // per_row)  # room for the legend rows
    xs = [p[0] for s in series for p in s["points"]]
    ys = [p[1] for s in series for p in s["points"]]
    x = _Axis(xs, x_log, _LEFT, width - _RIGHT, include=[v for v, _ in vlines])
    y = _Axis(ys, y_log, height - _BOTTOM, top, include=[v for v, _ in hlines])
    e = escape
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img">',
           f"<title>{e(title)}</title>",
           f'<rect x="{_LEFT}" y="{top}" width="{width - _LEFT - _RIGHT}" height="{height - top - _BOTTOM}" '
           'class="plot"/>']
    for v, label in x.ticks:
        px = x(v)
        out.append(f'<line class="grid" x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{height - _BOTTOM}"/>'
                   f'<text class="tick" x="{px:.1f}" y="{height - _BOTTOM + 17}" text-anchor="middle">{e(label)}</text>')
    for v, label in y.ticks:
        py = y(v)
        out.append(f'<line class="grid" x1="{_LEFT}" x2="{width - _RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>'
                   f'<text class="tick" x="{_LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{e(label)}</text>')
    for v, label in hlines:
        if y.ok(v):
            py = y(v)
            out.append(f'<line class="ref" x1="{_LEFT}" x2="{width - _RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>'
                       f'<text class="reflabel" x="{width - _RIGHT - 4}" y="{py - 4:.1f}" text-anchor="end">{e(label)}</text>')
    for v, label in vlines:
        if x.ok(v):
            px = x(v)
            out.append(f'<line class="ref" x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{height - _BOTTOM}"/>'
                       f'<text class="reflabel" x="{px + 4:.1f}" y="{top + 12}">{e(label)}</text>')
    for i, s in enumerate(series):
        colour = PALETTE[s.get("colour", i) % len(PALETTE)]
        pts = [(x(a), y(b)) for a, b in s["points"] if x.ok(a) and y.ok(b)]
        dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
        if len(pts) == 1:
            out.append(f'<circle cx="{pts[0][0]:.1f}" cy="{pts[0][1]:.1f}" r="3" fill="{colour}"/>')
        elif pts:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            out.append(f'<polyline class="series" points="{path}" stroke="{colour}"{dash}/>')
        lx = _LEFT + 8 + (i % per_row) * 160
        ly = 14 + 18 * (i // per_row)
        out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2.5"{dash}/>'
                   f'<text class="legend" x="{lx + 22}" y="{ly + 4}">{e(s["name"])}</text>')
    out.append(f'<text class="axis" x="{(_LEFT + width - _RIGHT) / 2:.0f}" y="{height - 6}" '
               f'text-anchor="middle">{e(x_label)}</text>')
    out.append(f'<text class="axis" transform="translate(14 {(top + height - _BOTTOM) / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle">{e(y_label)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def _valid_histogram(h) -> bool:
    return (isinstance(h, dict) and isinstance(h.get("edges"), list) and isinstance(h.get("counts"), list)
            and len(h["edges"]) == len(h["counts"]) + 1 and len(h["counts"]) > 0
            and all(_finite(v) for v in h["edges"] + h["counts"]))


def kl_density_chart(histograms: dict[str, dict], noise_kl_max: float | None = None,
                     dashed: Collection[str] = (), colours: dict[str, int] | None = None) -> Markup | None:
    """Per-token KL as the share of tokens per decade of KL (log x), one line per dtype.

    Dividing by the bin width in decades makes dtypes with different bin ranges comparable.
    """
    series = []
    for name, h in histograms.items():
        if not _valid_histogram(h):
            continue
        total = sum(h["counts"]) + (int(h["n_zero"]) if _finite(h.get("n_zero")) else 0)
        pts = []
        for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"], strict=False):
            if lo <= 0 or hi <= lo:
                continue
            density = 100.0 * c / total / (math.log10(hi) - math.log10(lo))
            pts += [(lo, density), (hi, density)]
        series.append({"name": name, "points": pts, "dashed": name in dashed,
                       "colour": (colours or {}).get(name, len(series))})
    if not series:
        return None
    vlines = [(noise_kl_max, "noise floor max")] if _finite(noise_kl_max) and noise_kl_max > 0 else []
    return line_chart(series, title="Distribution of per-token KL divergence", x_label="KL(reference ‖ test) per token (nats, log scale)",
                      y_label="% of tokens per decade", x_log=True, vlines=vlines)


def kl_tail_chart(histograms: dict[str, dict], noise_kl_max: float | None = None,
                  dashed: Collection[str] = (), colours: dict[str, int] | None = None) -> Markup | None:
    """Share of tokens whose KL exceeds x, log-log: the tail that a mean hides."""
    series = []
    for name, h in histograms.items():
        if not _valid_histogram(h):
            continue
        total = sum(h["counts"]) + (int(h["n_zero"]) if _finite(h.get("n_zero")) else 0)
        above, pts = sum(h["counts"]), []
        for edge, c in zip(h["edges"], h["counts"], strict=False):
            if above > 0:
                pts.append((edge, above / total))
            above -= c
        series.append({"name": name, "points": pts, "dashed": name in dashed,
                       "colour": (colours or {}).get(name, len(series))})
    if not series:
        return None
    vlines = [(noise_kl_max, "noise floor max")] if _finite(noise_kl_max) and noise_kl_max > 0 else []
    return line_chart(series, title="Tail of the per-token KL divergence", x_label="KL threshold x (nats, log scale)",
                      y_label="share of tokens with KL ≥ x", x_log=True, y_log=True, vlines=vlines)


def _curve(entries, value_keys: Sequence[str]) -> list[tuple[float, float]]:
    """Points from a list of numbers, a list of {layer, <value>} dicts, or a {name: number} dict."""
    if isinstance(entries, dict):
        entries = list(entries.values())
    points = []
    for i, e in enumerate(entries if isinstance(entries, list) else []):
        x, y = i, e
        if isinstance(e, dict):
            x = e.get("layer") if _finite(e.get("layer")) else i
            y = next((e[k] for k in value_keys if _finite(e.get(k))), None)
        if _finite(y):
            points.append((x, y))
    return points


def layer_chart(by_dtype, value_keys: Sequence[str], y_label: str, limit: tuple[float, str] | None = None
                ) -> Markup | None:
    """One curve per dtype over layer index (log y), from a {dtype: per-layer values} mapping.

    Tolerant of the shape, since the sections that feed it are still being defined: each
    dtype's value may be a list of numbers or of {"layer": i, <value_key>: v} dicts.
    """
    if not isinstance(by_dtype, dict):
        return None
    series = [{"name": str(name), "points": _curve(v, value_keys)} for name, v in by_dtype.items()]
    series = [s for s in series if s["points"]]
    if not series:
        return None
    return line_chart(series, title=y_label, x_label="layer (index)", y_label=f"{y_label} (log scale)", y_log=True,
                      hlines=[limit] if limit else ())
