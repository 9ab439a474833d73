"""GPU behaviour (skipped without CUDA): true-FP32 flags, and agreement with float64 on the card."""

from __future__ import annotations

import pytest
import torch
from helpers import run_pair

from evalsuite.model.precision import DTYPES, exact_fp32, unsupported_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _matmul_rel_err() -> float:
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.float64)
    b = torch.randn(1024, 1024, device="cuda", dtype=torch.float64)
    exact = a @ b
    return float(((a.float() @ b.float()).double() - exact).norm() / exact.norm())


def test_exact_fp32_turns_tf32_off_even_if_the_user_turned_it_on():
    from evalsuite.model.precision import _NEW_API, numeric_flags

    if _NEW_API:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert numeric_flags()["cuda_matmul_allow_tf32"] is True
        assert _matmul_rel_err() > 1e-5  # TF32 really is on: ~1e-4..1e-3
        with exact_fp32() as flags:
            assert flags["cuda_matmul_allow_tf32"] is False and flags["cudnn_allow_tf32"] is False
            assert flags["cuda_matmul_allow_fp16_reduced_precision_reduction"] is False
            assert _matmul_rel_err() < 1e-6  # true FP32
        assert numeric_flags()["cuda_matmul_allow_tf32"] is True  # restored afterwards
    finally:
        if _NEW_API:
            torch.backends.cuda.matmul.fp32_precision = "ieee"
        else:
            torch.backends.cuda.matmul.allow_tf32 = False


def test_bf16_supported_on_this_card():
    assert unsupported_reason(DTYPES["bf16"], torch.device("cuda")) is None or torch.cuda.get_device_capability()[0] < 8


def test_cuda_run_matches_all_in_memory_float64(tiny_llama, tmp_path):
    from test_runner import _all_in_memory, _config

    cfg = _config(tmp_path, device="cuda", dtypes=(DTYPES["fp16"],), batch_size=1)
    results, per_token = run_pair(cfg, str(tiny_llama))
    expect = _all_in_memory(tiny_llama, cfg, torch.float16, device="cuda")
    m = results.dtypes["fp16"].metrics
    assert abs(m["kl_mean"] - expect["kl"].mean()) <= 1e-6
    assert results.provenance["reference_flags"]["cuda_matmul_allow_tf32"] is False
    assert results.provenance["device_name"] == torch.cuda.get_device_name(0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_kernel_on_the_card_matches_float64(dtype):
    import numpy as np

    from evalsuite.metrics import kernels
    from evalsuite.metrics.divergence import token_divergence

    assert kernels.available(torch.device("cuda"))
    c, v = 300, 151_936
    ref = torch.randn(c, v, device="cuda") * 3 + 20
    test = (ref + torch.randn(c, v, device="cuda") * 0.02).to(dtype)
    test[7, 11] = float("inf")
    tg = torch.randint(0, v, (c,), device="cuda")
    td = token_divergence(ref, test, tg)
    r, t = ref.double(), test.double()
    lr, lt = torch.log_softmax(r, -1), torch.log_softmax(t, -1)
    kl = (lr.exp() * (lr - lt)).sum(-1)
    ok = torch.ones(c, dtype=torch.bool, device="cuda")
    ok[7] = False
    np.testing.assert_allclose(td.kl[ok].cpu().numpy(), kl[ok].cpu().numpy(), rtol=1e-9, atol=1e-13)
    assert torch.isnan(td.kl[7]) and int(td.test.nonfinite[7]) == 1
    assert torch.equal(td.top1_agree[ok], (r.argmax(-1) == t.argmax(-1))[ok])


def test_per_chunk_and_per_batch_work_never_waits_for_the_gpu(tiny_llama):
    """What evalsuite adds around the model's forward runs with no host sync (set_sync_debug_mode).

    A sync there (a `.item()`, a tensor made from a Python scalar, CUDA `bincount`) makes the CPU
    wait for the GPU's queue, and the GPU then idles while Python launches the next kernels.
    HF's own forward syncs once per call (its packed-sequence check), so it runs outside the guard.
    """
    from evalsuite.metrics.divergence import reference_tokens
    from evalsuite.model.forward import Scorer
    from evalsuite.model.loading import load_model
    from evalsuite.model.modules import find_modules
    from evalsuite.numerics.hooks import Recorder, magnitude_histogram
    from evalsuite.passes.scoring import compare, keep_reference, staging

    gpu = torch.device("cuda")
    model = load_model(str(tiny_llama), DTYPES["bf16"], gpu)
    scorer = Scorer(model, gpu, pad_head=True)
    ids = torch.randint(0, scorer.vocab_size, (2, 65), device=gpu)
    hidden = scorer._body(ids[:, :-1]).reshape(-1, model.config.hidden_size)  # (128, H)
    targets = ids[:, 1:].reshape(-1)
    n, v = targets.numel(), scorer.vocab_size
    buffer = torch.randn(n, v, device=gpu)
    staged_ref, staged = staging(n, gpu, divergence=False), staging(n, gpu, divergence=True)
    watched = find_modules(model)
    recorder = Recorder(watched, gpu, histogram=True)
    recorder.attach()
    x = torch.randn(4096, 300, device=gpu)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        recorder.start_batch(0)
        logits = scorer._split_logits(hidden)  # the padded head and its forward hooks (the lm_head's)
        keep_reference(buffer, staged_ref, 0, logits.float(), targets)
        compare(buffer, staged, 0, logits, targets)
        reference_tokens(logits, targets)
        magnitude_histogram(x)
        recorder.start_batch(n)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        recorder.detach()
    rows, _ = recorder.finish()
    assert rows and rows[0][1].max() > 0  # the lm_head hook did run
