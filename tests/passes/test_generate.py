"""--generate end to end: the command line on a tiny trained model, the records against the metrics,
the report's section with escaped text, benchmark prompts, a broken precision, bad options, Gemma 3 270M."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import one_line_error, run_config
from tiny import build_model

from evalsuite.cli import main
from evalsuite.model.decode import eos_ids, greedy, pad_id
from evalsuite.model.loading import load_model, load_tokenizer
from evalsuite.model.precision import DTYPES, exact_fp32
from evalsuite.passes.runner import run

HOSTILE = "<script>alert(1)</script>"
FAST = ["--device", "cpu", "--seq-len", "64", "--max-tokens", "128", "--no-progress", "--no-numerics",
        "--no-reference-cache", "--batch-size", "4"]
METRICS = ("gen_identical", "gen_first_div_median", "gen_first_div_p10", "gen_near_tie_share", "gen_in_ref_topk",
           "gen_ref_logprob_delta", "gen_tokens_per_s", "gen_within_noise")


def _prompt_file(tmp_path, lines):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_generate_end_to_end(tiny_trained, tmp_path, capsys):
    from tiny import corpus_text

    lines = [line[:n] for line, n in zip(corpus_text().splitlines()[:5], (3, 5, 4, 12, 8), strict=True)]
    prompts = _prompt_file(tmp_path, [*lines, f"{HOSTILE} 与 & 符号"])
    out = tmp_path / "out"
    rc = main(["run", "--model", str(tiny_trained), "--out", str(out), "--tasks", "none", *FAST, "--generate",
               "--gen-prompts", str(prompts), "--gen-tokens", "12"])
    err = capsys.readouterr().err
    assert rc == 0, err
    data = json.loads((out / "results.json").read_text())
    for name in ("fp16", "bf16"):
        m = data["dtypes"][name]["metrics"]
        assert all(k in m for k in METRICS) and all(f"noise_{k}" in m for k in METRICS[:6]), sorted(m)
        assert m["gen_prompts"] == 6 and 0 <= m["gen_identical"] <= 1
    ref_m = data["dtypes"]["fp32"]["metrics"]
    assert ref_m["noise_gen_identical"] == 1.0  # CPU: both compositions give the same tokens on this model
    records = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [*lines, f"{HOSTILE} 与 & 符号"]
    for name in ("fp16", "bf16", "noise"):  # the metrics against the records, recomputed by hand
        same = [r["continuations"][name]["tokens"] == r["reference"]["tokens"] for r in records]
        assert all(r["continuations"][name]["identical"] == s for r, s in zip(records, same, strict=True))
        key = "noise_gen_identical" if name == "noise" else "gen_identical"
        assert data["dtypes"]["fp32" if name == "noise" else name]["metrics"][key] == pytest.approx(sum(same) / 6)
        firsts = sorted(r["continuations"][name]["first_divergence"] if r["continuations"][name]["first_divergence"]
                        is not None else 12 for r in records)
        if name != "noise":
            assert data["dtypes"][name]["metrics"]["gen_first_div_median"] == pytest.approx((firsts[2] + firsts[3]) / 2)
    section = data["generation"]
    assert section["settings"]["tokens"] == 12 and section["settings"]["noise_batch_size"] == 2
    assert all(s[0] == 1.0 and len(s) == 13 for s in section["survival"].values())
    html = (out / "report.html").read_text()
    gen = html[html.index('<section id="generation">'):]
    gen = gen[: gen.index("</section>")]
    assert "<script>alert" not in html and "<svg" in gen and "Generation divergence" in gen
    assert "noise floor (reference vs itself)" in gen  # the floor's survival curve beside the dtypes'
    assert re.search(r"generated \d+ tokens", err) and "continuations identical" in err


def test_default_prompts_with_benchmarks(tiny_trained, tmp_path):
    cfg = run_config(tmp_path, model=str(tiny_trained), max_tokens=128, numerics=False, tasks=("zh_mc",), limit=1,
                     generate=True, gen_count=6, gen_tokens=4, reference_cache=None)
    from evalsuite.bench.observer import BenchmarkObserver
    from evalsuite.bench.tasks import prepare

    output = run(cfg, str(tiny_trained), observers=(BenchmarkObserver(prepare(cfg), cfg),))
    results = output.results
    settings = results.sections["generation"]["settings"]
    assert settings["sources"] == {"benchmark": 3, "corpus": 3}
    records = [json.loads(x) for x in output.files["generations.jsonl"].splitlines()]
    bench = [r for r in records if r["source"] == "benchmark"]
    assert len(bench) == 3 and all(r["prompt"].endswith("答案：") and r["choices"] == ["A", "B", "C", "D"] for r in bench)
    for name in ("fp16", "bf16"):
        m = results.dtypes[name].metrics
        assert 0 <= m["gen_answer_changed"] <= 1 and "noise_gen_answer_changed" in m


def test_broken_precision_diverges_at_its_first_nonfinite_step(tmp_path):
    """FP16 logits overflow on this model: every prompt parts from the reference, so the report shows
    examples, the hostile prompt among them, escaped."""
    from evalsuite.report.render import render_report

    path = build_model(tmp_path / "hot", scale_lm_head=3e4)
    prompts = _prompt_file(tmp_path, ["今天", f"{HOSTILE} 与 & 符号", "天气很好"])
    cfg = run_config(tmp_path / "out", model=str(path), dtypes=(DTYPES["fp16"],), max_tokens=128, numerics=False,
                     generate=True, gen_prompts=prompts, gen_tokens=6)
    output = run(cfg, str(path))
    results = output.results
    html = render_report(results.to_dict())
    gen = html[html.index('<section id="generation">'):]
    gen = gen[: gen.index("</section>")]
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; 与 &amp; 符号" in gen
    assert "<mark>" in gen and "non-finite logits" in gen
    m = results.dtypes["fp16"].metrics
    assert results.dtypes["fp16"].status == "broken"
    records = [json.loads(x) for x in output.files["generations.jsonl"].splitlines()]
    steps = [r["continuations"]["fp16"]["nonfinite_step"] for r in records]
    assert m["gen_nonfinite_prompts"] == sum(s is not None for s in steps) > 0
    for r, s in zip(records, steps, strict=True):
        c = r["continuations"]["fp16"]
        if s is not None:  # counted as parting there, and scored only up to there
            assert c["first_divergence"] is not None and c["first_divergence"] <= s and c["scored_tokens"] == s


@pytest.mark.parametrize(("args", "words"), [
    (["--gen-tokens", "4"], "need --generate"),
    (["--generate", "--gen-count", "0"], "--gen-count must be at least 1"),
    (["--generate", "--gen-prompts", "/nonexistent/p.txt"], "does not exist"),
])
def test_bad_options_fail_before_any_model_loads(tiny_llama, tmp_path, capsys, args, words):
    rc = main(["run", "--model", str(tiny_llama), "--out", str(tmp_path), "--tasks", "none", *FAST, *args])
    line = one_line_error(capsys, rc, 2)
    assert words in line


@pytest.mark.slow
def test_gemma_bf16_and_fp16_on_chinese_prompts(demo_model, tmp_path):
    """The real model: BF16 decodes finite text (here the same as FP32's on these prompts, measured on
    this CPU); FP16 overflows, so every prompt parts at its first step and no FP16 text is scored."""
    prompts = _prompt_file(tmp_path, ["中国的首都是", "今天天气很好，我们一起去", "人工智能的发展对社会的影响",
                                      "春节是中国最重要的传统节日之一，"])
    cfg = run_config(tmp_path, model=str(demo_model), max_tokens=64, numerics=False, generate=True,
                     gen_prompts=prompts, gen_tokens=16)
    output = run(cfg, str(demo_model))
    results = output.results
    bf16, fp16 = results.dtypes["bf16"].metrics, results.dtypes["fp16"].metrics
    assert bf16["gen_nonfinite_prompts"] == 0 and bf16["gen_identical"] >= 0.5 and bf16["noise_gen_identical"] == 1.0
    assert bf16["gen_ref_logprob"] > -5
    assert fp16["gen_nonfinite_prompts"] == 4 and fp16["gen_identical"] == 0 and fp16["gen_first_div_median"] == 0
    texts = [json.loads(x)["reference"]["text"] for x in output.files["generations.jsonl"].splitlines()]
    assert all(re.search(r"[\u4e00-\u9fff]", t) for t in texts)  # Chinese continuations
    # the step's decoding is transformers' own greedy decoding, on the real model too
    tok = load_tokenizer(str(demo_model))
    model = load_model(str(demo_model), DTYPES["bf16"], torch.device("cpu"))
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids for t in ("中国的首都是", "春节是")]
    eos = eos_ids(model, tok)
    with exact_fp32():
        d = greedy(model, ids, [0, 1], 2, 8, eos, pad_id(tok, eos), torch.device("cpu"))
    width = max(map(len, ids))
    inp = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    g = model.generate(input_ids=inp, attention_mask=mask, do_sample=False, max_new_tokens=8,
                       pad_token_id=pad_id(tok, eos), eos_token_id=list(eos))
    assert all(g[i, width: width + len(t)].tolist() == t.tolist() for i, t in enumerate(d.tokens))
    assert np.isfinite(d.margins[0, : len(d.tokens[0])]).all()
