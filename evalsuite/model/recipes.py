"""Precision recipes: the `--dtypes` grammar, parsed into the `Precision` record (one source of truth).

    recipe  := chain ("+" suffix)*
    chain   := FMT ("@" FMT)*              the stored weights are rounded to each FMT in turn; the last is the
                                           compute format: bf16@fp16 (saved in BF16, served in FP16),
                                           fp16@fp32 (weight-only FP16); a plain fp16 is fp16@fp16
    suffix  := "res32" [":" LAYER]         FP32 residual stream (from decoder layer LAYER on; default 0)
             | FMT ":" PATTERN             modules whose names end with PATTERN kept in FMT (an island)
             | "clamp"                     transformers' FP16 clamp after every decoder layer (FP16 compute only)
    FMT     := fp32 | fp16 | bf16 | tf32   (tf32: FP32 weights, TF32 matmuls; only as the compute format)
    PATTERN := SEG ("." SEG)*              SEG a module-name segment ([A-Za-z0-9_]+) or "%" (any one segment);
                                           "layers.7.mlp" matches model.layers.7.mlp, "layers.%.mlp" every MLP

Why these characters: `@`, `+`, `:`, `.` and `%` mean nothing to a POSIX shell and none is a comma
(--dtypes is comma-separated), so no recipe needs quoting. The name a recipe's results are filed
under is its normalised text (`normalise`): two spellings of one recipe are one row.

This module is pure (no model): the parse, the human description, and which format each watched
module's output has under a recipe (what its headroom is measured against). Applying a recipe
to a loaded model is convert.py.
"""

from __future__ import annotations

import re

from evalsuite.errors import UsageError
from evalsuite.model.precision import FORMATS, Format, Island, Precision

TF32 = "tf32"
_SEGMENT = re.compile(r"^([A-Za-z0-9_]+|%)$")
VALID_FORMS = (f"a format ({', '.join([*FORMATS, TF32])}); a chain STORAGE@...@COMPUTE (bf16@fp16, fp16@bf16, "
               "bf16@fp32, fp16@fp32); suffixes joined with '+': res32 or res32:LAYER (FP32 residual stream), "
               "FMT:PATTERN (modules kept in FMT, e.g. fp32:layers.7.mlp, '%' = any one name segment), "
               "clamp (FP16 compute); e.g. fp16+res32:7")


def _bad(text: str, why: str) -> UsageError:
    return UsageError(f"unknown or malformed dtype recipe {text!r} ({why}); valid forms: {VALID_FORMS}")


def _format(text: str, token: str) -> Format:
    if token not in FORMATS:
        raise _bad(text, f"{token!r} is not a format")
    return FORMATS[token]


def _chain(text: str, part: str) -> tuple[tuple[Format, ...], Format, bool]:
    """(storage roundings, compute format, tf32) of `STORAGE@...@COMPUTE`."""
    tokens = part.split("@")
    if any(not t for t in tokens):
        raise _bad(text, "an empty format around '@'")
    if TF32 in tokens[:-1]:
        raise _bad(text, "tf32 is a compute mode, not a storage format: put it last")
    tf32 = tokens[-1] == TF32
    compute = FORMATS["fp32"] if tf32 else _format(text, tokens[-1])
    storage = tuple(_format(text, t) for t in tokens[:-1]) or (compute,)
    collapsed: list[Format] = []
    for f in storage:  # rounding twice to one format is rounding once
        if not collapsed or collapsed[-1] != f:
            collapsed.append(f)
    return tuple(collapsed), compute, tf32


def _pattern(text: str, pattern: str) -> str:
    if not pattern or not all(_SEGMENT.match(seg) for seg in pattern.split(".")):
        raise _bad(text, f"module pattern {pattern!r}: use dot-separated name segments, '%' for any one segment")
    return pattern


