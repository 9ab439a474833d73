"""--device-map auto: a model sharded over devices by accelerate gives the numbers of one device.

On the CPU, "auto" places the tiny model on the one device there is, so (a) checks the loading
path end to end, and the cross-device logic is checked with the meta device standing in for a
second device: what is moved where, and that nothing is copied when nothing needs to be. The
numbers of a really split model need a GPU: the `gpu` tests split the tiny model between the CPU
and a GPU (one GPU), and over two GPUs with accelerate's own placement (two GPUs).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run_config, run_pair

from evalsuite.config import RunConfig
from evalsuite.errors import ModelLoadError
from evalsuite.model.forward import Scorer
from evalsuite.model.loading import load_model, placement
from evalsuite.model.modules import find_modules
from evalsuite.model.precision import DTYPES
from evalsuite.numerics.hooks import Recorder
from evalsuite.numerics.layers import LayerSample
from evalsuite.numerics.observer import NumericsObserver
from evalsuite.numerics.weights import conversion_stats

FP16, BF16, FP32 = DTYPES["fp16"], DTYPES["bf16"], DTYPES["fp32"]
CPU, META = torch.device("cpu"), torch.device("meta")


def _cfg(tmp_path, **kw) -> RunConfig:
    return run_config(tmp_path, **{"max_tokens": 300, "batch_size": 2, **kw})


def _run(path, tmp_path, **kw):
    cfg = _cfg(tmp_path, **kw)
    results, per_token = run_pair(cfg, str(path), observers=(NumericsObserver(cfg, str(path)),))
    return results, per_token


TIMING = {"tokens_per_s"}  # how fast, not what: differs between any two runs


def _numbers(results) -> dict:
    """The run's deterministic findings: every dtype's metrics, the noise floor, the numerics section."""
    def drop(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in TIMING}

    return {"metrics": {k: drop(v.metrics) for k, v in results.dtypes.items()},
            "numerics": results.to_dict()["numerics"], "noise": drop(results.noise_floor)}


# -- (a) a whole run -------------------------------------------------------------------------

def test_auto_device_map_run_equals_plain_run(tiny_llama, tmp_path):
    plain, plain_tokens = _run(tiny_llama, tmp_path / "plain")
    auto, auto_tokens = _run(tiny_llama, tmp_path / "auto", device_map="auto")
    assert auto.to_dict()["config"]["device_map"] == "auto"
    assert _numbers(auto) == _numbers(plain)  # the same model on the same device: bit for bit
    for key, values in plain_tokens.items():
        assert (auto_tokens[key] == values)[~(values != values)].all(), key  # NaN-aware equality


def test_load_model_auto_places_on_the_cpu_and_records_it(tiny_llama):
    model = load_model(str(tiny_llama), FP32, CPU, device_map="auto")
    n = sum(p.numel() for p in model.parameters())
    assert placement(model) == {"cpu": n} and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_offload_is_refused_in_one_line(tiny_llama):
    # too little memory for the weights: accelerate would put them on disk (meta tensors, slow, and
    # invisible to the weight statistics), which load_model refuses
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tiny_llama), FP32, CPU, device_map="auto", max_memory={"cpu": 100_000})
    text = str(info.value)
    assert "\n" not in text and "offload" in text and "does not fit" in text


def test_unknown_device_map_is_an_error(tiny_llama):
    with pytest.raises(ModelLoadError, match="balanced"):
        load_model(str(tiny_llama), FP32, CPU, device_map="balanced")


def test_placement_counts_parameters_per_device_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False),
                                torch.nn.Linear(4, 3).to(META))
    model[1].weight = model[0].weight  # tied: counted once
    assert placement(model) == {"cpu": 40, "meta": 15}
    assert list(placement(model)) == ["cpu", "meta"]


# -- (b) the cross-device logic, with "meta" as the second device ---------------------------

def _ids(vocab: int, rows: int = 2, length: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("split", [True, False], ids=["chunked-head", "full-forward"])
def test_scorer_moves_logits_to_the_run_device(tiny_llama, split):
    model = load_model(str(tiny_llama), FP32, CPU)
    scorer = Scorer(model, META)  # the run's buffers on "another device" than the whole model
    assert scorer.split and scorer.sharded and scorer.devices == (META, CPU)
    assert scorer.input_device == CPU and scorer.head_device == CPU
    scorer.split = split
    scorer.chunk_tokens = 10
    ids = _ids(scorer.vocab_size)  # on the embedding's device: meta ids could not be computed with
    out = list(scorer.chunks(ids))
    assert [s for s, _, _ in out] == [0, 10, 20, 30]
    for _, logits, targets in out:
        assert logits.device == META and targets.device == META
        assert logits.shape[1] == scorer.vocab_size and logits.shape[0] == targets.shape[0]


@pytest.mark.parametrize("split", [True, False], ids=["chunked-head", "full-forward"])
def test_scorer_on_one_device_copies_nothing(tiny_llama, split):
    model = load_model(str(tiny_llama), FP32, CPU)
    scorer = Scorer(model, CPU)
    assert not scorer.sharded and scorer.devices == (CPU,)
    scorer.split = split
    scorer.chunk_tokens = 10
    produced = []
    hooked = model.lm_head if split else model
    handle = hooked.register_forward_hook(lambda m, a, out: produced.append(out if split else out.logits))
    ids = _ids(scorer.vocab_size)
    out = list(scorer.chunks(ids))
    handle.remove()
    for k, (start, logits, targets) in enumerate(out):
        source = produced[k] if split else produced[0].reshape(-1, scorer.vocab_size)[start:]
        assert logits.data_ptr() == source.data_ptr()  # the head's own output, not a copy
        assert targets.device == CPU


def test_recorder_keeps_statistics_on_the_module_device_until_a_batch_closes(tiny_llama):
    model = load_model(str(tiny_llama), FP32, CPU)
    watched = find_modules(model)
    ids = _ids(model.config.vocab_size)
    plain = Recorder(watched, CPU, histogram=True)
    other = Recorder(watched, META, histogram=True)  # the modules sit on the CPU, the recorder elsewhere
    for rec in (plain, other):
        rec.attach()
        rec.start_batch(0)
        with torch.inference_mode():
            model(input_ids=ids)
        rec.detach()
    assert all(v.device == CPU for v in other._vals)  # no copy per hook call
    other.start_batch(100)  # closes the batch: one stack and one copy per device
    offset, values, idx = other._batches[0]
    assert offset == 0 and values.device == META and sorted(idx) == sorted(plain._idx)
    # the CPU modules' histograms accumulate on the CPU, beside the recorder's own (on meta)
    assert set(other._hists) == {META, CPU} and other.hist.device == META
    assert torch.equal(other._hists[CPU], plain.hist)


def test_recorder_reorders_values_of_several_devices_with_their_modules():
    rec = Recorder([], META, histogram=False)
    rec.start_batch(0)
    devices = [CPU, META, CPU, META, CPU]
    rec._vals = [torch.tensor(float(k), device=d) for k, d in enumerate(devices)]
    rec._idx = [10, 11, 12, 13, 14]
    rec._close_batch()
    _, values, idx = rec._batches[0]
    assert values.device == META and values.shape == (5,)
    assert idx == [10, 12, 14, 11, 13]  # grouped by device, in the order the devices first appeared


def test_layer_sample_takes_rows_from_another_device():
    sample = LayerSample(n_tokens=40, n_slots=2, hidden=8, device=META)
    sample.set_batch(0, 40)
    x = torch.arange(40 * 8, dtype=torch.float16).reshape(2, 20, 8)  # (B, T, H) on the CPU
    sample.capture(1, x)
    assert sample.buf.device == META and sample.buf.dtype == torch.float32


def test_conversion_stats_one_host_copy_per_device_rows_in_place(tiny_llama, monkeypatch):
    model = load_model(str(tiny_llama), FP32, CPU)
    whole = conversion_stats(model, [FP16, BF16], None)
    model.model.layers[0].to(META)  # layer 0 "on another device": between the embedding and layer 1
    copies = []
    real_cpu = torch.Tensor.cpu

    def cpu(t, *a, **kw):  # meta values cannot be read: they come back as zeros
        copies.append((t.device, tuple(t.shape)))
        return torch.zeros(t.shape, dtype=t.dtype) if t.device == META else real_cpu(t, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    split = conversion_stats(model, [FP16, BF16], None)
    monkeypatch.undo()
    n_meta = sum(1 for n, _ in model.named_parameters() if n.startswith("model.layers.0."))
    n_all = len(whole["fp16"])
    # one stack and one host copy per device, never a weight across devices
    assert copies == [(CPU, (n_all - n_meta, 2, 10)), (META, (n_meta, 2, 10))]
    for name in ("fp16", "bf16"):  # every CPU tensor's row back in its place, by name
        for w, s_ in zip(whole[name], split[name], strict=True):
            assert s_.name == w.name
            if w.name.startswith("model.layers.0."):
                assert s_.n == 0 and w.n > 0
            else:
                assert s_ == w


# -- the numbers of a really split model (GPUs) ----------------------------------------------

def _split(model, first, second) -> None:
    """Embedding and layer 0 on `first`, layer 1, the final norm and the head on `second`, each run
    where it sits (accelerate's hooks move the activations): a model across two devices."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
                  "model.layers.1": second, "model.norm": second, "lm_head": second}
    dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)  # "cpu": no offloading


