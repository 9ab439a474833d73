"""Tokenizers without BOS, EOS or both score through lm-eval (the prefix token is chosen and recorded),
and a benchmark that fails anyway is recorded, reported in `failures` with its traceback, and
gives its dtype no numbers; `finish` returns benchmarks.jsonl instead of writing it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_bench_batching import _ctx, _model, _tokenizer
from test_benchmarks import _cfg, _records
from tiny import build_model

from evalsuite.bench import lm as bench_lm
from evalsuite.bench import results as bench_results
from evalsuite.bench.observer import BenchmarkObserver
from evalsuite.bench.prefix import prefix_token
from evalsuite.bench.tasks import BenchmarkError, prepare

pytest.importorskip("lm_eval")

KINDS = {"no_bos": {"with_bos": False}, "no_eos": {"with_eos": False},
         "neither": {"with_bos": False, "with_eos": False},
         "neither_no_pad": {"with_bos": False, "with_eos": False, "with_pad": False}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {k: build_model(root / k, "llama", seed=2, **kw) for k, kw in KINDS.items()}


def _logliks_by_hand(path: Path, plan) -> list[list[float]]:
    """Each choice's log-likelihood from the model's own float64 log-softmax, the pair tokenized as
    lm-eval documents it: whole = encode(context + continuation), context = encode(context)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    for q in plan.questions:
        row = []
        for inst in plan.instances[q.start : q.start + len(q.choices)]:
            context, continuation = inst.args
            strip = len(context) - len(context.rstrip())  # trailing spaces go with the continuation
            context, continuation = context[: len(context) - strip], context[len(context) - strip :] + continuation
            whole, ctx = tok.encode(context + continuation), tok.encode(context)
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
            row.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        out.append(row)
    return out


@pytest.mark.parametrize("kind,source", [("no_bos", "eos"), ("no_eos", "bos"), ("neither", "newline"),
                                         ("neither_no_pad", "newline")])
def test_tokenizers_without_bos_or_eos_are_scored(models, kind, source, tmp_path):
    tok = _tokenizer(models[kind])
    assert (tok.bos_token_id is None, tok.eos_token_id is None) == ("bos" in kind or "neither" in kind,
                                                                    "eos" in kind or "neither" in kind)
    cfg = _cfg(tmp_path, limit=2, num_fewshot=1)
    plan = prepare(cfg)
    obs = BenchmarkObserver(plan, cfg)
    obs.pass_finished(_ctx(cfg, "fp32", _model(models[kind], "fp32"), tok))
    metrics, sections = obs.finish({})
    assert obs.failures == [] and obs.failure_traceback is None and sections["benchmarks"]["status"] == "ok"
    assert "acc/zh_mc" in metrics["fp32"]
    prefix = sections["benchmarks"]["prefix_token"]
    assert prefix["source"] == source
    expect_id = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "newline": tok.encode("\n")[0]}[source]
    assert prefix["id"] == expect_id and (source != "newline" or prefix["text"] == "\n")
    recs = _records(obs.files)
    np.testing.assert_allclose([r["answers"]["fp32"]["loglik"] for r in recs], _logliks_by_hand(models[kind], plan),
                               rtol=1e-5, atol=1e-5)


def test_an_empty_context_gets_the_prefix_token(models):
    from lm_eval.api.instance import Instance

    path = models["neither"]
    tok = _tokenizer(path)
    model = _model(path, "fp32")
    prefix = prefix_token(tok, model.get_input_embeddings().weight.shape[0])
    lm = bench_lm.make_lm(model, tok, prefix=prefix.id)
    req = Instance(request_type="loglikelihood", doc={}, arguments=("", " 北京"), idx=0)
    ((_, ctx_ids, cont_ids),) = bench_lm.tokenize(lm, [req])
    assert ctx_ids == [prefix.id] and cont_ids == tok.encode(" 北京")


def _fake_tokenizer(**kw):
    ids = {"<pad>": 3, "Ċ": 9, "\n": 9}
    base = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "unk_token_id": None,
            "encode": lambda s, add_special_tokens=False: [9] if s == "\n" else [1, 2],
            "convert_ids_to_tokens": lambda i: next(k for k, v in ids.items() if v == i),
            "decode": lambda i: {3: "<pad>", 9: "\n"}[i[0]]}
    return SimpleNamespace(**{**base, **kw})


def test_prefix_rule_falls_back_to_pad_and_then_refuses():
    assert prefix_token(_fake_tokenizer(), 10).source == "newline"
    two_tokens = {"encode": lambda s, add_special_tokens=False: [1, 2]}
    assert prefix_token(_fake_tokenizer(pad_token_id=3, **two_tokens), 10).to_dict() == {
        "id": 3, "token": "<pad>", "text": "<pad>", "source": "pad"}
    assert prefix_token(_fake_tokenizer(pad_token_id=3), 5).source == "pad"  # newline id 9: beyond 5 rows
    unk = {"unk_token_id": 9}  # a newline the tokenizer cannot represent
    assert prefix_token(_fake_tokenizer(pad_token_id=3, **unk), 10).source == "pad"
    with pytest.raises(BenchmarkError, match="no BOS, EOS or pad token"):
        prefix_token(_fake_tokenizer(pad_token_id=12, **two_tokens), 10)  # a pad HFLM added: beyond the model


