"""The LM head applied to a chunk of hidden states, through a zero-padded weight where that pays.

Why pad: with a vocabulary that is not a multiple of 8 (Chinese-LLaMA's 49,953) cuBLAS has no
aligned tensor-core kernel for a bf16/fp16 head and falls back to an sm75 one: on an H200 the
0.5B shape's head ran at 95 TFLOP/s instead of 644 (0.94 instead of 0.14 us per token), the 7B
shape's at 3.8 instead of 0.59 us per token (perf/head_align.py, docs/performance.md). Writing
into a padded output view did not help; padding the weight's rows did. Appending zero rows up to
a multiple of 64 (what vLLM does to every vocabulary) changes no logit mathematically; another
GEMM kernel then rounds the products, so a bf16 logit can differ by one unit in the last place
from the model's own forward, as between any two correct GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

VOCAB_PAD = 64  # rows the padded head is rounded up to (vLLM's DEFAULT_VOCAB_PADDING_SIZE)


def pads_by_default(vocab: int, itemsize: int) -> bool:
    """Whether a one-GPU plain-Linear head of this vocabulary and weight size is padded (`padded_head`)."""
    return itemsize == 2 and vocab % 8 != 0


def padded_head(head, vocab: int, pad: bool | None, sharded: bool = False) -> tuple | None:
    """(weight (Vpad, H), bias (Vpad,) or None): the head's with zero rows up to a multiple of VOCAB_PAD.

    pad None decides: a plain nn.Linear head with 2-byte weights on one GPU whose vocabulary is
    not a multiple of 8. Float32 heads are left alone: without TF32 they run at the card's FP32
    rate whatever the alignment (measured: 51 TFLOP/s both ways). pad True forces it (tests on
    CPU), False never pads. Returns None where there is nothing to pad. Costs one copy of the
    head's weight for the pass.
    """
    if pad is None:
        weight = getattr(head, "weight", None)
        pad = (type(head) is torch.nn.Linear and weight is not None and weight.device.type == "cuda"
               and pads_by_default(vocab, weight.element_size()) and not sharded and not hasattr(head, "_hf_hook"))
    if not pad or type(head) is not torch.nn.Linear:
        return None
    rows = -(-vocab // VOCAB_PAD) * VOCAB_PAD
    with torch.no_grad():
        weight = head.weight.new_zeros((rows, head.weight.shape[1]))
        weight[:vocab] = head.weight
        bias = None
        if head.bias is not None:
            bias = head.bias.new_zeros(rows)
            bias[:vocab] = head.bias
    return weight, bias


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-style final_logit_softcapping (logits (C, V)): tanh(x / cap) * cap; no-op without a cap.

    One function for the reference pass and the re-applied head (FrozenHead), so both round alike.
    """
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass(frozen=True)
class FrozenHead:
    """The reference's LM head, kept apart from its model: a copy of its weight, its bias and softcap.

    Why: the reference keeps its final hidden states (N, H) instead of its logits (N, V) (8-400x
    less memory and disk) and the test passes get its logits back by re-applying this head a
    chunk at a time, with the reference model unloaded. The reference pass computes its own
    logits through the very same tensors (Scorer.freeze_head), so re-applied logits are its
    logits bit for bit (same kernel, same chunk shapes, same weights).
    """

    weight: torch.Tensor  # (V, H) float32 (or (Vpad, H): a padded copy)
    bias: torch.Tensor | None  # (V,) or (Vpad,) or None
    vocab: int
    cap: float | None  # final_logit_softcapping, None without

    def linear(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (C, H) -> logits before the softcap (C, V): what the head module's hooks see."""
        return F.linear(hidden, self.weight, self.bias)[:, : self.vocab]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (C, H) -> logits (C, V), as the reference pass computed them (no hooks)."""
        return softcap(self.linear(hidden), self.cap)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)


def freeze(head, padded: tuple | None, vocab: int, cap: float | None) -> FrozenHead | None:
    """A FrozenHead copied from a plain nn.Linear head (or its padded weights); None for any other head.

    A head with pre-hooks (recipes' casts) or module-global hooks is called as a module by apply_head,
    not through its weight: it cannot be frozen.
    """
    if type(head) is not torch.nn.Linear or head._forward_pre_hooks or _global_hooks():
        return None
    weight, bias = padded if padded is not None else (head.weight, head.bias)
    with torch.no_grad():  # fresh allocations: the model's tensors go when it is unloaded
        return FrozenHead(weight.detach().clone(), None if bias is None else bias.detach().clone(), vocab, cap)


def apply_frozen(head: torch.nn.Module, hidden: torch.Tensor, frozen: FrozenHead) -> torch.Tensor:
    """hidden (C, H) -> logits (C, V) before the softcap, through `frozen`, with `head`'s forward hooks
    told as if the module had run (observers see every chunk). Hooks that replace the output are not
    used on the reference (numerics hooks return None): the re-applied logits would not include them."""
    return _call_forward_hooks(head, hidden, frozen.linear(hidden))


def apply_head(head: torch.nn.Module, hidden: torch.Tensor, padded: tuple | None) -> torch.Tensor:
    """hidden (C, H) -> logits (C, V): through `padded` (from padded_head) when given, else the module.

    The padded path hands the head's forward hooks the (C, V) view, so observers hooked on the
    head (numerics.py) see every chunk as if the module had run. A head with pre-hooks, or any
    module-global hook, is called as a module: those could change its input.
    """
    if padded is None or head._forward_pre_hooks or _global_hooks():
        return head(hidden)
    weight, bias = padded
    vocab = head.weight.shape[0]
    logits = F.linear(hidden, weight, bias)[:, :vocab]  # (C, Vpad) -> view (C, V) of padded rows
    return _call_forward_hooks(head, hidden, logits)


def _global_hooks() -> bool:
    """Whether any module-global forward hook is registered."""
    m = torch.nn.modules.module
    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None))


def _call_forward_hooks(module: torch.nn.Module, hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """What `module(hidden)` does after its forward: each forward hook sees (module, args, output).

    A hook that returns a value replaces the output, as in nn.Module.__call__.
    """
    with_kwargs = getattr(module, "_forward_hooks_with_kwargs", {})
    for hook_id, hook in list(module._forward_hooks.items()):
        result = hook(module, (hidden,), {}, output) if with_kwargs.get(hook_id) else hook(module, (hidden,), output)
        if result is not None:
            output = result
    return output