def _patch_auto_loading(monkeypatch, place) -> list:
    """from_pretrained with device_map "auto" loads on the CPU, then `place(model)` puts it across devices."""
    import transformers

    real = transformers.AutoModelForCausalLM
    placements = []

    class Auto:
        @staticmethod
        def from_pretrained(source, **kwargs):
            if kwargs.get("device_map") != "auto":
                return real.from_pretrained(source, **kwargs)
            kwargs.pop("device_map")
            kwargs.pop("max_memory", None)
            model = real.from_pretrained(source, **kwargs)
            place(model)
            placements.append(placement(model))
            return model

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Auto)
    return placements


def _close(a, b, rel: float, path: str = "") -> None:
    """Nested results equal, floats within `rel` (relative) or 1e-9 (absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, rel, f"{path}[{k}]")
    elif isinstance(a, float) and not (isinstance(a, bool)):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-9), path
    else:
        assert a == b, path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_on", ["cpu", "cuda"])
def test_model_split_between_cpu_and_gpu(tiny_llama, tmp_path, monkeypatch, head_on):
    """One GPU: the tiny model across the CPU and cuda:0, the run's buffers on cuda:0. The CPU and
    the GPU round float32 differently, so this compares the FP32 reference and the weights closely
    and checks that every statistic lands in its place; the 2-GPU test below compares bit for bit."""
    first, second = (0, "cpu") if head_on == "cpu" else ("cpu", 0)
    placements = _patch_auto_loading(monkeypatch, lambda m: _split(m, first, second))
    auto, _ = _run(tiny_llama, tmp_path / "split", device="cuda", dtypes=(FP16,), device_map="auto")
    monkeypatch.undo()
    plain, _ = _run(tiny_llama, tmp_path / "plain", device="cuda", dtypes=(FP16,))
    assert placements and all(set(p) == {"cpu", "cuda:0"} for p in placements)
    a, b = _numbers(auto), _numbers(plain)
    _close(a["metrics"]["fp32"], b["metrics"]["fp32"], rel=1e-5)
    _close(a["numerics"]["weights"], b["numerics"]["weights"], rel=1e-9)  # a cast is a cast on any device
    ref_a = {m["module"]: m for m in a["numerics"]["activations"]}
    ref_b = {m["module"]: m for m in b["numerics"]["activations"]}
    assert ref_a.keys() == ref_b.keys() and len(ref_a) > 10
    for name, m in ref_a.items():  # each module's absmax where it belongs (a mix-up is off by far more)
        assert m["absmax"] == pytest.approx(ref_b[name]["absmax"], rel=1e-4), name
        assert m["p9999"] == pytest.approx(ref_b[name]["p9999"], rel=0.13), name  # within one bin
    layers_a, layers_b = a["numerics"]["layer_error"]["fp16"], b["numerics"]["layer_error"]["fp16"]
    assert [e["n_tokens"] for e in layers_a] == [e["n_tokens"] for e in layers_b]
    for ea, eb in zip(layers_a, layers_b, strict=True):
        assert ea["cosine"] == pytest.approx(eb["cosine"], abs=1e-3)
        assert ea["rel_error"] == pytest.approx(eb["rel_error"], rel=0.5, abs=1e-3)
    m_a, m_b = a["metrics"]["fp16"], b["metrics"]["fp16"]
    assert m_a["n_tokens"] == m_b["n_tokens"] and m_a["nonfinite_logits"] == m_b["nonfinite_logits"] == 0
    assert m_a["kl_mean"] == pytest.approx(m_b["kl_mean"], rel=0.5)
    assert m_a["top1_agreement"] == pytest.approx(m_b["top1_agreement"], abs=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_sharded_over_two_gpus_equals_one_gpu(tiny_llama, tmp_path, monkeypatch):
    """accelerate's own placement (device_map "auto"), with GPU 0 capped to about half the model,
    so the embedding sits on cuda:0 and the LM head on cuda:1: every number equals a one-GPU run."""
    import transformers

    real = transformers.AutoModelForCausalLM
    placements = []

    class Auto:
        @staticmethod
        def from_pretrained(source, **kwargs):
            if kwargs.get("device_map") == "auto":
                cfg = transformers.AutoConfig.from_pretrained(source)
                n = sum(p.numel() for p in real.from_config(cfg).parameters())
                kwargs["max_memory"] = {0: int(0.6 * n * kwargs["dtype"].itemsize), 1: 2**30}
            model = real.from_pretrained(source, **kwargs)
            placements.append(placement(model))
            return model

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Auto)
    auto, auto_tokens = _run(tiny_llama, tmp_path / "auto", device="cuda:0", device_map="auto")
    monkeypatch.undo()
    plain, plain_tokens = _run(tiny_llama, tmp_path / "plain", device="cuda:0")
    assert placements and all(list(p) == ["cuda:0", "cuda:1"] for p in placements), placements
    _close(_numbers(auto), _numbers(plain), rel=1e-12)
    for key, values in plain_tokens.items():
        assert auto_tokens[key] == pytest.approx(values, rel=1e-12, abs=1e-15, nan_ok=True), key
