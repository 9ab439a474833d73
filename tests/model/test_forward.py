"""The Scorer's chunked head, and its padded head for vocabularies that are not a multiple of 8."""

from __future__ import annotations

import pytest
import torch
from helpers import run_pair
from tiny import build_model

from evalsuite.model.forward import Scorer
from evalsuite.model.head import VOCAB_PAD
from evalsuite.model.loading import load_model
from evalsuite.model.precision import DTYPES

ODD_VOCAB = 389  # as Chinese-LLaMA's 49,953: rows of bf16 logits start at odd element offsets
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def odd_vocab_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("odd") / "llama", "llama", seed=3, vocab_size=ODD_VOCAB)


def _ids(vocab: int, b: int = 2, t: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t + 1), generator=torch.Generator().manual_seed(seed))


def _all_chunks(scorer: Scorer, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    chunks = list(scorer.chunks(ids))
    return torch.cat([c[1].float() for c in chunks]), [c[1] for c in chunks]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_padded_head_gives_the_models_logits(odd_vocab_model, dtype):
    model = load_model(str(odd_vocab_model), DTYPES[dtype], CPU)
    plain, padded = Scorer(model, CPU, pad_head=False), Scorer(model, CPU, pad_head=True)
    assert plain.padded_head is None and padded.padded_head is not None
    weight, _ = padded.padded_head
    assert weight.shape[0] % VOCAB_PAD == 0 and weight.shape[0] > ODD_VOCAB
    assert torch.equal(weight[:ODD_VOCAB], model.get_output_embeddings().weight) and not weight[ODD_VOCAB:].any()
    ids = _ids(ODD_VOCAB)
    a, _ = _all_chunks(plain, ids)
    b, raw = _all_chunks(padded, ids)
    assert raw[0].shape[1] == ODD_VOCAB and raw[0].stride(0) == weight.shape[0]  # a view of padded rows
    with torch.inference_mode():
        full = model(input_ids=ids[:, :-1]).logits.reshape(-1, ODD_VOCAB).float()
    # A different GEMM may round a bf16 logit to the neighbouring value: one unit in the last place.
    ulp = 2.0 ** -7 if dtype == "bf16" else 2.0 ** -20
    for got in (a, b):
        assert torch.allclose(got, full, rtol=ulp, atol=1e-6)


def test_forward_hooks_on_the_head_see_each_padded_chunk(odd_vocab_model):
    model = load_model(str(odd_vocab_model), DTYPES["bf16"], CPU)
    scorer = Scorer(model, CPU, pad_head=True)
    seen: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(out.clone()))
    try:
        _, raw = _all_chunks(scorer, _ids(ODD_VOCAB, b=3))
    finally:
        handle.remove()
    assert len(seen) == len(raw) and all(torch.equal(s, r) for s, r in zip(seen, raw, strict=True))
    # a hook that returns a value replaces the output, as nn.Module.__call__ does
    handle = head.register_forward_hook(lambda mod, args, out: out * 0)
    try:
        _, raw = _all_chunks(scorer, _ids(ODD_VOCAB))
    finally:
        handle.remove()
    assert all(not r.any() for r in raw)


def test_a_pre_hook_on_the_head_falls_back_to_the_module(odd_vocab_model):
    model = load_model(str(odd_vocab_model), DTYPES["bf16"], CPU)
    scorer = Scorer(model, CPU, pad_head=True)
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda mod, args: None)
    try:
        _, raw = _all_chunks(scorer, _ids(ODD_VOCAB))
    finally:
        handle.remove()
    assert raw[0].is_contiguous()  # the module's own (C, V) output, not a padded view


def test_no_padding_by_default_on_cpu_or_for_aligned_vocabularies(odd_vocab_model, tiny_llama):
    for path in (odd_vocab_model, tiny_llama):
        model = load_model(str(path), DTYPES["bf16"], CPU)
        assert Scorer(model, CPU).padded_head is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_padding_rule_on_the_card(odd_vocab_model, tiny_llama):
    gpu = torch.device("cuda")
    auto = {(str(p), d): Scorer(load_model(str(p), DTYPES[d], gpu), gpu).padded_head is not None
            for p in (odd_vocab_model, tiny_llama) for d in ("bf16", "fp16", "fp32")}
    assert auto == {(str(odd_vocab_model), "bf16"): True, (str(odd_vocab_model), "fp16"): True,
                    (str(odd_vocab_model), "fp32"): False, (str(tiny_llama), "bf16"): False,
                    (str(tiny_llama), "fp16"): False, (str(tiny_llama), "fp32"): False}
    model = load_model(str(odd_vocab_model), DTYPES["bf16"], gpu)
    a, _ = _all_chunks(Scorer(model, gpu, pad_head=False), _ids(ODD_VOCAB).to(gpu))
    b, _ = _all_chunks(Scorer(model, gpu), _ids(ODD_VOCAB).to(gpu))
    assert torch.allclose(a, b, rtol=2.0 ** -7, atol=1e-6)


