"""A hand-made results dict (schema of store/results.py) for report, gate and benchmark tests."""

from __future__ import annotations

import math

HOSTILE = "<script>alert(1)</script>"


def hist(lo: float, n: int = 20) -> dict:
    edges = [lo * 10 ** (i / 5) for i in range(n + 1)]
    counts = [int(100 * math.exp(-((i - n / 2) ** 2) / 20)) for i in range(n)]
    return {"edges": edges, "counts": counts, "n_zero": 3}


def _test_metrics(kl: float) -> dict:
    return {"ppl": 38.4, "ppl_se": 3.6, "mean_nll": 3.6, "bits_per_byte": 1.245, "n_tokens": 1024,
            "n_scored_tokens": 1024, "ppl_ratio": 1.0001, "ppl_ratio_se": 0.0015, "delta_ppl": 0.004,
            "delta_ppl_se": 0.05, "delta_nll": 1e-4, "delta_nll_se": 4e-5, "kl_mean": kl, "kl_mean_se": kl / 30,
            "kl_median": kl / 2, "kl_p90": kl * 2, "kl_p99": kl * 5, "kl_p999": kl * 9, "kl_max": kl * 20,
            "top1_agreement": 0.9658, "delta_p_mean": 1e-6, "delta_p_rms": 0.007, "max_abs_dlogit": 0.24,
            "nonfinite_logits": 0, "nonfinite_tokens": 0, "finite_only": False, "tokens_per_s": 247.0}


def make_results(hostile: str = "") -> dict:
    """A results dict as `evalsuite run` writes it: FP32 reference, FP16 broken, BF16 ok."""
    h = hostile
    noise = {"kl_mean": 1e-7, "kl_mean_se": 1e-9, "kl_median": 0.0, "kl_p90": 0.0, "kl_p99": 2e-7, "kl_p999": 1e-6,
             "kl_max": 3e-6, "top1_agreement": 0.9995, "delta_p_mean": 0.0, "delta_p_rms": 1e-6,
             "max_abs_dlogit": 1e-4, "n_tokens": 1024, "batch_size": 1, "reference_batch_size": 2,
             "tokens_per_s": 40.0}
    fp16 = dict.fromkeys(_test_metrics(0), None) | {"n_tokens": 1024, "nonfinite_logits": 268435456,
                                                   "nonfinite_tokens": 1024, "finite_only": True}
    return {
        "config": {"model": f"model{h}", "dtypes": ["fp16", "bf16"], "reference": "fp32", "device": "cpu",
                   "corpus": {"source": f"corpus{h}.txt"}, "seq_len": 512},
        "provenance": {"evalsuite": "0.1.0", "torch": "2.13.0+cpu", "device_name": f"cpu{h}", "torch_threads": 2,
                       "reference_flags": {"float32_matmul_precision": "highest"}},
        "model": {"source": f"org/model{h}", "stored_dtype": "float32", "is_demo": False, "vocab_size": 262144},
        "corpus": {"source": f"corpus{h}.txt", "sha256": "ab" * 32, "n_tokens": 1024, "n_windows": 2,
                   "seq_len": 512, "context": "bos"},
        "reference": "fp32",
        "dtypes": {
            "fp32": {"name": "fp32", "role": "reference", "status": "ok", "message": None,
                     "metrics": {"ppl": 38.35, "ppl_se": 3.6, "bits_per_byte": 1.245, "n_tokens": 1024},
                     "timing": {"load_s": 2.0, "pass_s": 25.2, "batch_size": 2}},
            "fp16": {"name": "fp16", "role": "test", "status": "broken",
                     "message": f"FP16 gives non-finite logits (inf/NaN) on 1024 of 1024 tokens {h}",
                     "metrics": fp16, "timing": {"load_s": 1.0, "pass_s": 41.0, "batch_size": 2}},
            "bf16": {"name": "bf16", "role": "test", "status": "ok", "message": None,
                     "metrics": _test_metrics(1.08e-3) | {"future_metric_xyz": 0.125},
                     "timing": {"load_s": 1.0, "pass_s": 4.1, "batch_size": 2}},
        },
        "noise_floor": noise,
        "noise_floor_detail": noise,
        "kl_histograms": {"bf16": hist(1e-6)},
        "worst_tokens": {"bf16": [
            {"position": 17, "kl": 0.21, "context": f"半精度浮点数{h}的动态范围", "target": "较", "reference_top": "较",
             "test_top": f"很{h}", "p_ref": 0.41, "p_test": 0.22},
            {"position": 99, "kl": 0.05, "context": "第二行\n", "target": " ", "reference_top": "\n",
             "test_top": "。", "p_ref": 0.1, "p_test": None},
        ]},
        "created_utc": "2026-11-28T07:03:17Z",
        "evalsuite_version": "0.1.0",
        "schema_version": 1,
    }
