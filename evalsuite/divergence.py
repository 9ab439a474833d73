"""Per-token statistics from logits, computed on the device in float32 with float64 sums.

These run on a chunk of tokens at a time ((C, V) logits, C chosen so one chunk is a few hundred
MB), so no full-vocabulary float32 tensor for a whole batch ever exists. They are pure
functions of tensors; `tests/test_divergence.py` checks them against float64 numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReferenceTokens:
    nll: torch.Tensor  # (C,) float64, -log p(target)
    argmax: torch.Tensor  # (C,) int64
    nonfinite: torch.Tensor  # (C,) int64 count of non-finite logits per token


def reference_tokens(logits: torch.Tensor, targets: torch.Tensor) -> ReferenceTokens:
    """NLL and argmax per token. logits (C, V) any float dtype; targets (C,) int64."""
    x = logits.float()  # (C, V)
    lse = torch.logsumexp(x, dim=-1)  # (C,)
    target_logit = x.gather(1, targets[:, None]).squeeze(1)  # (C,)
    nll = (lse.double() - target_logit.double())
    nonfinite = (~torch.isfinite(x)).sum(dim=-1)
    return ReferenceTokens(nll=nll, argmax=x.argmax(dim=-1), nonfinite=nonfinite)


@dataclass(frozen=True)
class TokenDivergence:
    kl: torch.Tensor  # (C,) float64 KL(ref || test) in nats
    top1_agree: torch.Tensor  # (C,) bool
    p_ref: torch.Tensor  # (C,) float64 p_ref(target)
    p_test: torch.Tensor  # (C,) float64 p_test(target)
    max_abs_dlogit: torch.Tensor  # (C,) float32 max_v |logit_test - logit_ref| (finite tokens)
    test: ReferenceTokens  # the test dtype's own NLL/argmax/non-finite counts


def token_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor) -> TokenDivergence:
    """Compare a test dtype's logits with the reference's for the same C tokens.

    ref_logits (C, V) float32, test_logits (C, V) any float dtype, targets (C,) int64.
    KL is over the full vocabulary: sum_v p_ref(v) * (log p_ref(v) - log p_test(v)), with the
    log-softmaxes in float32 and the vocabulary sum accumulated in float64. Tokens whose test
    logits are not all finite get NaN here; the caller counts and excludes them.
    """
    ref = ref_logits.float()  # (C, V)
    test = test_logits.float()  # (C, V)
    test_tokens = reference_tokens(test, targets)
    lp_ref = torch.log_softmax(ref, dim=-1)  # (C, V)
    lp_test = torch.log_softmax(test, dim=-1)  # (C, V)
    p_ref_all = lp_ref.exp()  # (C, V)
    kl = (p_ref_all * (lp_ref - lp_test)).sum(dim=-1, dtype=torch.float64)  # (C,)
    p_ref = lp_ref.gather(1, targets[:, None]).squeeze(1).double().exp()
    p_test = lp_test.gather(1, targets[:, None]).squeeze(1).double().exp()
    dlogit = (test - ref).abs().amax(dim=-1)  # (C,)
    bad = test_tokens.nonfinite > 0
    nan = torch.tensor(float("nan"), device=ref.device)
    return TokenDivergence(
        kl=torch.where(bad, nan.double(), kl),
        top1_agree=(test_tokens.argmax == ref.argmax(dim=-1)) & ~bad,
        p_ref=p_ref,
        p_test=torch.where(bad, nan.double(), p_test),
        max_abs_dlogit=torch.where(bad, nan, dlogit),
        test=test_tokens,
    )
