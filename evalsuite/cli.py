"""Command line: strings become a frozen `RunConfig` here; errors become exit codes here only.

Exit codes: 0 success; 1 a gate failed; 2 usage or configuration error; 3 run error
(model cannot load, corpus unusable, disk full, ...); 4 results written but a part of the run
failed (a dtype, the benchmarks; --allow-partial makes it 0); 130 interrupted (SIGINT);
143 terminated (SIGTERM). Finished passes are kept: rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from functools import partial
from pathlib import Path

from evalsuite.cli_config import cache_root, config_from_args
from evalsuite.cli_parser import build_parser
from evalsuite.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_RUN_ERROR,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EvalsuiteError,
    UsageError,
)
from evalsuite.phases import Phases, active, phase, process_started
from evalsuite.startup import bytecode_cache, leave


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"  # per process: torchrun ranks check the same directory
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to output directory {out_dir} ({exc.strerror}); pass a writable --out") from exc


def cmd_run(args: argparse.Namespace) -> int:
    args.clock.enter("setup")  # imports of the numerical stack, checks of the options, tasks, model source
    with active(args.clock):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    # The fused divergence kernel's compiled code is kept beside evalsuite's other caches (unless
    # the user points Triton elsewhere), so `rm -rf ~/.cache/evalsuite` is a cold start.
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton"))
    from evalsuite.model.demo import demo_checkpoint
    from evalsuite.passes.runner import run

    cfg = config_from_args(args)
    gate_set = _load_gates(args, [p.name for p in (cfg.reference, *cfg.dtypes)])
    _check_writable(cfg.out_dir)
    from evalsuite.bench.tasks import prepare

    bench_plan = prepare(cfg) if cfg.tasks else None  # a bad --tasks fails here, before any model loads
    if cfg.gen_prompts is not None:  # so does a bad --gen-prompts file
        from evalsuite.store.prompts import read_texts

        read_texts(cfg.gen_prompts, cfg.gen_column)
    with phase("convert_demo"):  # once per machine: the embedded GGUF to an FP32 checkpoint (model/demo.py)
        source = cfg.model or str(demo_checkpoint())
    from evalsuite.passes import distributed
    from evalsuite.store.outdir import claim

    dist = distributed.from_env()
    from evalsuite.config import for_device, resolve_device

    resolved, _ = for_device(cfg, resolve_device(cfg.device))  # what results.json records, to compare with
    with claim(cfg.out_dir, resolved.to_dict(), dist.rank if dist else None, overwrite=args.overwrite or args.fresh):
        output = run(cfg, source, observers=_observers(cfg, source, bench_plan), resume=not args.no_resume,
                     fresh=args.fresh, write_outputs=partial(_write_outputs, cfg.out_dir, args.clock))
    if output is None:  # a data-parallel rank other than 0: rank 0 writes and gates the results
        return EXIT_OK
    return _finish_run(args, cfg, gate_set, output)


def _observers(cfg, source: str, bench_plan) -> tuple:
    """The run's observers: numerics diagnostics and the multiple-choice benchmarks, as asked."""
    observers: tuple = ()
    if cfg.numerics:
        from evalsuite.numerics.observer import NumericsObserver

        observers = (NumericsObserver(cfg, source),)
    if bench_plan is not None:
        from evalsuite.bench.observer import BenchmarkObserver
        from evalsuite.passes import distributed

        dist = distributed.from_env()  # under torchrun each rank scores its share of the questions
        shard = {"rank": dist.rank, "world": dist.world} if dist else {}
        observers = (*observers, BenchmarkObserver(bench_plan, cfg, **shard))
    return observers


OBSERVER_FILES = ("benchmarks.jsonl", "generations.jsonl")  # files observers may return, by name


def _write_outputs(out_dir: Path, clock: Phases, output) -> None:
    """per_token.npz, the observers' files, report.html, and last results.json with the run's phases
    up to that moment (provenance.run_timing.phases), each atomically; files of another run that
    this one did not write are removed, so the directory holds one run."""
    from dataclasses import replace

    from evalsuite.report.render import render_report, write_report
    from evalsuite.store.per_token import write_per_token
    from evalsuite.store.results import atomic_write_text, write_results

    with clock("write"):
        write_per_token(out_dir / "per_token.npz", output.per_token)
        for name, text in output.files.items():
            atomic_write_text(out_dir / name, text)
        for name in OBSERVER_FILES:
            if name not in output.files:
                (out_dir / name).unlink(missing_ok=True)
    with clock("report"):
        write_report(out_dir / "report.html", render_report(output.results.to_dict()))
    with clock("write"):
        prov = output.results.provenance
        timing = {**prov.get("run_timing", {}), "phases": clock.report()}
        write_results(out_dir / "results.json", replace(output.results, provenance={**prov, "run_timing": timing}))


