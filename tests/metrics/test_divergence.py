"""Per-token divergence against float64 numpy on fresh random logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evalsuite.metrics.divergence import reference_tokens, token_divergence


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("test_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_divergence_matches_float64(test_dtype):
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    c, v = 37, 1009
    ref = torch.randn(c, v, generator=gen) * 4
    test = (ref + torch.randn(c, v, generator=gen) * 0.05).to(test_dtype)
    targets = torch.randint(0, v, (c,), generator=gen)
    td = token_divergence(ref, test, targets)

    r64, t64 = ref.double().numpy(), test.double().numpy()
    lr, lt = _log_softmax64(r64), _log_softmax64(t64)
    kl = (np.exp(lr) * (lr - lt)).sum(-1)
    tg = targets.numpy()
    rows = np.arange(c)
    np.testing.assert_allclose(td.kl.numpy(), kl, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(td.top1_agree.numpy(), r64.argmax(-1) == t64.argmax(-1))
    np.testing.assert_allclose(td.p_ref.numpy(), np.exp(lr[rows, tg]), rtol=1e-5)
    np.testing.assert_allclose(td.p_test.numpy(), np.exp(lt[rows, tg]), rtol=1e-5)
    np.testing.assert_allclose(td.max_abs_dlogit.numpy(), np.abs(t64 - r64).max(-1), rtol=1e-6)
    np.testing.assert_allclose(td.test.nll.numpy(), -lt[rows, tg], rtol=1e-6, atol=1e-6)


def test_identical_logits_give_zero_kl():
    x = torch.randn(5, 300)
    td = token_divergence(x, x.clone(), torch.zeros(5, dtype=torch.long))
    assert td.kl.abs().max() < 1e-6 and td.top1_agree.all()


def test_nonfinite_test_tokens_are_nan_and_counted():
    ref = torch.randn(4, 50)
    test = ref.clone()
    test[1, 3] = float("inf")
    test[2] = float("nan")
    td = token_divergence(ref, test, torch.zeros(4, dtype=torch.long))
    assert td.test.nonfinite.tolist() == [0, 1, 50, 0]
    assert torch.isnan(td.kl[1]) and torch.isnan(td.kl[2]) and torch.isfinite(td.kl[[0, 3]]).all()
    assert not td.top1_agree[1] and not td.top1_agree[2]


def test_reference_tokens_nll():
    x = torch.randn(9, 77) * 3
    t = torch.randint(0, 77, (9,))
    r = reference_tokens(x, t)
    lp = _log_softmax64(x.double().numpy())
    np.testing.assert_allclose(r.nll.numpy(), -lp[np.arange(9), t.numpy()], rtol=1e-6)
    assert r.argmax.tolist() == x.argmax(-1).tolist()


_FUSED_CHECK = r"""
import numpy as np, torch
from evalsuite.metrics import kernels
from evalsuite.metrics.divergence import reference_tokens, token_divergence
assert kernels.available(torch.device("cpu"))
rng = np.random.default_rng()
def lsm(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    c, v = 6, int(rng.integers(300, 2600))  # not a multiple of the block: masked tails
    ref = torch.from_numpy(rng.normal(0, 4, (c, v)) + 25).float()
    test = (ref + torch.from_numpy(rng.normal(0, 0.05, (c, v))).float()).to(dtype)
    test[2, 5] = float("nan")
    tg = torch.from_numpy(rng.integers(0, v, c))
    td = token_divergence(ref, test, tg)
    r, t = ref.double().numpy(), test.double().numpy()
    lr, lt = lsm(r), lsm(t)
    kl = (np.exp(lr) * (lr - lt)).sum(-1)
    ok = np.arange(c) != 2
    np.testing.assert_allclose(td.kl.numpy()[ok], kl[ok], rtol=1e-9, atol=1e-12)
    assert np.isnan(td.kl.numpy()[2]) and td.test.nonfinite.tolist()[2] == 1
    rows = np.arange(c)
    np.testing.assert_allclose(td.p_ref.numpy(), np.exp(lr[rows, tg]), rtol=1e-12)
    np.testing.assert_allclose(td.test.nll.numpy()[ok], -lt[rows, tg][ok], rtol=1e-12)
    np.testing.assert_allclose(td.max_abs_dlogit.numpy()[ok], np.abs(t - r).max(-1)[ok], rtol=1e-6)
    assert (td.top1_agree.numpy()[ok] == (r.argmax(-1) == t.argmax(-1))[ok]).all()
    rt = reference_tokens(ref, tg)
    np.testing.assert_allclose(rt.nll.numpy(), -lr[rows, tg], rtol=1e-12)
    assert rt.argmax.tolist() == r.argmax(-1).tolist() and rt.nonfinite.sum() == 0
# ties: the first index wins, wherever the lanes are; identical rows: KL 0 to rounding
ref = torch.from_numpy(rng.normal(0, 1, (3, 3000))).float()
ref[0, [2999, 1700, 100]] = 9.0
ref[1, [5, 6]] = 9.0
same = token_divergence(ref, ref.clone(), torch.zeros(3, dtype=torch.long))
assert same.test.argmax.tolist()[:2] == [100, 5] == reference_tokens(ref, torch.zeros(3, dtype=torch.long)).argmax.tolist()[:2]
assert same.top1_agree.all() and np.abs(same.kl.numpy()).max() < 1e-14 and same.max_abs_dlogit.max() == 0
print("fused ok")
"""


def test_fused_kernel_matches_float64_in_triton_interpreter():
    """The GPU kernel's arithmetic, run by Triton's CPU interpreter (tests/test_gpu.py runs it on a card)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _FUSED_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused ok" in proc.stdout