def test_a_failed_benchmark_is_recorded_and_reported(tiny_llama, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, limit=1)
    obs = BenchmarkObserver(prepare(cfg), cfg)
    tok = _tokenizer(tiny_llama)
    obs.pass_finished(_ctx(cfg, "fp32", _model(tiny_llama, "fp32"), tok))
    real = bench_lm.loglikelihoods

    def boom(*a, **kw):
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setattr(bench_lm, "loglikelihoods", boom)
    obs.pass_finished(_ctx(cfg, "fp16", _model(tiny_llama, "fp16"), tok, "test"))
    monkeypatch.setattr(bench_lm, "loglikelihoods", real)
    metrics, sections = obs.finish({})
    section = sections["benchmarks"]
    assert obs.failures == ["benchmarks fp16: RuntimeError: device lost"]
    assert section["status"] == "failed" and section["error"] == "fp16: RuntimeError: device lost"
    assert section["failed"] == {"fp16": "RuntimeError: device lost"}
    assert "fp16" not in metrics and "acc/zh_mc" in metrics["fp32"]  # no numbers for the failed dtype
    assert section["dtypes"] == ["fp32"] and section["flipped"] == {}
    tb = obs.failure_traceback
    assert "Traceback (most recent call last)" in tb and "in boom" in tb and "second line" in tb
    recs = _records(obs.files)
    assert len(recs) == len(obs.plan.questions) and all(list(r["answers"]) == ["fp32"] for r in recs)
    assert list(tmp_path.iterdir()) == []  # nothing written: the caller writes `files`


def test_every_dtype_failing_and_a_failing_finish(models, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, limit=1)
    obs = BenchmarkObserver(prepare(cfg), cfg)
    monkeypatch.setattr(bench_lm, "make_lm", lambda *a, **kw: (_ for _ in ()).throw(TypeError("bad")))
    path = models["neither"]
    for name, role in (("fp32", "reference"), ("bf16", "test")):
        obs.pass_finished(_ctx(cfg, name, _model(path, name), _tokenizer(path), role))
    metrics, sections = obs.finish({})
    assert metrics == {} and sections["benchmarks"]["error"] == "fp32, bf16: TypeError: bad"
    assert obs.failures == ["benchmarks fp32: TypeError: bad", "benchmarks bf16: TypeError: bad"]
    monkeypatch.setattr(bench_results, "build", lambda *a, **kw: 1 / 0)
    metrics, sections = obs.finish({})
    assert metrics == {} and obs.files == {} and sections["benchmarks"]["status"] == "failed"
    assert obs.failures[-1] == "benchmarks: scoring the answers failed: ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in obs.failure_traceback


def test_records_file_contract(tiny_llama, tmp_path):
    """`files` maps the name to write in --out to its UTF-8 text: one JSON object per question."""
    cfg = _cfg(tmp_path, limit=1)
    obs = BenchmarkObserver(prepare(cfg), cfg)
    obs.pass_finished(_ctx(cfg, "fp32", _model(tiny_llama, "fp32"), _tokenizer(tiny_llama)))
    _, sections = obs.finish({})
    assert list(obs.files) == [sections["benchmarks"]["records_file"]] == ["benchmarks.jsonl"]
    text = obs.files["benchmarks.jsonl"]
    assert isinstance(text, str) and text.endswith("\n") and len(text.splitlines()) == len(obs.plan.questions)
    recs = _records(obs.files)
    assert [(r["subject"], r["doc_id"], r["gold"]) for r in recs] == [
        (q.subject, q.doc_id, q.gold) for q in obs.plan.questions]
    assert all(r["answers"]["fp32"]["nonfinite"] is False for r in recs)
    assert "\\u" not in text and obs.plan.questions[0].question.splitlines()[0] in text  # Chinese as text
    resumed = BenchmarkObserver(obs.plan, cfg)  # a resumed run restores the prefix with the answers
    resumed.restore(_ctx(cfg, "fp32", None, None), obs.snapshot(_ctx(cfg, "fp32", None, None)))
    assert resumed.finish({})[1]["benchmarks"]["prefix_token"] == sections["benchmarks"]["prefix_token"]
    assert sections["benchmarks"]["prefix_token"]["source"] == "bos"
    assert resumed.files == obs.files


def test_a_whole_run_with_neither_bos_nor_eos(models, tmp_path):
    """The runner's perplexity pass and the benchmarks both, as the issue's user ran it (it failed at every dtype)."""
    from test_benchmarks import _run

    from evalsuite.model.precision import DTYPES

    results, obs = _run(models["neither_no_pad"], _cfg(tmp_path, dtypes=(DTYPES["bf16"],), limit=1))
    section = results.sections["benchmarks"]
    assert section["status"] == "ok" and section["failed"] == {} and obs.failures == []
    assert all("acc/zh_mc" in results.dtypes[n].metrics for n in ("fp32", "bf16"))
    assert "delta_acc/zh_mc" in results.dtypes["bf16"].metrics


@pytest.mark.parametrize("kind", ["no_bos", "neither_no_pad"])
def test_the_runs_tokenizer_is_left_as_it_was_and_copied_only_without_a_pad_token(models, kind, tmp_path):
    """HFLM sets a pad token where there is none: only then does the observer score with a copy."""
    tok = _tokenizer(models[kind])
    pad_before, side_before = tok.pad_token_id, tok.padding_side
    cfg = _cfg(tmp_path, limit=2)
    obs = BenchmarkObserver(prepare(cfg), cfg)
    obs.pass_finished(_ctx(cfg, "fp32", _model(models[kind], "fp32"), tok))
    assert obs.failures == []
    assert (tok.pad_token_id, tok.padding_side) == (pad_before, side_before)
    assert (obs._tokenizer is tok) == (pad_before is not None)
    if pad_before is None:
        assert obs._tokenizer.pad_token_id is not None  # HFLM's own choice, on the copy
