"""The embedded Gemma 3 270M on CPU over real People's Daily text: FP16 breaks, BF16 does not.

Skips cleanly without the demo extra or without ../shared.
"""

from __future__ import annotations

import math

import pytest
from helpers import run_pair

from evalsuite.config import RunConfig
from evalsuite.model.precision import DTYPES
from evalsuite.store.corpus import CorpusSpec

pytestmark = pytest.mark.slow


def test_gemma_fp16_broken_bf16_fine(demo_model, shared_dir, tmp_path):
    text = shared_dir / "data/peoples-daily-1998/199801.txt"
    cfg = RunConfig(model=str(demo_model), dtypes=(DTYPES["fp16"], DTYPES["bf16"]), reference=DTYPES["fp32"],
                    device="cpu", corpus=CorpusSpec(str(text)), seq_len=256, max_tokens=256, out_dir=tmp_path,
                    progress=False)
    results, _ = run_pair(cfg, str(demo_model))
    ref, fp16, bf16 = (results.dtypes[k] for k in ("fp32", "fp16", "bf16"))
    assert ref.status == "ok" and 5 < ref.metrics["ppl"] < 500  # a real model on real Chinese text
    assert fp16.status == "broken" and fp16.metrics["nonfinite_logits"] > 0
    assert bf16.status == "ok" and bf16.metrics["nonfinite_logits"] == 0
    assert 0 < bf16.metrics["kl_mean"] < 0.05 and bf16.metrics["top1_agreement"] > 0.9
    assert math.isfinite(bf16.metrics["ppl_ratio"]) and abs(bf16.metrics["ppl_ratio"] - 1) < 0.05
    assert results.model["stored_dtype"] == "float32" and results.corpus["n_tokens"] == 256
