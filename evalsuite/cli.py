"""Command line: strings become a frozen `RunConfig` here; errors become exit codes here only.

Exit codes: 0 success; 1 a gate failed; 2 usage or configuration error; 3 run error
(model cannot load, corpus unusable, ...); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from evalsuite import __version__
from evalsuite.errors import EXIT_OK, EXIT_USAGE, EvalsuiteError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and calling sys.exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `evalsuite {self.prog.split()[-1]} --help`)")


def _positive_int_or_auto(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None
    return value


def _count_or_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of questions or a fraction, got {text!r}") from None
    return int(value) if value.is_integer() else value


def _add_gate_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--gate", required=required, metavar="FILE",
                        help="gates TOML file, a pyproject.toml with [tool.evalsuite.gates], or 'default' "
                             "(see docs/gates.md); exit 1 if a gate fails")
    parser.add_argument("--baseline", metavar="FILE", help="results.json that 'baseline' bounds compare against")
    parser.add_argument("--junit", metavar="FILE", help="write JUnit XML, one test case per gate")
    parser.add_argument("--summary-md", metavar="FILE", help="write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evalsuite", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"evalsuite {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="measure perplexity and divergence of each dtype against the reference")
    run.add_argument("--model", help="checkpoint directory or Hugging Face id (default: embedded Gemma 3 270M)")
    run.add_argument("--dtypes", default="fp16,bf16", help="comma-separated test dtypes (fp16, bf16, fp32)")
    run.add_argument("--reference", default="fp32", help="reference dtype (default fp32, run with TF32 off)")
    run.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    run.add_argument("--corpus", default="bundled:zh",
                     help="bundled:zh, a .txt/.jsonl/.parquet file, or hf:DATASET for a Hugging Face dataset")
    run.add_argument("--corpus-column", default="text", help="text field of .jsonl/.parquet/dataset rows")
    run.add_argument("--corpus-config", default=None, help="Hugging Face dataset config name")
    run.add_argument("--corpus-split", default="test", help="Hugging Face dataset split")
    run.add_argument("--seq-len", type=int, default=2048, help="scored tokens per window (default 2048)")
    run.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    run.add_argument("--batch-size", type=_positive_int_or_auto, default=None, help="windows per batch or 'auto'")
    run.add_argument("--out", type=Path, default=None, help="output directory (default reports/run-TIMESTAMP)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--noise-tokens", type=int, default=32768,
                     help="tokens re-scored by a second reference pass to measure the noise floor")
    run.add_argument("--buffer-gib", type=float, default=None,
                     help="memory for the reference's logits (default: half the free device memory)")
    run.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager (default: transformers')")
    run.add_argument("--trust-remote-code", action="store_true", help="allow code from the checkpoint (off by default)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the FP16/BF16 models' attention, MLP and norm modules: faster passes on "
                          "long runs, after a few seconds of compiling per dtype; not bit-identical to eager (README: Speed and memory)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--fresh", action="store_true",
                     help="discard an unfinished run in --out instead of resuming it")
    run.add_argument("--no-resume", action="store_true",
                     help="keep no resume state (saves disk: the reference's logits are not written)")
    run.add_argument("--no-numerics", action="store_true",
                     help="skip the numerics diagnostics: weight conversion, activation headroom, first inf/NaN, "
                          "layer-wise error, verdict (docs/numerics.md)")
    run.add_argument("--headroom-margin-bits", type=float, default=1.0,
                     help="flag modules whose reference activations come within this many bits of a dtype's "
                          "largest finite value (default 1.0)")
    run.add_argument("--tasks", default="zh_mc",  # = bench_tasks.DEFAULT_TASKS (not imported: `report` needs no numpy)
                     help="comma-separated lm-eval multiple-choice tasks or groups scored at each dtype (e.g. zh_mc, "
                          "cmmlu_local, cmmlu, ceval-valid), or 'none' (default: evalsuite's own zh_mc, offline)")
    run.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per question (default: task's)")
    run.add_argument("--limit", type=_count_or_fraction, default=None,
                     help="score at most this many questions per task/subject (or a fraction below 1)")
    run.add_argument("--cmmlu-dir", type=Path, default=None,
                     help="local CMMLU (dev/, test/ CSVs) for cmmlu_local (default: $EVALSUITE_CMMLU_DIR)")
    run.add_argument("--ceval-dir", type=Path, default=None,
                     help="local C-Eval (dev/, val/ CSVs) for ceval-valid_local (default: $EVALSUITE_CEVAL_DIR)")
    run.add_argument("--device-map", choices=["auto"], default=None,
                     help="'auto': shard each model over the visible GPUs through accelerate, for a model too "
                          "large for one GPU")
    run.add_argument("--reference-cache", type=Path, default=None, metavar="DIR",
                     help="where finished reference passes are kept and reused by later runs of the same "
                          "checkpoint, tokens and settings (default: $EVALSUITE_CACHE/reference or "
                          "~/.cache/evalsuite/reference)")
    run.add_argument("--no-reference-cache", action="store_true", help="neither read nor write the reference cache")
    run.add_argument("--reference-cache-gib", type=float, default=64.0,
                     help="evict the least recently used cached references beyond this size (default 64)")
    run.add_argument("--generate", action="store_true",
                     help="also decode greedily at the reference and each dtype and report where the continuations "
                          "part from the reference's, against a noise floor (docs/generation.md)")
    run.add_argument("--gen-prompts", type=Path, default=None, metavar="FILE",
                     help="prompts for --generate: .txt (one per line) or .jsonl (see --gen-column); default: corpus "
                          "prefixes, and benchmark question contexts when --tasks are on")
    run.add_argument("--gen-column", default="text", help="text field of a .jsonl --gen-prompts file")
    run.add_argument("--gen-tokens", type=int, default=None,
                     help="tokens per continuation (default 32 on CPU, 128 on CUDA)")
    run.add_argument("--gen-count", type=int, default=None, help="prompts (default 8 on CPU, 64 on CUDA)")
    _add_gate_args(run, required=False)

    gate = sub.add_parser("gate", help="check a results.json against gates (no model needed); exit 1 if one fails")
    gate.add_argument("results", help="results.json of a run, or its output directory")
    _add_gate_args(gate, required=True)

    report = sub.add_parser("report", help="re-render report.html from results.json (no model needed); "
                                           "two files: compare the runs side by side")
    report.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json", help="one run, or two to compare")
    report.add_argument("--compare", type=Path, default=None, metavar="B.json", help="a second run to compare with")
    report.add_argument("-o", "--output", type=Path, default=None,
                        help="output HTML (default: report.html beside results.json, or compare.html for two runs)")
    return parser


def default_cache_dir() -> Path:
    if os.environ.get("EVALSUITE_REFERENCE_CACHE"):
        return Path(os.environ["EVALSUITE_REFERENCE_CACHE"])
    root = os.environ.get("EVALSUITE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evalsuite"
    return Path(root) / "reference"


def config_from_args(args: argparse.Namespace):
    from evalsuite.bench.tasks import parse_tasks
    from evalsuite.config import RunConfig
    from evalsuite.model.precision import parse_dtype
    from evalsuite.store.corpus import CorpusSpec

    names = [d for d in args.dtypes.split(",") if d.strip()]
    out = args.out or Path("reports") / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    return RunConfig(
        model=args.model,
        dtypes=tuple(parse_dtype(d) for d in names),
        reference=parse_dtype(args.reference),
        device=args.device,
        corpus=CorpusSpec(source=args.corpus, column=args.corpus_column, hf_config=args.corpus_config,
                          hf_split=args.corpus_split),
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        out_dir=out,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        noise_tokens=args.noise_tokens,
        buffer_gib=args.buffer_gib,
        attn_implementation=args.attn_implementation,
        progress=not args.no_progress,
        numerics=not args.no_numerics,
        headroom_margin_bits=args.headroom_margin_bits,
        tasks=parse_tasks(args.tasks),
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        cmmlu_dir=args.cmmlu_dir,
        ceval_dir=args.ceval_dir,
        device_map=args.device_map,
        reference_cache=None if args.no_reference_cache else (args.reference_cache or default_cache_dir()),
        reference_cache_gib=args.reference_cache_gib,
        compile=args.compile,
        generate=args.generate,
        gen_prompts=args.gen_prompts,
        gen_column=args.gen_column,
        gen_tokens=args.gen_tokens,
        gen_count=args.gen_count,
    )


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"  # per process: torchrun ranks check the same directory
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to output directory {out_dir} ({exc.strerror}); pass a writable --out") from exc


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from evalsuite.log import say
    from evalsuite.model.demo import demo_checkpoint
    from evalsuite.passes.runner import run
    from evalsuite.report.table import format_table
    from evalsuite.store.results import atomic_write, compact, write_results

    cfg = config_from_args(args)
    gate_set = _load_gates(args, [p.name for p in (cfg.reference, *cfg.dtypes)])
    _check_writable(cfg.out_dir)
    from evalsuite.bench.tasks import prepare

    bench_plan = prepare(cfg) if cfg.tasks else None  # a bad --tasks fails here, before any model loads
    if cfg.gen_prompts is not None:  # so does a bad --gen-prompts file
        from evalsuite.store.prompts import read_texts

        read_texts(cfg.gen_prompts, cfg.gen_column)
    source = cfg.model or str(demo_checkpoint())
    observers = ()
    if cfg.numerics:
        from evalsuite.numerics.observer import NumericsObserver

        observers = (NumericsObserver(cfg, source),)
    if bench_plan is not None:
        from evalsuite.bench.observer import BenchmarkObserver
        from evalsuite.passes import distributed

        dist = distributed.from_env()  # under torchrun each rank scores its share of the questions
        shard = {"rank": dist.rank, "world": dist.world} if dist else {}
        observers = (*observers, BenchmarkObserver(bench_plan, cfg, **shard))
    from evalsuite.report.render import render_report, write_report

    def write_outputs(results, per_token) -> None:  # before the resume state is discarded
        write_results(cfg.out_dir / "results.json", results)
        write_report(cfg.out_dir / "report.html", render_report(results.to_dict()))
        atomic_write(cfg.out_dir / "per_token.npz", lambda fh: np.savez(fh, **compact(per_token)))

    results, per_token = run(cfg, source, observers=observers, resume=not args.no_resume, fresh=args.fresh,
                             write_outputs=write_outputs)
    if results is None:  # a data-parallel rank other than 0: rank 0 writes and gates the results
        return EXIT_OK
    print(format_table(results.to_dict()))
    say(f"results written to {cfg.out_dir / 'results.json'}")
    if gate_set is None:
        return EXIT_OK
    from dataclasses import replace

    from evalsuite.gates import rules as gates

    outcomes = gates.evaluate(gate_set, results)
    gated = replace(results, sections={**results.sections, "gates": gates.section(gate_set, outcomes)})
    write_results(cfg.out_dir / "results.json", gated)
    write_report(cfg.out_dir / "report.html", render_report(gated.to_dict()))  # now with the gates
    gates.report(gate_set, outcomes, results, args.junit, args.summary_md)
    return gates.exit_code(outcomes)


def _load_gates(args: argparse.Namespace, dtype_names: list[str] | None = None):
    """Parse the gate file and baseline before any model loads: a typo must not cost a GPU run."""
    from evalsuite.gates import rules as gates

    if args.gate is None:
        given = [flag for flag in ("baseline", "junit", "summary_md") if getattr(args, flag)]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --gate FILE (or --gate default)")
        return None
    gate_set = gates.load(args.gate, args.baseline)
    if dtype_names is not None:
        gates.check_dtypes(gate_set, dtype_names)
    return gate_set


def cmd_gate(args: argparse.Namespace) -> int:
    from evalsuite.gates import rules as gates
    from evalsuite.store.results import load_results

    gate_set = _load_gates(args)
    results = load_results(gates.results_path(args.results))
    outcomes = gates.evaluate(gate_set, results)
    gates.report(gate_set, outcomes, results, args.junit, args.summary_md)
    return gates.exit_code(outcomes)


def cmd_report(args: argparse.Namespace) -> int:
    from evalsuite.report import render as report

    paths = [p / "results.json" if p.is_dir() else p for p in [*args.results, *filter(None, [args.compare])]]
    if len(paths) > 2:
        raise UsageError("evalsuite report takes one results.json, or two to compare (see `evalsuite report --help`)")
    runs = [report.load(p) for p in paths]
    if len(runs) == 1:
        out = args.output or paths[0].parent / "report.html"
        html = report.render_report(runs[0])
    else:
        out = args.output or paths[0].parent / "compare.html"
        html = report.render_compare(*runs, files=(str(paths[0]), str(paths[1])))
    report.write_report(out, html)
    print(f"evalsuite: report written to {out}", file=sys.stderr)
    return EXIT_OK


COMMANDS = {"run": cmd_run, "gate": cmd_gate, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except EvalsuiteError as exc:
        if debug:
            raise
        print(f"evalsuite: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("evalsuite: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    sys.exit(main())
