"""Apply a precision recipe (recipes.py) to a checkpoint: weight roundings, regions in other formats, casts.

How, for a recipe that is not a plain dtype:
1. The model is loaded as the plain compute dtype would be (`loading.load_model`), so buffers,
   `_keep_in_fp32_modules` and everything else transformers does at that dtype are as in a plain
   run.
2. Each parameter gets the checkpoint's value rounded through the storage chain in order
   (`x.to(fmt).to(float32)` per step), cast to the format its module computes in (the Layout).
   The checkpoint's values come from the loaded model itself where they are exact there (a
   model loaded in FP32; or a storage chain that is just the compute format, whose one rounding
   the load already made), else from a second, FP32 load on the CPU (exact for FP16/BF16/FP32
   checkpoints), dropped afterwards.
3. Regions: modules computing in another format get forward pre-hooks that cast their floating
   inputs and forward hooks that cast their outputs at the boundary: an island's outputs back to
   the format around it, an FP32 residual stream's attention/MLP outputs to FP32; the LM head's
   input to the head's format (its logits leave as computed). A parameter tied between modules
   of two formats (an embedding tied to the head) is untied: each gets its own copy.
4. `clamp`: a forward hook on each decoder layer does what transformers does to FP16 hidden
   states in T5/BART-style models: where any value is inf, clamp to ±(finfo.max − 1000), else
   to ±finfo.max. (transformers 5.x applies no clamp to Gemma 3; the one proposed for it, PR
   #36832, clamped inside the layer and was not merged. A hook sees layer outputs only.)
"""

from __future__ import annotations

import torch

from evalsuite.errors import ModelLoadError
from evalsuite.model.loading import load_model, unload
from evalsuite.model.modules import find_modules
from evalsuite.model.precision import FORMATS, Precision
from evalsuite.model.recipes import Layout, matches

_FP32 = Precision(name="fp32", compute=FORMATS["fp32"], storage=(FORMATS["fp32"],))


def load_recipe(source: str, p: Precision, device: torch.device, trust_remote_code: bool = False,
                attn_implementation: str | None = None, device_map: str | None = None) -> torch.nn.Module:
    """`source` loaded and converted as recipe `p` prescribes (a plain dtype: exactly `load_model`)."""
    model = load_model(source, p, device, trust_remote_code, attn_implementation, device_map=device_map)
    if p.is_plain or (p.tf32 and p.storage == (p.compute,)):
        return model
    original = None
    if not (p.compute == FORMATS["fp32"] or p.storage == (p.compute,)):
        original = load_model(source, _FP32, torch.device("cpu"), trust_remote_code, attn_implementation)
    try:
        apply_recipe(model, p, original)
    finally:
        if original is not None:
            unload(original)
    return model


