"""Benchmarks through lm-eval: the project's task data, lm-eval's real machinery on tiny models,
the offline CMMLU/C-Eval variants, records against metrics, and bad input as one-line errors."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import one_line_error, run_config, run_pair
from tiny import build_model

from evalsuite.bench import stats as bench_stats
from evalsuite.bench.observer import BenchmarkObserver
from evalsuite.bench.tasks import DEFAULT_TASKS, prepare, tasks_dir
from evalsuite.cli import build_parser, main
from evalsuite.config import RunConfig
from evalsuite.errors import UsageError
from evalsuite.model.precision import DTYPES
from evalsuite.passes.runner import run
from evalsuite.report.render import render_report

TASKS = Path(__file__).resolve().parents[2] / "tasks"
ZH_MC = TASKS / "zh_mc" / "zh_mc.csv"
lm_eval = pytest.importorskip("lm_eval")

# The correct answers as text, written separately from the CSV's letters: a wrong letter fails here.
ANSWER_KEY = {
    "common_sense": "12|北京|7|红色|119|120|正月初一|粽子|月饼|24|元|60|竹子|29|五星红旗|鲸|12|9月10日|10月1日|正月十五",
    "common_sense-dev": "4|《义勇军进行曲》|60|四月|七种",
    "geography": "新疆|珠穆朗玛峰|长江|太平洋|俄罗斯|撒哈拉沙漠|安徽|鄱阳湖|非洲|一天|台湾海峡|尼罗河|帕米尔高原|南宁|东京|四川|"
                 "曾母暗沙|东海|青藏高原|堪培拉",
    "geography-dev": "亚洲|渤海|亚洲|海口|东方",
    "math": "56|63|180|1024|25|29|1/2|2πr|12|x = 4|22|0.15|234|5|12|1000|55|9|1/2|6",
    "math-dev": "8|3|30|12|81",
    "chinese": "疑是地上霜|李白|曹雪芹|吴承恩|罗贯中|快乐|小|多此一举，弄巧成拙|《春晓》|粒粒皆辛苦|河|孔子|"
               "死守经验，不知变通，妄想不劳而获|更上一层楼|周树人|一举两得|月亮像一个银盘|施耐庵|天涯若比邻|游子身上衣",
    "chinese-dev": "黄河入海流|大|低头思故乡|出了问题后及时补救|白",
    "science": "100|二氧化碳|H2O|一年|皮肤|真空|水星|红细胞|太阳能|氯化钠|30万|南极和北极|物理变化|氧气|木星|细胞核|惯性定律|"
               "约一个月|安培|蚂蚁",
    "science-dev": "0|太阳|206|根|月球",
    "history": "秦朝|公元前221年|李渊|1949年|1911年|地动仪|1919年|赵匡胤|朱元璋|刘邦|明朝|秦国|汉朝|1945年|溥仪|唐太宗|孙中山|"
               "武则天|1840年|春秋战国时期",
    "history-dev": "清朝|司马迁|蔡伦|毕昇|秦始皇嬴政",
}


def _rows() -> list[dict[str, str]]:
    with ZH_MC.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_zh_mc_structure():
    rows = _rows()
    assert list(rows[0]) == ["id", "subject", "split", "question", "A", "B", "C", "D", "answer"]
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["question"].strip() for r in rows}) == len(rows)  # no duplicate question
    for r in rows:
        choices = [r[k].strip() for k in "ABCD"]
        assert all(choices) and len(set(choices)) == 4, r["id"]
        assert r["answer"] in ("A", "B", "C", "D") and r["split"] in ("test", "dev") and r["question"].strip()
    test = [r for r in rows if r["split"] == "test"]
    subjects = Counter(r["subject"] for r in test)
    assert len(test) >= 100 and len(subjects) >= 4 and min(subjects.values()) >= 15
    assert all(n >= 5 for n in Counter(r["subject"] for r in rows if r["split"] == "dev").values())
    letters = Counter(r["answer"] for r in test)
    assert max(letters.values()) - min(letters.values()) <= 0.05 * len(test)  # no letter favoured


def test_zh_mc_answers_match_the_key():
    by_group: dict[str, list[str]] = {}
    for r in _rows():
        by_group.setdefault(r["subject"] + ("-dev" if r["split"] == "dev" else ""), []).append(r[r["answer"]])
    assert by_group == {k: v.split("|") for k, v in ANSWER_KEY.items()}


def test_task_yamls_cover_every_subject_and_copy_lm_evals_prompts():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    subjects = sorted({r["subject"] for r in _rows()})
    assert {"zh_mc", "cmmlu_local", "ceval-valid_local"} <= set(tm.all_groups)
    assert sorted(t for t in tm.all_subtasks if t.startswith("zh_mc_")) == [f"zh_mc_{s}" for s in subjects]
    upstream = Path(lm_eval.__file__).parent / "tasks"
    for mine, theirs, prefix, local in (("_cmmlu_local_yaml", "cmmlu/_default_template_yaml", "cmmlu", "cmmlu_local"),
                                        ("_ceval_local_yaml", "ceval/_default_ceval_yaml", "ceval-valid",
                                         "ceval_local")):
        ours = yaml.load((TASKS / mine).read_text(encoding="utf-8"), Loader=_Loader)
        ref = yaml.safe_load((upstream / theirs).read_text(encoding="utf-8"))
        for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "output_type", "fewshot_split", "fewshot_config",
                    "test_split", "validation_split"):
            assert ours.get(key) == ref.get(key), (mine, key)
        folder = theirs.split("/")[0]
        for path in sorted((upstream / folder).glob(f"{prefix}_*.yaml")):
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
            local_cfg = yaml.safe_load((TASKS / local / path.name.replace(prefix, prefix + "_local", 1))
                                       .read_text(encoding="utf-8"))
            assert local_cfg["description"] == cfg["description"]
            assert local_cfg["dataset_kwargs"]["subject"] == cfg["dataset_name"]


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _cfg(tmp_path, **kw) -> RunConfig:
    return run_config(tmp_path, **{"max_tokens": 128, "noise_tokens": 64, "tasks": DEFAULT_TASKS, **kw})


def _run(path, cfg):
    obs = BenchmarkObserver(prepare(cfg), cfg)
    results, _ = run_pair(cfg, str(path), observers=(obs,))
    return results, obs


def _records(files: dict) -> list[dict]:
    """The per-question records an observer's `finish` (or results.build) returns for benchmarks.jsonl."""
    return [json.loads(line) for line in files["benchmarks.jsonl"].splitlines()]


