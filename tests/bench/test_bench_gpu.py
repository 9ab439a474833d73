"""The benchmark batch size on a real GPU: the automatic size's memory estimate against the peak
the forward really allocates, and a real CUDA out-of-memory error backed off from. No lm-eval
needed: a small stand-in runs HFLM's steps (pad right, `_model_call`, log-softmax, gather)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evalsuite.bench import lm as bench_lm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")


class FakeHFLM:
    """The parts of HFLM that bench_lm uses, with its `_loglikelihood_tokens` steps for a causal
    model (no logits cache: every request is its own row)."""

    backend, logits_cache, max_length = "causal", False, 4096

    def __init__(self, model):
        self.model, self.device, self.batch_size_per_gpu = model, DEVICE, 1

    def _model_call(self, inps, attn_mask=None, labels=None):
        with torch.no_grad():
            return self.model(inps).logits

    def _loglikelihood_tokens(self, requests, disable_tqdm=True):
        inps = [torch.tensor((c + t)[-(self.max_length + 1) :][:-1], device=DEVICE) for _, c, t in requests]
        p = max(len(x) for x in inps)
        batch = torch.stack([F.pad(x, (0, p - len(x))) for x in inps])  # (B, p), right-padded with 0
        logp = F.log_softmax(self._model_call(batch), dim=-1)  # (B, keep, V)
        out = []
        for row, x, (_, _, cont) in zip(logp, inps, requests, strict=True):
            end = len(x) + row.shape[0] - p  # HFLM's offset for logits shorter than the input
            sel = row[end - len(cont) : end]  # (len(cont), V)
            out.append((float(sel.gather(1, torch.tensor(cont, device=DEVICE)[:, None]).sum()),
                        bool((sel.argmax(-1) == torch.tensor(cont, device=DEVICE)).all())))
        return out


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def model(request):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128_000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    with DEVICE:
        m = LlamaForCausalLM(cfg).to(request.param).eval()
    yield m
    del m
    torch.cuda.empty_cache()


def _schedule(lm, n_rows: int = 192):
    """Rows from 1500 down to 200 tokens, each a one-token continuation (as ' A' after a prompt)."""
    gen = torch.Generator().manual_seed(1)
    tokens = []
    for i in range(n_rows):
        n = 1500 - (1300 * i) // n_rows
        ids = torch.randint(5, 128_000, (n + 1,), generator=gen).tolist()
        tokens.append((("", ""), ids[:-1], ids[-1:]))
    return bench_lm.schedule(lm, tokens)


def _leave_free(gib: float) -> torch.Tensor:
    """Hold all but `gib` of the GPU's free memory."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(DEVICE)
    return torch.empty(max(0, free - int(gib * 2**30)), dtype=torch.uint8, device=DEVICE)


def test_estimate_bounds_the_real_peak(model):
    lm = FakeHFLM(model)
    sched = _schedule(lm)
    blocker = _leave_free(12)
    free = bench_lm._free_bytes(DEVICE)
    size = bench_lm.start_batch(model, sched, DEVICE)
    costs = bench_lm._costs(model, DEVICE)
    worst_ratio = 0.0
    for first in range(0, len(sched.rows), size):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        rows = sched.rows[first : first + size]
        lm._model_call = bench_lm.LastPositions(lm, sched)
        bench_lm._forward(lm, [sched.tokens[k] for r in rows for k in r])
        del lm._model_call
        peak = torch.cuda.max_memory_allocated(DEVICE) - base
        estimate = bench_lm._batch_bytes(costs, sched, first, size)
        worst_ratio = max(worst_ratio, peak / estimate)
    print(f"free {free / 2**30:.1f} GiB, start batch {size}, worst real peak / estimate {worst_ratio:.2f}")
    del blocker
    assert 1 < size <= bench_lm.MAX_BATCH
    assert worst_ratio <= 1.0  # the estimate never undershoots what a batch really takes


def test_real_out_of_memory_backs_off(model):
    lm = FakeHFLM(model)
    sched = _schedule(lm, 96)
    blocker = _leave_free(3)
    scored = bench_lm.loglikelihoods(lm, sched, 96, progress=False)  # far too large for 3 GiB
    del blocker
    torch.cuda.empty_cache()
    print(f"out of memory backed off from {scored.batch_size_start} to {scored.batch_size}")
    assert scored.batch_size_start == 96 and scored.batch_size < 96
    again = bench_lm.loglikelihoods(lm, sched, scored.batch_size, progress=False)  # the same batches, room to spare
    assert again.batch_size == scored.batch_size and again.results == scored.results
