"""Per-token statistics from logits, computed on the device in float64.

These run on a chunk of tokens at a time ((C, V) logits, C chosen so one chunk is a few hundred
MB), so no full-vocabulary float32 tensor for a whole batch ever exists. They are pure
functions of tensors; `tests/metrics/test_divergence.py` checks them against float64 numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evalsuite.metrics import kernels


@dataclass(frozen=True)
class ReferenceTokens:
    nll: torch.Tensor  # (C,) float64, -log p(target)
    argmax: torch.Tensor  # (C,) int64
    nonfinite: torch.Tensor  # (C,) int64 count of non-finite logits per token


def reference_tokens(logits: torch.Tensor, targets: torch.Tensor) -> ReferenceTokens:
    """NLL and argmax per token. logits (C, V) any float dtype; targets (C,) int64."""
    if kernels.available(logits.device):
        out = kernels.fused_rows(logits, logits)  # (C, N_OUT): the test columns describe `logits` itself
        col = kernels.COL
        target_logit = logits.gather(1, targets[:, None]).squeeze(1).double()
        return ReferenceTokens(nll=out[:, col["lse_test"]] - target_logit, argmax=out[:, col["argmax_test"]].long(),
                               nonfinite=out[:, col["nonfinite_test"]].long())
    x = _float64_copy(logits)  # (C, V) float64: the NLL sums to a perplexity over many tokens
    target_logit = x.gather(1, targets[:, None]).squeeze(1)  # (C,)
    nonfinite = _nonfinite(x)
    lse, argmax, _, _ = _lse_in_place(x)
    return ReferenceTokens(nll=lse - target_logit, argmax=argmax, nonfinite=nonfinite)


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
    KL is over the full vocabulary: sum_v p_ref(v) * (log p_ref(v) - log p_test(v)), all in
    float64. Why not float32: a float32 log-softmax carries an error of about |logsumexp| * 6e-8
    (1e-6 nats for logits near 20) into every token's KL, as large as FP16's whole effect on a
    good model. Tokens whose test logits are not all finite get NaN; the caller excludes them.
    """
    if kernels.available(ref_logits.device):
        return _fused_divergence(ref_logits, test_logits, targets)
    return _cpu_divergence(ref_logits, test_logits, targets)


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    """(C,) int64 non-finite entries per row of x (C, V) float64, counted only in rows that have one.

    A row's float64 sum of float16/float32 values cannot overflow, so it is non-finite exactly when
    the row holds an inf or a NaN: one cheap reduction instead of a (C, V) mask for every row."""
    count = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    bad = ~torch.isfinite(x.sum(dim=-1))  # (C,)
    if bool(bad.any()):  # the CPU path: a host sync costs nothing here
        count[bad] = (~torch.isfinite(x[bad])).sum(dim=-1)
    return count


def _float64_copy(x: torch.Tensor) -> torch.Tensor:
    """x as a float64 tensor of its own (the caller's is never written: `.double()` of a float64 is itself)."""
    return x.clone() if x.dtype == torch.float64 else x.double()


def _lse_in_place(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logsumexp (C,), argmax (C,), exp(x - max) (C, V), its row sums (C,)) of float64 x (C, V),
    which becomes exp(x - max).

    Why: one max-and-argmax pass and one exp pass. `torch.logsumexp` takes its own max and a
    softmax after it a second exp: the unfused path took 3 exp and 4 max or argmax passes over
    (C, V) float64 a token, this one 2 and 2: 3.3 -> 3.0 ms a token for Gemma 3's 262,144-entry
    vocabulary on the 2-core CPU. The same float64 formula as logsumexp (max + log sum
    exp(x - max)); ties give the first index, as `argmax`. A row with an infinite logit gives
    NaN, as the fused kernel's rows with non-finite inputs do: it is counted in `nonfinite`, and
    every caller leaves such tokens out."""
    m, idx = x.max(dim=-1)  # (C,) each
    e = x.sub_(m[:, None]).exp_()  # (C, V) in place
    total = e.sum(dim=-1)  # (C,)
    return m + total.log(), idx, e, total


def _cpu_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor) -> TokenDivergence:
    """The unfused path, in float64 with three (C, V) temporaries (a CPU is memory-bound here).

    KL(ref || test) = sum_v p_ref(v) (ref_v - test_v) - lse_ref + lse_test, the same sum as
    sum_v p_ref (log p_ref - log p_test) with the log-softmaxes expanded (sum_v p_ref = 1): no
    (C, V) log-softmax is materialised; p_ref is exp(ref - max) / its sum (`_lse_in_place`)."""
    ref = _float64_copy(ref_logits)  # (C, V)
    test = _float64_copy(test_logits)  # (C, V)
    nonfinite = _nonfinite(test)
    ref_t = ref.gather(1, targets[:, None]).squeeze(1)  # (C,)
    test_t = test.gather(1, targets[:, None]).squeeze(1)
    diff = torch.sub(ref, test)  # (C, V)
    dlogit = torch.maximum(diff.amax(dim=-1), diff.amin(dim=-1).neg()).float()  # max_v |test - ref|
    lse_test, argmax_test, _, _ = _lse_in_place(test)  # test is exp(test - max) from here
    lse_ref, argmax_ref, e_ref, z_ref = _lse_in_place(ref)  # ref is exp(ref - max)
    kl = e_ref.mul_(diff).sum(dim=-1) / z_ref - lse_ref + lse_test  # (C,)
    test_tokens = ReferenceTokens(nll=lse_test - test_t, argmax=argmax_test, nonfinite=nonfinite)
    bad = nonfinite > 0
    nan = float("nan")
    return TokenDivergence(
        kl=kl.masked_fill(bad, nan),
        top1_agree=(argmax_test == argmax_ref) & ~bad,
        p_ref=(ref_t - lse_ref).exp(),
        p_test=(test_t - lse_test).exp().masked_fill(bad, nan),
        max_abs_dlogit=dlogit.masked_fill(bad, nan),
        test=test_tokens,
    )


def _fused_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor) -> TokenDivergence:
    """The same statistics from one fused pass (kernels.py): no (C, V) float64 temporaries."""
    out = kernels.fused_rows(ref_logits, test_logits)  # (C, N_OUT) float64
    kl, lse_ref, lse_test, dmax = (out[:, kernels.COL[k]] for k in ("kl", "lse_ref", "lse_test", "max_abs_dlogit"))
    argmax_ref, argmax_test = out[:, kernels.COL["argmax_ref"]].long(), out[:, kernels.COL["argmax_test"]].long()
    nonfinite = out[:, kernels.COL["nonfinite_test"]]  # (C,)
    bad = nonfinite > 0
    ref_t = ref_logits.gather(1, targets[:, None]).squeeze(1).double()
    test_t = test_logits.gather(1, targets[:, None]).squeeze(1).double()
    nan = float("nan")  # a Python scalar: no host-to-device copy, so no sync per chunk
    test = ReferenceTokens(nll=lse_test - test_t, argmax=argmax_test, nonfinite=nonfinite.long())
    return TokenDivergence(
        kl=kl.masked_fill(bad, nan),
        top1_agree=(argmax_ref == argmax_test) & ~bad,
        p_ref=(ref_t - lse_ref).exp(),
        p_test=(test_t - lse_test).exp().masked_fill(bad, nan),
        max_abs_dlogit=dmax.masked_fill(bad, nan).float(),
        test=test,
    )
