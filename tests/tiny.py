"""Tiny random-init checkpoints and an offline tokenizer, built from a config with a fixed seed.

One module builds every test model, so every test exercises the same real `from_pretrained`
path that a user's checkpoint takes.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

VOCAB = 384


def corpus_text() -> str:
    return resources.files("evalsuite").joinpath("data/zh_corpus.txt").read_text(encoding="utf-8")


def build_tokenizer(with_bos: bool = True, with_eos: bool = True, with_pad: bool = True):
    """A byte-level BPE trained on the bundled corpus (a second or so, no network).

    with_eos / with_pad False: a tokenizer without that special token (with with_bos False too,
    one with neither BOS nor EOS, which lm-eval's HFLM cannot score without a chosen prefix token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    named = {"bos_token": ("<s>", with_bos), "eos_token": ("</s>", with_eos), "pad_token": ("<pad>", with_pad)}
    special = [t for t, keep in named.values() if keep]  # the defaults keep the ids of earlier versions
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    kwargs = {key: t for key, (t, keep) in named.items() if keep}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _config(arch: str, vocab: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def build_model(path: Path, arch: str = "llama", seed: int = 0, with_bos: bool = True,
                dtype: torch.dtype = torch.float32, scale_lm_head: float | None = None,
                vocab_size: int | None = None, with_eos: bool = True, with_pad: bool = True) -> Path:
    """Save a tiny random-init model + tokenizer to `path`; return `path`.

    scale_lm_head multiplies the LM head weights, e.g. to push FP16 logits past 65504.
    vocab_size: embedding rows beyond the tokenizer's (an odd one exercises the padded head).
    with_bos / with_eos / with_pad: which special tokens the tokenizer has (build_tokenizer).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(with_bos, with_eos, with_pad)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, max(len(tokenizer), vocab_size or 0)))
    with torch.no_grad():  # a larger init than the default 0.02 gives non-trivial distributions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
        if scale_lm_head is not None:
            model.lm_head.weight.mul_(scale_lm_head)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_planted(path: Path, scales: dict[str, float], arch: str = "llama", seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Path:
    """A `build_model` checkpoint with named parameters multiplied by factors: planted numeric problems.

    E.g. {"model.layers.0.mlp.down_proj.weight": 2e4} makes that MLP's output exceed FP16's 65504
    while its weights stay inside FP16's range; a factor of 1e-9 pushes a tensor below FP16's
    smallest subnormal. Saved in `dtype` (the "stored" dtype).
    """
    from transformers import AutoModelForCausalLM

    build_model(path, arch, seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, factor in scales.items():
            params[name].mul_(factor)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path


def build_trained(path: Path, arch: str = "llama", seed: int = 0, steps: int = 120, n_lines: int = 4,
                  line_chars: int = 10) -> Path:
    """A `build_model` checkpoint trained for a few steps to repeat short corpus lines, each ended by EOS.

    Why: a random-init model's greedy output is a loop of one or two tokens; this one continues a
    prompt taken from a trained line with the rest of that line and then stops at EOS, and wanders
    on any other prompt, so decoding tests see both ends (EOS and the token limit).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_model(path, arch, seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    lines = [line[:line_chars] for line in corpus_text().splitlines() if line.strip()][:n_lines]
    seqs = [bos + tokenizer(line, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for line in lines]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path, safe_serialization=True)
    return path