def _finish_run(args: argparse.Namespace, cfg, gate_set, output) -> int:
    """The table, the failures, the gates, and last where the files are; the exit code (README "Exit codes")."""
    from evalsuite.log import say
    from evalsuite.report.table import format_table

    results = output.results
    print(format_table(results.to_dict()))
    for f in output.failures:
        say(f"{f['part']} failed: {f['error']}")
        if args.debug and f.get("traceback"):
            print(f["traceback"], file=sys.stderr)
    code = _gate_run(args, cfg, gate_set, results) if gate_set is not None else EXIT_OK
    if code == EXIT_OK and output.failures and not args.allow_partial:
        say(f"{len(output.failures)} part(s) of the run failed (above): exit {EXIT_PARTIAL}; "
            "--allow-partial accepts a partial run")
        code = EXIT_PARTIAL
    say(f"results: {cfg.out_dir / 'results.json'}")
    say(f"report: {cfg.out_dir / 'report.html'}")
    return code


def _gate_run(args: argparse.Namespace, cfg, gate_set, results) -> int:
    from dataclasses import replace

    from evalsuite.gates import ci
    from evalsuite.gates import rules as gates
    from evalsuite.report.render import render_report, write_report
    from evalsuite.store.results import write_results

    outcomes = gates.evaluate(gate_set, results)
    gated = replace(results, sections={**results.sections, "gates": gates.section(gate_set, outcomes)})
    write_results(cfg.out_dir / "results.json", gated)
    write_report(cfg.out_dir / "report.html", render_report(gated.to_dict()))  # now with the gates
    ci.report(gate_set, outcomes, results, args.junit, args.summary_md)
    return gates.exit_code(outcomes)


def _load_gates(args: argparse.Namespace, dtype_names: list[str] | None = None):
    """Parse the gate file and baseline before any model loads: a typo must not cost a GPU run."""
    from evalsuite.gates import gatefile
    from evalsuite.gates import rules as gates

    if args.gate is None:
        given = [flag for flag in ("baseline", "junit", "summary_md") if getattr(args, flag)]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --gate FILE (or --gate default)")
        return None
    gate_set = gatefile.load(args.gate, args.baseline)
    if dtype_names is not None:
        gates.check_dtypes(gate_set, dtype_names)
    return gate_set


def cmd_gate(args: argparse.Namespace) -> int:
    from evalsuite.gates import ci, gatefile
    from evalsuite.gates import rules as gates
    from evalsuite.store.results import load_results

    gate_set = gatefile.load_or_default(args.gate, args.baseline)
    results = load_results(gatefile.results_path(args.results))
    outcomes = gates.evaluate(gate_set, results)
    ci.report(gate_set, outcomes, results, args.junit, args.summary_md)
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


def cmd_tasks(args: argparse.Namespace) -> int:
    """The tasks and groups --tasks accepts: evalsuite's own (offline), and with --all lm-eval's."""
    from evalsuite.bench.tasks import list_tasks

    for name, kind, where in list_tasks(include_lm_eval=args.all):
        print(f"{name:48s} {kind:6s} {where}")
    if not args.all:
        print("(evalsuite's own tasks; `evalsuite tasks --all` adds lm-eval's built-in ones, e.g. cmmlu, ceval-valid)")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "gate": cmd_gate, "report": cmd_report, "tasks": cmd_tasks}


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler, `kill`), handled like Ctrl-C: finished passes are already saved."""


def _raise_terminated(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The CLI; `started` is the perf_counter reading at process start (None: now, e.g. in tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        previous = None
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:
            where = f"evalsuite {args.command} --help" if args.command else "evalsuite --help"
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `{where}`)")
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        args.clock = Phases(started)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        which = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        print(f"evalsuite: interrupted ({which}); rerun the same command to resume", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        print(f"evalsuite: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, EvalsuiteError) else EXIT_RUN_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(exc: Exception) -> str:
    """The message a user reads: ours as written; the system's and a bug's in one line naming the fix."""
    if isinstance(exc, EvalsuiteError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"no space left on the device{where}: free space (or pass another --out), then rerun the same " \
               "command to resume"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or type(exc).__name__}{where}; check the path and its permissions"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"unexpected {type(exc).__name__}: {first} (a bug in evalsuite: rerun with --debug for the traceback " \
           "and report it)"


def console_main() -> None:
    started = process_started()  # the run's clock starts with the process: imports count
    bytecode_cache(cache_root())  # before torch is imported (startup.py)
    leave(main(started=started))  # not sys.exit: startup.leave says why