@pytest.mark.slow
def test_acc_and_logliks_equal_lm_evals_own_evaluation(tiny_llama, tmp_path):
    """The same model through lm_eval.simple_evaluate (its own load, its own loop) gives the same
    accuracy per subject and group, and the same per-question log-likelihoods. lm-eval runs
    PyTorch's own FP16 kernels, so the run does too (--cpu-half-gemm native; tests/model/test_cpu.py
    checks the FP32-GEMM path)."""
    cfg = _cfg(tmp_path, dtypes=(DTYPES["fp16"],), limit=4, num_fewshot=2, cpu_half_gemm="native")
    results, obs = _run(tiny_llama, cfg)
    section = results.sections["benchmarks"]
    assert section["failed"] == {} and section["n_questions"] == 24
    ours = {(r["subject"] or r["task"], n): a["acc"] for r in section["rows"] for n, a in r["acc"].items()}
    recs = {(r["subject"], r["doc_id"]): r for r in _records(obs.files)}
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for name, dtype in (("fp32", "float32"), ("fp16", "float16")):
        out = simple_evaluate(model="hf", model_args=f"pretrained={tiny_llama},dtype={dtype}", tasks=["zh_mc"],
                              num_fewshot=2, limit=4, batch_size=4, device="cpu", log_samples=True,
                              task_manager=TaskManager(include_path=str(tasks_dir()), include_defaults=False))
        for task, res in out["results"].items():
            assert ours[(task, name)] == res["acc,none"], (task, name)
        for subject, samples in out["samples"].items():
            for s in samples:
                theirs = [r[0] for r in s["filtered_resps"]]
                np.testing.assert_allclose(recs[(subject, s["doc_id"])]["answers"][name]["loglik"], theirs,
                                           rtol=1e-6 if name == "fp32" else 0, atol=1e-5 if name == "fp32" else 0)
    assert results.dtypes["fp16"].metrics["acc/zh_mc"] == ours[("zh_mc", "fp16")]


