"""Fault injection on CPU: out-of-memory, unsupported dtypes, untrusted checkpoints, secrets."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from helpers import run_config, run_pair

from evalsuite.cli import main
from evalsuite.model import forward

FAST = ["--device", "cpu", "--seq-len", "64", "--max-tokens", "400", "--no-progress", "--no-numerics",
        "--tasks", "none"]


def _cfg(tmp_path, **kw):
    return run_config(tmp_path, **{"max_tokens": 400, **kw})


def _oom_above(monkeypatch, limit: int, only_dtype: torch.dtype | None = None):
    """Make any batch larger than `limit` windows (of `only_dtype` models, if given) run out of memory."""
    real = forward.Scorer.chunks

    def chunks(self, ids, skip=None):
        dtype = next(self.model.parameters()).dtype
        if ids.shape[0] > limit and (only_dtype is None or dtype == only_dtype):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        yield from real(self, ids, skip)

    monkeypatch.setattr(forward.Scorer, "chunks", chunks)


def test_out_of_memory_backs_off_and_gives_the_same_numbers(tiny_llama, tmp_path, monkeypatch):
    plain, _ = run_pair(_cfg(tmp_path / "a", batch_size=1), str(tiny_llama))
    _oom_above(monkeypatch, 1)
    backed, _ = run_pair(_cfg(tmp_path / "b", batch_size=8), str(tiny_llama))
    assert backed.provenance["batch_size"] == 1
    for name in ("fp16", "bf16"):
        assert backed.dtypes[name].metrics["kl_mean"] == plain.dtypes[name].metrics["kl_mean"]


def test_out_of_memory_at_batch_one_in_a_test_dtype_spares_the_others(tiny_llama, tmp_path, monkeypatch):
    _oom_above(monkeypatch, 0, only_dtype=torch.float16)
    results, _ = run_pair(_cfg(tmp_path), str(tiny_llama))
    assert results.dtypes["fp16"].status == "failed" and "--seq-len" in results.dtypes["fp16"].message
    assert results.dtypes["bf16"].status == "ok" and results.dtypes["fp32"].status == "ok"


def test_out_of_memory_at_batch_one_in_the_reference_is_a_clear_error(tiny_llama, tmp_path, monkeypatch, capsys):
    _oom_above(monkeypatch, 0)
    rc = main(["run", "--model", str(tiny_llama), "--out", str(tmp_path), *FAST])
    err = capsys.readouterr().err
    assert rc == 3 and "out of GPU memory at batch size 1" in err and "--seq-len" in err and "Traceback" not in err


def test_dtype_the_device_cannot_run_is_skipped(tiny_llama, tmp_path, monkeypatch):
    import evalsuite.passes.runner as runner

    monkeypatch.setattr(runner, "unsupported_reason",
                        lambda p, d: "this GPU has no native BF16 (injected)" if p.name == "bf16" else None)
    results, _ = run_pair(_cfg(tmp_path), str(tiny_llama))
    assert results.dtypes["bf16"].status == "skipped" and "no native BF16" in results.dtypes["bf16"].message
    assert results.dtypes["fp16"].status == "ok"


def test_remote_code_does_not_run_unless_asked(tiny_llama, tmp_path, capsys):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_llama, evil)
    sentinel = tmp_path / "code-ran"
    (evil / "modeling_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('pwned')\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    config["model_type"] = "evil-unknown"
    (evil / "config.json").write_text(json.dumps(config))
    rc = main(["run", "--model", str(evil), "--out", str(tmp_path / "o"), *FAST])
    assert rc == 3 and not sentinel.exists()
    assert "pass --trust-remote-code" in capsys.readouterr().err


class _Exploit:
    """A pickle that runs code when unpickled without weights_only."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_weights_load_only_with_weights_only(tiny_llama, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bad / f.name)
    sentinel = tmp_path / "unpickled"
    with open(bad / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Exploit(sentinel)}, fh)
    assert main(["run", "--model", str(bad), "--out", str(tmp_path / "o"), *FAST]) == 3
    assert not sentinel.exists()


def test_no_secrets_in_results_or_report(tiny_llama, tmp_path, monkeypatch):
    secrets = {"HF_TOKEN": "hf_SECRETvalue123", "OPENAI_API_KEY": "sk-SECRET456", "AWS_SECRET_ACCESS_KEY": "SECRET789"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    assert main(["run", "--model", str(tiny_llama), "--out", str(tmp_path), *FAST]) == 0
    for name in ("results.json", "report.html"):
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert not any(v in text for v in secrets.values()), name


def test_corpus_errors_at_the_command_line(tiny_llama, tmp_path, capsys):
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("中文语料".encode("gb18030"))
    assert main(["run", "--model", str(tiny_llama), "--corpus", str(gbk), "--out", str(tmp_path / "o"), *FAST]) == 3
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["run", "--model", str(tiny_llama), "--corpus", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "o"), *FAST]) == 3
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("content", ['{"schema_version": 99, "dtypes": {}}', '{"schema_version": 1, "dtyp', "[]"])
def test_results_from_another_schema_or_corrupt(tmp_path, capsys, content):
    path = tmp_path / "results.json"
    path.write_text(content)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
