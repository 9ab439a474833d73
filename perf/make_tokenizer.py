"""Train the benchmark tokenizer: byte-level BPE, 49,953 entries, on a plain-text corpus, offline.

The GPU benchmarks need a tokenizer whose size is fixed (the models' embedding tables are built with
``vocab_size=49953``) and that anyone can rebuild from the same text without the Hub. So:

    python perf/make_tokenizer.py --text ../shared/data/peoples-daily-1998/199801.txt --out .bench/tok49953

Byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) never meets an unknown character, so any
text the benchmarks read tokenizes. ``<s>`` (BOS) and ``</s>`` (EOS) are the two special tokens and
count towards the 49,953; no post-processor adds either one, so ``tokenizer(text)`` gives the plain
token stream (evalsuite puts BOS in front of each window itself, and lm-eval's rolling loglikelihood
uses BOS as its prefix token and would otherwise see it twice). The trainer is deterministic for a
given text and ``tokenizers`` version (merges are picked by count, ties by pair), so the same input
gives byte-identical files; the script prints the sha256 of tokenizer.json to check that.

If the corpus runs out of pairs to merge before 49,953, the script says how many entries it reached
and exits with status 1 unless --allow-smaller is given.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

VOCAB_SIZE = 49953
BOS, EOS = "<s>", "</s>"


def train(text_path: Path, vocab_size: int = VOCAB_SIZE):
    """Train the BPE on the lines of ``text_path``; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # min_frequency=0: keep merging while any pair is left, so a small corpus still gets close to the size.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Lines keep their "\n" so newlines get tokens of their own, as in evalsuite.corpus.tokenize.
    lines = [line + "\n" for line in text_path.read_text(encoding="utf-8").lstrip("\ufeff").splitlines()]
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def save(tok, out_dir: Path) -> Path:
    """Wrap in PreTrainedTokenizerFast (BOS/EOS named) and save_pretrained, for AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, default=Path(".bench/199801.txt"))
    ap.add_argument("--out", type=Path, default=Path(".bench/tok49953"))
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--allow-smaller", action="store_true", help="exit 0 even if the corpus gives fewer entries")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    tok = train(args.text, args.vocab_size)
    train_s = time.perf_counter() - t0
    save(tok, args.out)
    total_s = time.perf_counter() - t0

    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(args.out))
    size = len(loaded)
    digest = hashlib.sha256((args.out / "tokenizer.json").read_bytes()).hexdigest()
    n_bytes = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"trained on {args.text} in {train_s:.1f} s ({total_s:.1f} s with saving)")
    print(f"vocab size reached: {size} (asked {args.vocab_size}); bos={loaded.bos_token!r} id {loaded.bos_token_id}, "
          f"eos={loaded.eos_token!r} id {loaded.eos_token_id}")
    print(f"saved to {args.out} ({n_bytes / 2**20:.2f} MiB); tokenizer.json sha256 {digest}")
    if size != args.vocab_size:
        print(f"the corpus gave {size} entries, not {args.vocab_size}: BPE ran out of pairs to merge", file=sys.stderr)
        return 0 if args.allow_smaller else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
