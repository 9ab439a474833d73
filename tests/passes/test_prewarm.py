"""passes/scoring.prewarm_kernels: the fused kernel's variants compiled while the reference loads."""

from __future__ import annotations

import pytest
import torch

from evalsuite.passes.scoring import prewarm_kernels, warm_kernels


def test_nothing_is_started_without_a_gpu_or_a_vocabulary():
    assert prewarm_kernels(torch.device("cpu"), 49953, [torch.float16]) is None
    assert prewarm_kernels(torch.device("cuda", 0), None, [torch.float16]) is None


def _variants(kernel, device) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton keeps its compiled variants elsewhere")
    entry = caches.get(device.index if device.index is not None else torch.cuda.current_device())
    return len(entry[0]) if entry else 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_passes_find_their_kernel_compiled(tiny_llama, dtype, pad):
    """After the thread, neither the reference's probe nor a test pass's (its own chunk layout,
    a padded head's view included) compiles anything new."""
    from transformers import AutoModelForCausalLM

    from evalsuite.metrics import kernels
    from evalsuite.model.forward import Scorer
    from evalsuite.model.loading import vocab_size

    device = torch.device("cuda", 0)
    vocab = vocab_size(str(tiny_llama))
    thread = prewarm_kernels(torch.device("cuda"), vocab, [dtype])  # as a run resolves --device cuda
    assert thread.reference_ready.wait(timeout=600)  # the reference's variants come first
    thread.join()
    assert thread.error is None
    before = _variants(kernels._lanes_kernel, device)
    assert before >= 1
    for p_dtype, role in ((torch.float32, "reference"), (dtype, "test")):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=p_dtype).to(device).eval()
        scorer = Scorer(model, device, pad_head=pad if p_dtype != torch.float32 else False)
        assert (scorer.padded_head is not None) == (pad and p_dtype != torch.float32)
        warm_kernels(scorer, role)
    assert _variants(kernels._lanes_kernel, device) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_failing_thread_still_lets_the_reference_start(monkeypatch):
    """The reference waits on reference_ready: a thread that fails must set it, or the run would hang."""
    from evalsuite.passes import scoring

    def boom(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(scoring, "_variants", boom)
    thread = prewarm_kernels(torch.device("cuda", 0), 49953, [torch.float16])
    assert thread.reference_ready.wait(timeout=60)
    thread.join()
    assert isinstance(thread.error, RuntimeError)
