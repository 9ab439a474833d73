"""Which modules of a decoder-only model play which role: embedding, decoder layers, their
attention/MLP/norm children, the LM head.

Found by structure and class name, so any transformers decoder works without a per-architecture
table. One place, because the numerics observers hook these modules, `--compile` compiles them,
and precision recipes keep named ones in another dtype: all three must agree on what a "layer"
or an "attention" module is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from evalsuite.model.loading import model_part, text_config

_ATTN = re.compile(r"(^|_)(self_attn|attn|attention|self_attention)$")
_MLP = re.compile(r"(^|_)(mlp|feed_forward|ffn|mlp_block)$")


@dataclass(frozen=True)
class Watched:
    name: str
    kind: str  # layer | attention | mlp | norm | embedding | lm_head
    layer: int | None  # decoder layer index, None outside the layers
    module: torch.nn.Module


def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    config = text_config(model.config)
    n = getattr(config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    exact = [x for x in lists if len(x[1]) == n]
    chosen = exact or sorted(lists, key=lambda x: -len(x[1]))
    return chosen[0] if chosen else None


def find_modules(model: torch.nn.Module) -> list[Watched]:
    """The modules to watch, in `named_modules` order (execution order is learned at run time)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: list[Watched] = []
    emb = model_part(model, "get_input_embeddings")
    if emb is not None and id(emb) in names:
        out.append(Watched(names[id(emb)], "embedding", None, emb))
    found = _decoder_layers(model)
    layer_of: dict[str, int] = {}
    if found is not None:
        prefix, layers = found
        for i, layer in enumerate(layers):
            layer_name = f"{prefix}.{i}"
            layer_of[layer_name] = i
            out.append(Watched(layer_name, "layer", i, layer))
            for child_name, child in layer.named_children():
                cls = type(child).__name__
                if _ATTN.search(child_name) or "Attention" in cls:
                    out.append(Watched(f"{layer_name}.{child_name}", "attention", i, child))
                elif _MLP.search(child_name) or "MLP" in cls or "FeedForward" in cls:
                    out.append(Watched(f"{layer_name}.{child_name}", "mlp", i, child))
    for name, m in model.named_modules():
        if "Norm" in type(m).__name__:
            layer = next((i for p, i in layer_of.items() if name.startswith(p + ".")), None)
            out.append(Watched(name, "norm", layer, m))
    head = model_part(model, "get_output_embeddings")
    if head is not None and id(head) in names:
        out.append(Watched(names[id(head)], "lm_head", None, head))
    return out


