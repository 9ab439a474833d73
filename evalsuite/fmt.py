"""How numbers read in every output: the terminal table, the gate table, JUnit, Markdown, the report.

A base-layer module (stdlib only) so that the gates format numbers without importing the report,
and so that both read alike. Every function takes whatever a results file holds: a value of
the wrong type (a string where a number belongs, from a hand-edited or foreign file) is shown
as text, never raised on, because a report of a damaged file should still open.
"""

from __future__ import annotations

import math
import numbers


def is_number(value) -> bool:
    """A finite int or float (not a bool): what can be plotted or formatted as a number."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value, digits: int = 4) -> str:
    """A number with `digits` significant digits; '-' for missing or non-finite values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if not isinstance(value, numbers.Real):
        return str(value)  # not a number at all: shown as it is, not formatted
    value = float(value)
    if not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}"
    return f"{value:.{max(1, digits - 1)}e}"


def pct(value, digits: int = 4) -> str:
    """A fraction as a percentage ('99.57 %'); '-' when missing."""
    return f"{fmt(value * 100, digits)} %" if is_number(value) else "-"


def pm(value, se, digits: int = 4) -> str:
    """'value ± se', or the value alone when the standard error is missing or not a number."""
    if not is_number(se):
        return fmt(value, digits)
    return f"{fmt(value, digits)} ± {fmt(se, 2)}"