def layout_of(model: torch.nn.Module, p: Precision) -> Layout:
    """The recipe's Layout over this model's structure (final-side norms by registration order)."""
    watched = find_modules(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = [w.name for w in watched if w.kind == "layer"]
    last = max((order[n] for n in layers), default=-1)
    after = {w.name for w in watched if w.layer is None and w.kind == "norm" and order[w.name] > last}
    res = p.residual_fp32_from
    if res is not None and res >= len(layers):
        raise ModelLoadError(f"{p.name}: the FP32 residual stream starts at decoder layer {res}, but the model has "
                             f"{len(layers)} (0 to {len(layers) - 1})")
    names = set(order)
    for island in p.islands:
        if not any(matches(island.pattern, n) for n in names):
            raise ModelLoadError(f"{p.name}: no module of this model matches {island.pattern!r} (module names look "
                                 f"like {layers[0] if layers else next(iter(names))}.mlp)")
    return Layout(p, [(w.name, w.kind, w.layer) for w in watched], after)


def _round(x: torch.Tensor, p: Precision) -> torch.Tensor:
    """x (float32) rounded through the storage chain, as float32."""
    for fmt in p.storage:
        x = x.to(fmt.dtype).to(torch.float32)
    return x


@torch.no_grad()
def apply_recipe(model: torch.nn.Module, p: Precision, original: torch.nn.Module | None = None) -> None:
    """Convert a loaded model in place; `original`: the checkpoint in FP32 where `model` does not hold it exactly."""
    layout = layout_of(model, p)
    source = dict(original.named_parameters(remove_duplicate=False)) if original is not None else None
    loaded = {id(q): q.dtype for q in model.parameters()}  # as the plain compute-dtype load left them
    done: dict[int, torch.dtype] = {}  # id(parameter) -> dtype it was given (tied parameters)
    for mod_name, module in model.named_modules():
        fmt = layout.compute_format(mod_name) if p.has_regions else p.compute
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            keep = loaded[id(param)] if fmt == p.compute else fmt.dtype  # _keep_in_fp32_modules stay as loaded
            if id(param) in done:
                if done[id(param)] != keep:  # tied across two formats: this module gets its own copy
                    setattr(module, pname, torch.nn.Parameter(param.detach().to(keep), requires_grad=False))
                continue
            value = _value(param, full, p, source)
            if value is not None or param.dtype != keep:
                param.data = (value if value is not None else param.detach()).to(device=param.device, dtype=keep)
            done[id(param)] = keep
    if p.has_regions:
        _install_casts(model, layout)
    if p.clamp:
        for name in layout.layers:
            model.get_submodule(name).register_forward_hook(_clamp_hook)


def _value(param: torch.nn.Parameter, name: str, p: Precision, source: dict | None) -> torch.Tensor | None:
    """The parameter's storage-rounded value (float32), or None where the loaded value already is it."""
    if source is not None:
        if name not in source:
            raise ModelLoadError(f"{p.name}: parameter {name} of the converted model is missing from the FP32 load")
        return _round(source[name].detach().to(param.device, torch.float32), p)
    if p.storage == (p.compute,):
        return None  # the load rounded to the compute format once: that is the chain
    return _round(param.detach().float(), p)  # loaded in FP32: exact checkpoint values


def _cast(value, dtype: torch.dtype, name: str | None = None):
    """Floating tensors in `value` (nested in tuples/lists/dicts) cast to `dtype`; everything else as is.

    An additive attention mask is clamped to the target's range first, as transformers would have
    built it in that dtype (0 and finfo.min), instead of turning -3.4e38 into -inf.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dtype == dtype:
            return value
        if name == "attention_mask" and torch.finfo(dtype).max < torch.finfo(value.dtype).max:
            value = value.clamp(min=torch.finfo(dtype).min)
        return value.to(dtype)
    if isinstance(value, tuple | list):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype, k) for k, v in value.items()}
    return value


def _cast_inputs(dtype: torch.dtype):
    def hook(module, args, kwargs):
        return _cast(args, dtype), _cast(kwargs, dtype)
    return hook


def _cast_outputs(dtype: torch.dtype):
    def hook(module, args, output):
        return _cast(output, dtype)
    return hook


def _install_casts(model: torch.nn.Module, layout: Layout) -> None:
    """The boundary casts of the recipe's regions (see the module docstring)."""
    p, fp32 = layout.p, FORMATS["fp32"]
    res = p.residual_fp32_from
    roots = {}
    for name, _ in model.named_modules():
        found = layout.island(name)
        if found is not None and found[1] == name:
            roots[name] = found[0]
    if res is not None:
        entry = next(n for n, i in layout.layers.items() if i == res)
        model.get_submodule(entry).register_forward_pre_hook(_cast_inputs(torch.float32), with_kwargs=True)
        for block in layout.blocks:
            if layout._layer_of(block) >= res and layout.island(block) is None:
                module = model.get_submodule(block)
                module.register_forward_pre_hook(_cast_inputs(p.compute.dtype), with_kwargs=True)
                module.register_forward_hook(_cast_outputs(fp32.dtype))
    for head in layout.heads if res is not None else ():  # the final norm hands on FP32
        if head not in roots:
            model.get_submodule(head).register_forward_pre_hook(_cast_inputs(layout.compute_format(head).dtype),
                                                                with_kwargs=True)
    for name, island in roots.items():
        module = model.get_submodule(name)
        module.register_forward_pre_hook(_cast_inputs(island.format.dtype), with_kwargs=True)
        if name not in layout.heads:
            module.register_forward_hook(_cast_outputs(layout.context(name).dtype))


def _clamp_hook(module, args, output):
    """transformers' FP16 clamp (e.g. T5LayerFF): ±(max − 1000) where the tensor holds an inf, else ±max."""
    hidden = output[0] if isinstance(output, tuple) else output
    if hidden.dtype != torch.float16:
        return None
    info = torch.finfo(hidden.dtype)
    limit = torch.where(torch.isinf(hidden).any(), info.max - 1000, info.max)  # no host sync
    clamped = torch.clamp(hidden, min=-limit, max=limit)
    return (clamped, *output[1:]) if isinstance(output, tuple) else clamped