def parse_recipe(text: str) -> Precision:
    """The `Precision` a user's recipe text describes; anything malformed is a one-line UsageError."""
    raw = text.strip()
    if not raw or any(c.isspace() for c in raw):
        raise _bad(text, "empty, or contains spaces")
    chain, *suffixes = raw.split("+")
    storage, compute, tf32 = _chain(text, chain.lower())
    res: int | None = None
    islands: list[Island] = []
    clamp = False
    for suffix in suffixes:
        head, _, arg = suffix.partition(":")
        head = head.lower()
        if head == "res32":
            if arg and not arg.isdigit():
                raise _bad(text, f"res32:{arg}: the layer must be a whole number")
            if res is not None:
                raise _bad(text, "res32 given twice")
            res = int(arg) if arg else 0
        elif head == "clamp" and not arg:
            clamp = True
        elif head in FORMATS and arg:
            island = Island(_pattern(text, arg), FORMATS[head])
            if island not in islands:
                islands.append(island)
        else:
            raise _bad(text, f"unknown suffix {suffix!r}")
    if clamp and compute != FORMATS["fp16"]:
        raise _bad(text, "clamp applies to FP16 compute only (it is transformers' FP16 overflow guard)")
    if tf32 and (res is not None or islands or clamp):
        raise _bad(text, "tf32 computes everything in FP32 already: it takes no suffixes")
    p = Precision(name="", compute=compute, storage=storage, tf32=tf32, residual_fp32_from=res,
                  islands=tuple(islands), clamp=clamp)
    return _named(p)


def _named(p: Precision) -> Precision:
    from dataclasses import replace

    return replace(p, name=normalise(p))


def normalise(p: Precision) -> str:
    """The canonical text of a recipe: the key its results are filed under."""
    compute = TF32 if p.tf32 else p.compute.name
    storage = [f.name for f in p.storage]
    if storage == [p.compute.name]:
        storage = []  # fp16@fp16 is fp16; fp32@tf32 is tf32
    parts = ["@".join([*storage, compute])]
    if p.residual_fp32_from is not None:
        parts.append("res32" if p.residual_fp32_from == 0 else f"res32:{p.residual_fp32_from}")
    parts += [f"{i.format.name}:{i.pattern}" for i in p.islands]
    if p.clamp:
        parts.append("clamp")
    return "+".join(parts)


def with_changes(p: Precision, **changes) -> Precision:
    """`p` with some fields replaced, renamed to its new canonical text (repair candidates)."""
    from dataclasses import replace

    return _named(replace(p, **changes))


def summary(p: Precision) -> str:
    """One sentence a user can read: 'weights rounded to BF16, then to FP16; computed in FP16; ...'."""
    up = lambda f: f.name.upper()  # noqa: E731
    compute = "FP32 with TF32 matmuls" if p.tf32 else up(p.compute)
    if p.storage == (p.compute,):
        out = [f"weights and compute in {compute}"]
    else:
        out = [f"weights rounded to {', then '.join(up(f) for f in p.storage)}; computed in {compute}"]
    if p.residual_fp32_from is not None:
        start = "" if p.residual_fp32_from == 0 else f" from decoder layer {p.residual_fp32_from}"
        out.append(f"FP32 residual stream{start} (norms and residual adds in FP32, attention and MLP in "
                   f"{up(p.compute)})")
    for i in p.islands:
        out.append(f"modules matching {i.pattern} in {up(i.format)}")
    if p.clamp:
        out.append("decoder-layer outputs clamped to ±(65504 − 1000) where they overflow")
    return "; ".join(out)


def matches(pattern: str, name: str) -> bool:
    """Whether module `name` (dotted) ends with `pattern`'s segments, '%' matching any one."""
    want, have = pattern.split("."), name.split(".")
    if len(want) > len(have):
        return False
    return all(w == "%" or w == h for w, h in zip(want, have[len(have) - len(want):], strict=True))


def _narrow(a: Format, b: Format) -> Format:
    return a if a.finite_max <= b.finite_max else b


def _ancestors(name: str) -> list[str]:
    """`name` and its parents, innermost first: a.b.c, a.b, a."""
    segs = name.split(".")
    return [".".join(segs[:k]) for k in range(len(segs), 0, -1)]


