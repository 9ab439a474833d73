"""--compile: the 2-byte test models' attention/MLP/norm modules under torch.compile (compiled.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evalsuite.cli import main
from evalsuite.model.compiled import compile_modules
from evalsuite.model.loading import load_model
from evalsuite.model.modules import find_modules
from evalsuite.model.precision import DTYPES
from evalsuite.numerics.hooks import Recorder

pytestmark = pytest.mark.slow  # inductor builds C++ kernels on the CPU: tens of seconds when its cache is cold


def _hidden(model, ids):
    with torch.inference_mode():
        return model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state


def test_attention_and_mlp_compile_to_eager_bits(tiny_llama):
    """emulate_precision_casts: fused elementwise work rounds where eager rounds, so modules without
    a reduction of their own give eager's BF16 bits exactly (the norms' mean of squares is summed in
    another order and may not: the run-level test below bounds what that changes)."""
    model = load_model(str(tiny_llama), DTYPES["bf16"], torch.device("cpu"))
    ids = torch.randint(0, 380, (4, 96), generator=torch.Generator().manual_seed(3))
    eager = _hidden(model, ids)
    names = compile_modules(model, kinds=("attention", "mlp"))
    assert len(names) == 2 * model.config.num_hidden_layers
    assert all("forward" in vars(m) for n, m in model.named_modules() if n in names)
    assert torch.equal(_hidden(model, ids), eager)


def test_hooks_still_fire_around_compiled_modules(tiny_llama):
    """Compiling `forward`, not `__call__`, leaves every observer hook in eager Python."""
    model = load_model(str(tiny_llama), DTYPES["bf16"], torch.device("cpu"))
    ids = torch.randint(0, 380, (2, 40), generator=torch.Generator().manual_seed(4))
    values = []
    for step in ("eager", "compiled"):
        if step == "compiled":
            compile_modules(model)
        rec = Recorder(find_modules(model), torch.device("cpu"), histogram=False)
        rec.attach()
        rec.start_batch(0)
        _hidden(model, ids)
        rows, _ = rec.finish()
        rec.detach()
        values.append(rows[0][1])
    eager, compiled = values
    watched = find_modules(model)
    called = [w.kind for w, v in zip(watched, eager, strict=True) if v > 0]
    assert called == [w.kind for w, v in zip(watched, compiled, strict=True) if v > 0]
    assert {"attention", "mlp", "norm", "layer"} <= set(called)
    np.testing.assert_allclose(compiled, eager, rtol=1e-2)  # BF16 absmax: one ulp is 2^-8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_compiled_run_agrees_with_eager(tiny_llama, tmp_path, device):
    """A whole run with --compile against the same run eager: same tokens, numbers within a few percent
    of the dtype's own divergence, compile time recorded apart from the pass, the reference eager.
    --max-tokens leaves a last window of its own length, run as a batch of one (two copies)."""
    common = ["run", "--model", str(tiny_llama), "--device", device, "--dtypes", "bf16", "--seq-len", "96",
              "--max-tokens", "1000", "--batch-size", "4", "--tasks", "none", "--no-progress",
              "--no-reference-cache", "--no-resume"]
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    assert main([*common, "--out", str(tmp_path / "compiled"), "--compile"]) == 0
    res = {k: json.loads((tmp_path / k / "results.json").read_text()) for k in ("eager", "compiled")}
    tok = {k: np.load(tmp_path / k / "per_token.npz") for k in res}
    np.testing.assert_array_equal(tok["eager"]["targets"], tok["compiled"]["targets"])
    np.testing.assert_array_equal(tok["eager"]["fp32/nll"], tok["compiled"]["fp32/nll"])  # reference never compiled
    e, c = res["eager"]["dtypes"]["bf16"], res["compiled"]["dtypes"]["bf16"]
    assert abs(c["metrics"]["kl_mean"] - e["metrics"]["kl_mean"]) <= 0.05 * e["metrics"]["kl_mean"]
    assert np.mean(tok["eager"]["bf16/argmax"] == tok["compiled"]["bf16/argmax"]) >= 0.98
    prov = res["compiled"]["provenance"]["compiled"]
    assert prov["emulate_precision_casts"] is True and set(prov["dtypes"]) == {"bf16"}
    assert prov["dtypes"]["bf16"]["modules"] == 2 * 4 + 1  # 2 layers x (attention, MLP, 2 norms) + final norm
    assert c["timing"]["compile_s"] > 0 and "compile_s" not in e["timing"]
    assert "compiled" not in res["eager"]["provenance"]
    assert {r["provenance"]["logits_path"] for r in res.values()} == {"decoder-then-chunked-head"}
    assert res["compiled"]["config"]["compile"] is True
    # the test pass's observers (hooks around the compiled modules) sampled every layer, as eager
    layers = [r["numerics"]["layer_error"]["bf16"] for r in res.values()]
    assert [(x["layer"], x["n_tokens"]) for x in layers[0]] == [(x["layer"], x["n_tokens"]) for x in layers[1]]
    assert len(layers[0]) == 3 and all(x["n_tokens"] > 0 for x in layers[1])


def test_a_failed_compilation_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    """No C++ compiler (CPU) or no Triton (GPU): a one-line error that names the way out."""
    from helpers import one_line_error

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore lines")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    rc = main(["run", "--model", str(tiny_llama), "--device", "cpu", "--dtypes", "bf16", "--seq-len", "32",
               "--max-tokens", "64", "--tasks", "none", "--no-progress", "--no-reference-cache",
               "--out", str(tmp_path), "--compile"])
    line = one_line_error(capsys, rc, 3)
    assert "--compile failed" in line and "no working C++ compiler" in line and "run without --compile" in line