def test_a_run_through_the_padded_head_matches_float64(odd_vocab_model, tmp_path, monkeypatch):
    """The whole run, numerics hooks on the head included, with the padded head forced on the CPU."""
    from test_runner import _all_in_memory, _config

    from evalsuite.model import forward
    from evalsuite.numerics.observer import NumericsObserver

    def once(out, pad: bool):
        cfg = _config(out, dtypes=(DTYPES["bf16"],))
        real = forward.padded_head
        with monkeypatch.context() as m:
            m.setattr(forward, "padded_head", lambda head, vocab, _pad, sharded: real(head, vocab, pad, sharded))
            results, _ = run_pair(cfg, str(odd_vocab_model), observers=(NumericsObserver(cfg, str(odd_vocab_model)),))
        head = [a for a in results.to_dict()["numerics"]["activations"] if a["kind"] == "lm_head"]
        assert results.provenance["padded_head"] == {"fp32": pad, "bf16": pad}
        return cfg, results.dtypes["bf16"].metrics, head

    cfg, padded, head_padded = once(tmp_path / "padded", True)
    _, plain, head_plain = once(tmp_path / "plain", False)
    expect = _all_in_memory(odd_vocab_model, cfg, torch.bfloat16)
    assert padded["kl_mean"] == pytest.approx(expect["kl"].mean(), rel=1e-3)
    assert padded["top1_agreement"] == pytest.approx(expect["agree"].mean(), abs=2 / len(expect["agree"]))
    assert padded["kl_mean"] == pytest.approx(plain["kl_mean"], rel=1e-3)
    assert len(head_padded) == 1 and head_padded[0]["absmax"] == pytest.approx(head_plain[0]["absmax"], rel=1e-6)


def test_automatic_batch_size_holds_tokens_times_width(tiny_llama):
    from evalsuite.model.batching import auto_batch_size
    from evalsuite.model.loading import hidden_size

    gpu = torch.device("cuda")
    assert auto_batch_size(gpu, 2048, 4096) == 8  # the 7B shape: 16,384 tokens
    assert auto_batch_size(gpu, 2048, 5120) == 8  # wider: never under 16,384 tokens
    assert auto_batch_size(gpu, 2048, 896) == 32  # the 0.5B shape: capped at 65,536 tokens
    assert auto_batch_size(gpu, 2048, None) == 8 and auto_batch_size(gpu, 512, 896) == 128
    assert auto_batch_size(gpu, 100_000, 896) == 1
    assert auto_batch_size(CPU, 64, 4096) == 16  # the CPU keeps its small batches
    assert hidden_size(str(tiny_llama)) == 64
    assert hidden_size("/nonexistent/model") is None
    import json

    from evalsuite.model.loading import vocab_size

    assert vocab_size(str(tiny_llama)) == json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    assert vocab_size("/nonexistent/model") is None


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen_no_bos"])
def test_decoder_then_chunked_head_is_used(fixture, request):
    """The split (no full-vocabulary logits for a batch) must not fall back silently: a bug in the
    split's own code once made every run take the full forward, with the same numbers and 10 GiB
    more memory on an H200 (found by perf/perf_gpu.py)."""
    from evalsuite.model.loading import load_model
    from evalsuite.model.precision import DTYPES

    scorer = Scorer(load_model(str(request.getfixturevalue(fixture)), DTYPES["bf16"], CPU), CPU)
    assert scorer.split and scorer.logits_path == "decoder-then-chunked-head" and scorer.split_reason is None


def test_why_the_full_forward_is_used_is_recorded(tiny_llama, monkeypatch):
    model = load_model(str(tiny_llama), DTYPES["fp32"], CPU)
    monkeypatch.setattr(Scorer, "_body", lambda self, ids: (_ for _ in ()).throw(TypeError("no decoder call")))
    scorer = Scorer(model, CPU)
    assert not scorer.split and "TypeError: no decoder call" in scorer.split_reason
