"""model/cpu.py: half-precision Linears as FP32 GEMMs, checked against exact float64 products
and against PyTorch's own half kernel; the allocator thresholds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import build_model

from evalsuite.model import cpu
from evalsuite.model.loading import load_model
from evalsuite.model.precision import DTYPES

HALF = [torch.float16, torch.bfloat16]


def _operands(dtype, seed=0, m=96, k=640, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


def _linear(w, b) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_gemm_is_an_fp32_accumulating_half_gemm(dtype, bias):
    """Both kernels: the exact product (float64) plus at most FP32-accumulation error, rounded once."""
    x, w, b = _operands(dtype, seed=1 + bias)
    b = b if bias else None
    lin = _linear(w, b)
    native = lin(x)
    assert cpu.fp32_accumulating_linears(torch.nn.Sequential(lin), mode="fp32") == 1
    routed = lin(x)
    assert routed.dtype == dtype
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())  # (m, n)
    # bound: half a unit of the half format at the output, plus K * eps32 * sum |x||w| of accumulation
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
    bound = ulp + x.shape[1] * torch.finfo(torch.float32).eps * scale
    for out in (native, routed):
        assert bool(((out.double() - exact).abs() <= bound).all())
    same = (native == routed).double().mean().item()
    assert same > 0.99  # the rest differ in the order of FP32 additions only


@pytest.mark.parametrize("dtype", HALF)
def test_overflow_is_the_same_inf(dtype):
    big = torch.full((2, 640), 200.0, dtype=dtype)
    lin = _linear(torch.full((4, 640), 200.0 if dtype == torch.float16 else 1e36, dtype=dtype), None)
    native = lin(big)
    cpu.fp32_accumulating_linears(torch.nn.Sequential(lin), mode="fp32")
    routed = lin(big)
    assert torch.equal(native.isinf(), routed.isinf()) and bool(routed.isinf().all())


def test_a_model_routes_every_half_linear_and_shares_tied_copies(tmp_path):
    path = build_model(tmp_path / "m", "llama", seed=5)
    model = load_model(str(path), DTYPES["fp16"], torch.device("cpu"))
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = model(input_ids=ids).logits.double()  # (2, 24, V)
        assert cpu.fp32_accumulating_linears(model, mode="fp32") == len(linears)
        routed = model(input_ids=ids).logits.double()
    kl = (native.log_softmax(-1).exp() * (native.log_softmax(-1) - routed.log_softmax(-1))).sum(-1)
    assert routed.dtype == torch.float64 and float(kl.max()) < 1e-5  # FP16 noise, not a different model
    assert float((native - routed).abs().max()) < 0.05


def test_native_and_fp32_models_are_left_alone(tmp_path):
    path = build_model(tmp_path / "m", "llama", seed=6)
    half = load_model(str(path), DTYPES["bf16"], torch.device("cpu"))
    assert cpu.fp32_accumulating_linears(half, mode="native") == 0
    full = load_model(str(path), DTYPES["fp32"], torch.device("cpu"))
    assert cpu.fp32_accumulating_linears(full, mode="fp32") == 0


def test_auto_follows_the_cpu_instructions(tmp_path, monkeypatch):
    path = build_model(tmp_path / "m", "llama", seed=7)
    n = sum(type(m) is torch.nn.Linear for m in load_model(str(path), DTYPES["fp32"], torch.device("cpu")).modules())
    monkeypatch.setattr(cpu, "native_half_gemm", lambda dtype: dtype == torch.bfloat16)  # e.g. AVX512-BF16
    assert cpu.fp32_accumulating_linears(load_model(str(path), DTYPES["bf16"], torch.device("cpu"))) == 0
    assert cpu.fp32_accumulating_linears(load_model(str(path), DTYPES["fp16"], torch.device("cpu"))) == n


def test_allocator_thresholds_apply_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert cpu.tune_allocator() is True