def test_hflm_uses_the_loaded_model_as_is(tiny_llama):
    """HFLM gets the resident model: no copy, no cast, no move."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16)
    before = [(p.data_ptr(), p.dtype, p.device) for p in model.parameters()]
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_llama), batch_size=2)
    assert lm.model is model
    assert [(p.data_ptr(), p.dtype, p.device) for p in model.parameters()] == before


def test_requests_are_built_and_tokenized_once(tiny_llama, tmp_path, monkeypatch):
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM

    built, encoded = [], []
    real_build, real_encode = Task.build_all_requests, HFLM._encode_pair
    monkeypatch.setattr(Task, "build_all_requests", lambda self, **kw: built.append(1) or real_build(self, **kw))
    monkeypatch.setattr(HFLM, "_encode_pair", lambda self, *a: encoded.append(1) or real_encode(self, *a))
    results, obs = _run(tiny_llama, _cfg(tmp_path, limit=2))  # fp32, fp16, bf16
    assert len(built) == 6  # once per subject, not per dtype
    assert len(encoded) == len(obs.plan.instances) == 6 * 2 * 4  # once per request, not per dtype
    assert set(obs.answers) == {"fp32", "fp16", "bf16"}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_last_positions_only_give_the_same_logliks(tiny_llama, tmp_path, dtype):
    """Logits for the last positions only (bench_lm.LastPositions) change nothing HFLM returns."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evalsuite.bench import lm as bench_lm

    plan = prepare(_cfg(tmp_path, limit=3, num_fewshot=1))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=getattr(torch, dtype))
    lm = bench_lm.make_lm(model, AutoTokenizer.from_pretrained(tiny_llama), 5)
    tokens = bench_lm.tokenize(lm, plan.instances)
    full = lm._loglikelihood_tokens(tokens, disable_tqdm=True)
    calls = []
    real = bench_lm.LastPositions.__call__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_lm.LastPositions, "__call__", lambda self, *a: calls.append(self) or real(self, *a))
        scored = bench_lm.loglikelihoods(lm, bench_lm.schedule(lm, tokens), 5, progress=False)
    trimmed = scored.results
    assert calls and calls[0].trimmed > 0  # the short path was taken
    assert calls[0].split is not None  # with the head at each row's own positions only
    assert scored.batch_size == scored.batch_size_start == 5
    np.testing.assert_allclose([x[0] for x in trimmed], [x[0] for x in full], rtol=1e-6 if dtype == "float32" else 0)
    assert [x[1] for x in trimmed] == [x[1] for x in full]


