"""The token lm-eval's HFLM puts before an empty context, chosen for tokenizers lm-eval has no rule for.

HFLM uses BOS, else EOS. With neither it fails on every request, even with non-empty contexts
(it decodes the missing id to check whether a context already starts with it), so every
multiple-choice task failed at every dtype. The choice only changes numbers for requests with an
empty context (none in the project's tasks); it is recorded in the `benchmarks` section.
"""

from __future__ import annotations

from dataclasses import dataclass

from evalsuite.model.loading import text_config


@dataclass(frozen=True)
class Prefix:
    """The token lm-eval puts before an empty context (and whose text, at the start of a context,
    stops the tokenizer from adding its special tokens again)."""

    id: int
    token: str  # as the tokenizer's vocabulary writes it (e.g. "Ċ")
    text: str  # what it decodes to (e.g. "\n")
    source: str  # "bos", "eos", "newline" or "pad"

    def to_dict(self) -> dict:
        return {"id": self.id, "token": self.token, "text": self.text, "source": self.source}


def _prefix(tokenizer, tid: int, source: str) -> Prefix:
    return Prefix(int(tid), str(tokenizer.convert_ids_to_tokens(int(tid))), str(tokenizer.decode([int(tid)])), source)


def prefix_token(tokenizer, rows: int) -> Prefix:
    """lm-eval's rule (BOS, else EOS), and for a tokenizer with neither, where HFLM would fail
    on every request (it decodes the missing id): the newline token, a boundary the model has
    seen in training; else the tokenizer's own pad token. `rows`: the model's embedding rows (a
    pad token HFLM added to the tokenizer lies beyond them). Call it before HFLM has seen the
    tokenizer: HFLM gives a tokenizer without pad token one."""
    from evalsuite.bench.tasks import BenchmarkError

    for source in ("bos", "eos"):
        tid = getattr(tokenizer, f"{source}_token_id", None)
        if tid is not None:
            return _prefix(tokenizer, tid, source)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) == 1 and newline[0] != getattr(tokenizer, "unk_token_id", None) and 0 <= newline[0] < rows:
        return _prefix(tokenizer, newline[0], "newline")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and 0 <= pad < rows:
        return _prefix(tokenizer, pad, "pad")
    raise BenchmarkError("the tokenizer has no BOS, EOS or pad token and no single newline token: lm-eval needs "
                         "one to put before an empty context; give the tokenizer a bos_token or eos_token")


def embedding_rows(model) -> int:
    """Token ids the model can embed."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, TypeError, NotImplementedError):
        config = text_config(model.config)
        return int(getattr(config, "vocab_size", 0) or 0)