class Layout:
    """Which format each module of a model computes in and hands on under a recipe, from its structure alone.

    `watched` is (name, kind, layer) of the modules model/modules.py finds (embedding, decoder
    layers, their attention/MLP "blocks", norms, LM head); `after` the names of modules outside the
    decoder layers that run after them (the final norm). Pure: convert.py applies it to a model,
    the numerics observer measures headroom against it, and both agree by construction.
    """

    def __init__(self, p: Precision, watched: list[tuple[str, str, int | None]], after: set[str]):
        self.p = p
        self.layers = {n: layer for n, kind, layer in watched if kind == "layer"}
        self.blocks = {n for n, kind, _ in watched if kind in ("attention", "mlp")}
        self.heads = {n for n, kind, _ in watched if kind == "lm_head"}
        self.after = after
        self.fp32 = FORMATS["fp32"]

    def island(self, name: str) -> tuple[Island, str] | None:
        """The innermost island covering module `name`, and the module it is rooted at."""
        for anc in _ancestors(name):
            for island in self.p.islands:
                if matches(island.pattern, anc):
                    return island, anc
        return None

    def _layer_of(self, name: str) -> int | None:
        for anc in _ancestors(name):
            if anc in self.layers:
                return self.layers[anc]
        return None

    def stream_format(self, name: str) -> Format:
        """Where `name` computes, islands aside: the FP32 residual stream, or the compute format."""
        res = self.p.residual_fp32_from
        if res is None or any(anc in self.heads for anc in _ancestors(name)):
            return self.p.compute
        layer = self._layer_of(name)
        if layer is not None:
            in_block = any(anc in self.blocks for anc in _ancestors(name))
            return self.fp32 if layer >= res and not in_block else self.p.compute
        if any(anc in self.after for anc in _ancestors(name)):
            return self.fp32  # the final norm reads the stream
        return self.fp32 if res == 0 else self.p.compute  # embedding side: FP32 only for a stream from layer 0

    def compute_format(self, name: str) -> Format:
        """The format module `name`'s parameters are held in and its forward runs in."""
        found = self.island(name)
        return found[0].format if found else self.stream_format(name)

    def context(self, name: str) -> Format:
        """The format around module `name`: what an island rooted there casts its outputs back to."""
        if name in self.layers:
            res = self.p.residual_fp32_from
            return self.fp32 if res is not None and self.layers[name] >= res else self.p.compute
        parent = name.rpartition(".")[0]
        found = self.island(parent) if parent else None
        return found[0].format if found else self.stream_format(parent)

    def output_limit(self, name: str) -> Format:
        """The narrowest format module `name`'s output passes through on its way on: its headroom's limit."""
        found = self.island(name)
        if found is None:
            return self.stream_format(name)
        island, root = found
        if root != name or name in self.heads:  # inside an island; or the logits, which leave as computed
            return island.format
        return _narrow(island.format, self.context(name))


def module_formats(p: Precision, modules: list[tuple[str, str, int | None]]) -> dict[str, Format]:
    """{name: the format of its output} for watched modules given in execution order (numerics' headroom)."""
    if not p.has_regions:
        return {name: p.compute for name, _, _ in modules}
    after, seen_layer = set(), False
    for name, kind, layer in modules:
        seen_layer |= kind == "layer"
        if seen_layer and layer is None and kind != "layer":
            after.add(name)
    layout = Layout(p, modules, after)
    return {name: layout.output_limit(name) for name, _, _ in modules}


def weights_format(p: Precision) -> Format | None:
    """The one format the weights were rounded to, where they went through exactly one rounding.

    fp16, fp16@fp32 and fp16+res32:7 hold FP16-rounded weights (whatever they compute in):
    the weight-conversion statistics of plain FP16 describe them. bf16@fp16 rounds twice: None.
    """
    if len(p.storage) == 1 and (p.compute == p.storage[0] or p.compute == FORMATS["fp32"]):
        return p.storage[0]
    return None
