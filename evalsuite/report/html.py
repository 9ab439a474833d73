"""The jinja2 environment of the report: autoescape, the number filters, and control characters shown.

One environment per process (compiling the templates was ~95 % of a render). `visible` is its
`finalize`: every `{{ }}` passes through it, so no string from the data reaches the HTML with a
raw control byte, whichever template prints it.
"""

from __future__ import annotations

import functools
import re

import jinja2
from markupsafe import Markup

from evalsuite import __version__
from evalsuite.fmt import fmt, pct, pm
from evalsuite.fmt import is_number as _finite


def secs(value) -> str:
    return f"{fmt(value, 3)} s" if _finite(value) else "-"


def signed(value, digits: int = 3) -> str:
    return ("+" if _finite(value) and value > 0 else "") + fmt(value, digits)


def _defined(f):
    """A filter that reads a missing field (jinja2 Undefined) as None, so it shows as '-'."""
    def wrapped(*args):
        return f(*(None if isinstance(a, jinja2.Undefined) else a for a in args))
    return wrapped


# Control characters (C0 but tab and newline, DEL, C1) from token strings shown as symbols: raw in
# HTML they are invalid, and a browser shows nothing or a box where the data held a byte.
_CONTROL = {**{c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)}, 0x7F: 0x2421,
            **{c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}}
_HAS_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # the keys of _CONTROL: a quick test first


def visible(value):
    """What every `{{ }}` in the templates prints: control characters replaced, Markup kept Markup."""
    if isinstance(value, str) and _HAS_CONTROL.search(value):
        shown = value.translate(_CONTROL)
        return Markup(shown) if isinstance(value, Markup) else shown
    return value


@functools.cache  # the templates never change within a process
def env() -> jinja2.Environment:
    e = jinja2.Environment(loader=jinja2.PackageLoader("evalsuite.report", "templates"), autoescape=True,
                           trim_blocks=True, lstrip_blocks=True, finalize=visible)
    e.filters.update(fmt=_defined(fmt), pm=_defined(pm), pct=_defined(pct), secs=_defined(secs))
    e.globals["version"] = __version__
    return e