def test_resume_reuses_the_saved_answers(tiny_llama, tmp_path):
    """A resumed run restores each pass's answers from its snapshot instead of scoring again."""
    cfg = _cfg(tmp_path, limit=2)
    sections = []

    def stop(output):  # as if killed after the passes: the resume state stays
        sections.append(output.results.sections["benchmarks"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, str(tiny_llama), observers=(BenchmarkObserver(prepare(cfg), cfg),), resume=True, write_outputs=stop)
    assert sections[0]["failed"] == {}
    other = replace(cfg, limit=3)  # other benchmark settings: the saved state is refused as a whole
    with pytest.raises(UsageError, match="--fresh"):
        run(other, str(tiny_llama), observers=(BenchmarkObserver(prepare(other), other),), resume=True)
    obs = BenchmarkObserver(prepare(cfg), cfg)
    results, _ = run_pair(cfg, str(tiny_llama), observers=(obs,), resume=True)
    assert results.provenance["resumed_passes"] == ["bf16", "fp16", "fp32"]  # no model scored anything
    restored = results.sections["benchmarks"]
    assert restored["failed"] == {} and restored["rows"] == sections[0]["rows"]


@pytest.fixture(scope="module")
def tiny_flat(tmp_path_factory) -> Path:
    """A tiny model whose choices are nearly tied, so lower precisions flip answers."""
    return build_model(tmp_path_factory.mktemp("flat") / "llama", "llama", seed=0, scale_lm_head=0.05)


@pytest.mark.slow
def test_flips_from_records_match_metrics(tiny_flat, tmp_path):
    results, obs = _run(tiny_flat, _cfg(tmp_path, seed=5))
    section = results.sections["benchmarks"]
    recs = _records(obs.files)
    assert len(recs) == section["n_questions"] == 120
    for name in ("fp16", "bf16"):
        ref = np.array([r["answers"]["fp32"]["correct"] for r in recs])
        test = np.array([r["answers"][name]["correct"] for r in recs])
        b, c = int((ref & ~test).sum()), int((~ref & test).sum())
        m = results.dtypes[name].metrics
        total = section["rows"][0]["vs_reference"][name]
        assert (total["correct_to_wrong"], total["wrong_to_correct"]) == (b, c)
        assert m["flips/zh_mc"] == (b + c) / len(recs) and m["mcnemar_p/zh_mc"] == bench_stats.mcnemar_exact_p(b, c)
        assert m["delta_acc/zh_mc"] == pytest.approx(test.mean() - ref.mean())
        assert m["acc/zh_mc"] == pytest.approx(test.mean())
        assert m["delta_acc_ci_low/zh_mc"] <= m["delta_acc/zh_mc"] <= m["delta_acc_ci_high/zh_mc"]
        ll_ref = np.array([r["answers"]["fp32"]["loglik"] for r in recs])
        ll_test = np.array([r["answers"][name]["loglik"] for r in recs])
        kl, agree = bench_stats.choice_divergence(ll_ref, ll_test)
        assert m["choice_kl/zh_mc"] == pytest.approx(kl.mean()) and m["choice_agreement/zh_mc"] == agree.mean()
        flipped = section["flipped"][name]
        assert len(flipped) == section["n_flipped"][name] == b + c
        assert {(f["subject"], f["doc_id"]) for f in flipped} == {
            (r["subject"], r["doc_id"]) for r, x, y in zip(recs, ref, test, strict=True) if x != y}
        subjects = [row for row in section["rows"] if row["subject"]]
        assert sum(row["vs_reference"][name]["flips"] for row in subjects) == b + c
    assert sum(section["n_flipped"].values()) > 0  # the model is built to flip: the check above is not vacuous
    from evalsuite.bench.results import build

    _, again, files = build(obs.plan, obs.answers, obs.roles, obs.failed)
    assert again["benchmarks"]["rows"] == section["rows"]  # exact bootstrap: the same intervals again
    assert files == obs.files and not (tmp_path / "benchmarks.jsonl").exists()  # returned, not written
    html = render_report(results.to_dict())
    assert 'id="benchmarks"' in html and "Flipped questions: bf16" in html and "correct→wrong" in html


def test_offline_cmmlu_over_shared_subjects(shared_dir, tiny_llama, tmp_path):
    cmmlu = shared_dir / "data" / "cmmlu"
    subjects = ("agronomy", "anatomy", "arts")
    cfg = _cfg(tmp_path, dtypes=(DTYPES["bf16"],), tasks=tuple(f"cmmlu_local_{s}" for s in subjects), limit=3,
               num_fewshot=2, cmmlu_dir=cmmlu)
    plan = prepare(cfg)
    assert len(plan.questions) == 9 and len(plan.instances) == 36
    for q in plan.questions:
        subject = q.subject.removeprefix("cmmlu_local_")
        with (cmmlu / "test" / f"{subject}.csv").open(encoding="utf-8") as fh:
            row = list(csv.DictReader(fh))[q.doc_id]
        assert q.question == f"{row['Question'].strip()}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案："
        assert q.choices == ("A", "B", "C", "D") and q.choices[q.gold] == row["Answer"]
        context = plan.instances[q.start].args[0]
        with (cmmlu / "dev" / f"{subject}.csv").open(encoding="utf-8") as fh:
            dev = list(csv.DictReader(fh))[:2]
        assert context.startswith("以下是关于") and all(f"{d['Question'].strip()}\nA. " in context for d in dev)
        assert context.endswith(q.question) and f"答案： {dev[1]['Answer']}\n\n" in context
    results, _ = run_pair(cfg, str(tiny_llama), observers=(BenchmarkObserver(plan, cfg),))
    m = results.dtypes["bf16"].metrics
    assert all(f"acc/cmmlu_local_{s}" in m and f"flips/cmmlu_local_{s}" in m for s in subjects)


def test_offline_ceval_layout(tmp_path, monkeypatch):
    root = tmp_path / "ceval"
    for split, n in (("dev", 5), ("val", 3)):
        (root / split).mkdir(parents=True)
        with (root / split / f"law_{split}.csv").open("w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
            w.writerows([[i, f" 问题{split}{i} ", "甲", "乙", "丙", "丁", "ABCD"[i % 4], "因为"] for i in range(n)])
    monkeypatch.setenv("EVALSUITE_CEVAL_DIR", str(root))  # the environment variable route
    plan = prepare(_cfg(tmp_path, tasks=("ceval-valid_local_law",), num_fewshot=1))
    assert [q.question for q in plan.questions] == [f"问题val{i}\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：" for i in range(3)]
    assert [q.gold for q in plan.questions] == [0, 1, 2]
    assert plan.instances[0].args[0].startswith("以下是中国关于法学的单项选择题，请选出其中的正确答案。\n\n问题dev0\n")


def test_records_of_a_broken_dtype_and_uneven_choices(tmp_path):
    """NaN log-likelihoods (a broken dtype) and questions with fewer choices keep records aligned; a
    dtype with no finite question has no answers: NaN statistics, no flips (tests/bench/test_bench_nonfinite.py
    checks partly broken dtypes against numpy)."""
    from types import SimpleNamespace

    from evalsuite.bench.grade import Answers
    from evalsuite.bench.results import build
    from evalsuite.bench.tasks import Question

    qs = tuple(Question("t", "t", i, f"q{i}", ch, 0, 0, 0) for i, ch in enumerate([("A", "B"), ("A", "B", "C")]))
    plan = SimpleNamespace(tasks=("t",), questions=qs, settings={})
    ref = Answers(np.array([True, False]), np.array([[-1.0, -2.0, -np.inf], [-3.0, -1.0, -0.5]]), 1.0)
    nan = Answers(np.array([True, True]), np.full((2, 3), np.nan), 1.0)
    metrics, sections, files = build(plan, {"fp32": ref, "fp16": nan}, {"fp32": "reference", "fp16": "test"}, {})
    recs = _records(files)
    assert [len(r["answers"]["fp32"]["loglik"]) for r in recs] == [2, 3]
    assert recs[0]["answers"]["fp32"]["loglik"] == [-1.0, -2.0] and recs[0]["answers"]["fp16"]["loglik"] == [None, None]
    assert [r["answers"]["fp32"]["choice"] for r in recs] == [0, 2]
    assert all(r["answers"]["fp16"] == {"choice": None, "correct": None, "nonfinite": True,
                                        "loglik": [None] * len(r["choices"])} for r in recs)
    m = metrics["fp16"]
    assert m["bench_nonfinite/t"] == 2 and metrics["fp32"]["bench_nonfinite/t"] == 0
    for key in ("acc/t", "acc_se/t", "delta_acc/t", "delta_acc_ci_low/t", "delta_acc_ci_high/t", "flips/t",
                "mcnemar_p/t", "choice_kl/t", "choice_agreement/t"):
        assert np.isnan(m[key]), key  # nothing was answered: no gate can pass on these
    section = sections["benchmarks"]
    assert section["n_flipped"] == {"fp16": 0} and section["flipped"] == {"fp16": []}
    v = section["rows"][0]["vs_reference"]["fp16"]
    assert (v["n"], v["excluded"], v["flips"]) == (0, 2, 0) and section["status"] == "ok"
    json.dumps(sections, allow_nan=True)  # serializable; results.to_dict turns NaN into null


def test_bad_input_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EVALSUITE_CMMLU_DIR", raising=False)
    base = ["run", "--model", str(tiny_llama), "--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"]
    line = one_line_error(capsys, main([*base, "--tasks", "zh_mcc"]), 2)
    assert "unknown task 'zh_mcc'" in line and "zh_mc" in line.split("did you mean")[1]
    line = one_line_error(capsys, main([*base, "--tasks", "cmmlu_local_agronomy"]), 2)
    assert "no CMMLU data directory given" in line and "EVALSUITE_CMMLU_DIR" in line and "--cmmlu-dir" in line
    line = one_line_error(capsys, main([*base, "--tasks", "cmmlu_local", "--cmmlu-dir", str(tmp_path / "nope")]), 2)
    assert f"{tmp_path / 'nope'} does not exist" in line
    bad = tmp_path / "bad"
    for split in ("dev", "test"):
        (bad / split).mkdir(parents=True)
        (bad / split / "agronomy.csv").write_text(",Question,A,B,C,D\n0,问,1,2,3,4\n", encoding="utf-8")
    line = one_line_error(capsys, main([*base, "--tasks", "cmmlu_local_agronomy", "--cmmlu-dir", str(bad)]), 2)
    assert "agronomy.csv" in line and "lacks column(s) Answer" in line
    (bad / "dev" / "agronomy.csv").write_text(",Question,A,B,C,D,Answer\n0,问,1,2,3,4,E\n", encoding="utf-8")
    line = one_line_error(capsys, main([*base, "--tasks", "cmmlu_local_agronomy", "--cmmlu-dir", str(bad)]), 2)
    assert re.search(r"agronomy.csv line 2: answer 'E' is not one of A, B, C, D", line)
    assert "--tasks none" in one_line_error(capsys, main([*base, "--tasks", "none,zh_mc"]), 2)
    assert "--limit" in one_line_error(capsys, main([*base, "--limit", "0"]), 2)
    assert "--num-fewshot" in one_line_error(capsys, main([*base, "--num-fewshot", "-1"]), 2)
    assert not (tmp_path / "o" / "results.json").exists()  # every error came before a model loaded


def test_default_is_zh_mc_and_none_skips(tiny_llama, tmp_path):
    args = build_parser().parse_args(["run"])
    assert tuple(args.tasks.split(",")) == DEFAULT_TASKS
    out = tmp_path / "none"
    argv = ["run", "--model", str(tiny_llama), "--device", "cpu", "--seq-len", "64", "--max-tokens", "128",
            "--no-progress", "--tasks", "none", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "benchmarks" not in data and not (out / "benchmarks.jsonl").exists()
    assert 'id="benchmarks"' not in (out / "report.html").read_text(encoding="utf-8")


def test_report_escapes_flipped_questions():
    from sample_results import make_results

    hostile = "<script>alert(1)</script>"
    r = make_results()
    r["benchmarks"] = {
        "tasks": ["t"], "reference": "fp32", "dtypes": ["fp32", "bf16"], "records_file": "benchmarks.jsonl",
        "rows": [{"task": "t", "subject": None, "n": 2, "acc": {"fp32": {"acc": 0.5, "acc_se": 0.5},
                                                                 "bf16": {"acc": 1.0, "acc_se": 0.0}},
                  "vs_reference": {"bf16": {"delta_acc": 0.5, "delta_acc_ci": [0.0, 1.0], "flips": 1,
                                            "correct_to_wrong": 0, "wrong_to_correct": 1, "flip_rate": 0.5,
                                            "mcnemar_p": 1.0, "choice_kl": 0.01, "choice_agreement": 0.5}}}],
        "flipped": {"bf16": [{"task": "t", "subject": "t", "doc_id": 1, "question": f"Q{hostile}&",
                              "choices": ["A", "B"], "gold": 1, "direction": "wrong→correct", "reference_choice": 0,
                              "test_choice": 1, "reference_loglik": [-1.0, -2.0], "test_loglik": [-2.0, -1.0]}]},
        "n_flipped": {"bf16": 1}}
    r["dtypes"]["bf16"]["metrics"]["acc/t"] = 1.0
    html = render_report(r)
    assert 'id="benchmarks"' in html and 'href="#benchmarks"' in html and "+50 pp" in html
    assert "<script" not in html.lower() and "Q&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in html
    assert 'id="other"' not in html  # shown in its own view, not raw
    assert "<code>acc/t</code>" not in html.split("every metric in results.json")[0]  # not under "more metrics"


def test_tasks_dir_override(tmp_path, monkeypatch):
    from evalsuite.errors import UsageError

    assert tasks_dir() == TASKS
    monkeypatch.setenv("EVALSUITE_TASKS_DIR", str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="EVALSUITE_TASKS_DIR"):
        tasks_dir()
    monkeypatch.setenv("EVALSUITE_TASKS_DIR", str(TASKS))
    assert tasks_dir() == TASKS


def test_a_model_whose_logits_are_not_its_head_on_its_decoder_keeps_its_own_forward(tiny_llama):
    """A logit scale (as some architectures apply in forward) fails the probe: no per-row head."""
    import torch
    from transformers import AutoModelForCausalLM

    from evalsuite.bench import positions as bench_positions

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert bench_positions._HeadSplit.of(model) is not None
    real = model.forward

    def scaled(*a, **kw):
        out = real(*a, **kw)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    assert bench_positions._HeadSplit.of(model) is None
