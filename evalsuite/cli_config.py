"""The edge: the parsed command line (an argparse Namespace) becomes a frozen `RunConfig`.

Past `config_from_args` no code sees a raw option string: dtypes and recipes are parsed into
`Precision`s against the one precision table, tasks into task names, the corpus into a
`CorpusSpec`. Split from cli.py, which runs the commands; `cli_parser.py` holds the grammar.
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path


def cache_root() -> Path:
    """$EVALSUITE_CACHE, else $XDG_CACHE_HOME/evalsuite or ~/.cache/evalsuite."""
    root = os.environ.get("EVALSUITE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evalsuite"
    return Path(root)


def default_cache_dir() -> Path:
    if os.environ.get("EVALSUITE_REFERENCE_CACHE"):
        return Path(os.environ["EVALSUITE_REFERENCE_CACHE"])
    return cache_root() / "reference"


def config_from_args(args: argparse.Namespace):
    from evalsuite.bench.tasks import parse_tasks
    from evalsuite.config import RunConfig
    from evalsuite.model.precision import parse_dtype
    from evalsuite.model.recipes import parse_recipe
    from evalsuite.store.corpus import CorpusSpec

    names = [d for d in args.dtypes.split(",") if d.strip()]
    out = args.out or Path("reports") / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    return RunConfig(
        model=args.model,
        dtypes=tuple(parse_recipe(d) for d in names),
        reference=parse_dtype(args.reference),
        device=args.device,
        corpus=CorpusSpec(source=args.corpus, column=args.corpus_column, hf_config=args.corpus_config,
                          hf_split=args.corpus_split),
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        windowing=args.windowing,
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
        cpu_half_gemm=args.cpu_half_gemm,
        repair=args.repair,
        repair_tokens=args.repair_tokens,
        generate=args.generate,
        gen_prompts=args.gen_prompts,
        gen_column=args.gen_column,
        gen_tokens=args.gen_tokens,
        gen_count=args.gen_count,
    )
