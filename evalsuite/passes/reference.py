"""How the reference is kept for the test passes and for reuse: its logits, or its hidden states and head.

A model with the decoder/head split (Scorer.split, one device) keeps the reference's final hidden
states (N, H) and a copy of its FP32 LM head; the test passes get its logits by re-applying the
head to the chunks the reference pass applied it to (model/kept.py: bit for bit the reference's
own, by construction). That is 4 bytes x width per token instead of 4 bytes x vocabulary (4,096
instead of 49,953 floats at 7B; 640 instead of 262,144 for Gemma 3 270M), for one FP32 head GEMM
per token in each test pass.

The rule, chosen per run by measurement (docs/performance.md, "Keeping the reference"):
- On the device, for the test passes: the logits when the whole run's fit the buffer (nothing to
  re-apply; one segment). Otherwise whichever costs less: re-applying the head in every test pass
  (its time per token measured on the reference's own head, x tokens x test passes) or the
  segments the logits need (each extra segment loads every model once more: measured as the
  reference's load time x (1 + test passes)). A full forward, or a model sharded over GPUs,
  keeps logits as before.
- For reuse (the reference cache, else the resume state): always the hidden states and the head
  when the split is available, kept only if the pass took longer than reading them back at
  KEEP_READ_BYTES_PER_S plus, where the run keeps logits, re-applying the head once to fill the
  buffer (`worth_keeping`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from evalsuite.log import say
from evalsuite.model.head import FrozenHead
from evalsuite.model.kept import KeptReference, head_seconds_per_token
from evalsuite.model.loading import placement
from evalsuite.passes.scoring import keep_hidden, keep_reference
from evalsuite.store.windows import scored_counts

# Bytes per second a kept reference is assumed to be read back at (a local NVMe SSD manages more;
# the H200 machine read its cache at about 3.9 GB/s and wrote at about 2 GB/s).
KEEP_READ_BYTES_PER_S = 2 * 2**30
FORCE: str | None = None  # "logits" or "hidden-states" instead of the rule: a seam for the tests
LOGITS, HIDDEN = "logits", "hidden-states"


def worth_keeping(pass_s: float, nbytes: int, reapply_s: float = 0.0) -> bool:
    """Whether the reference (nbytes of logits, or of hidden states and head) is worth writing for reuse.

    Why not always: recomputing a small model's FP32 reference can be quicker than reading back
    4 bytes x vocabulary per token (0.5B shape on an H200: 7.7 s of pass against 48.8 GiB of
    logits). Hidden states are 4 bytes x width per token, plus re-applying the head once
    (`reapply_s`, measured): at that shape 0.9 GiB and about half a second.
    """
    return pass_s >= nbytes / KEEP_READ_BYTES_PER_S + reapply_s


def buffer_tokens(cfg, device: torch.device, row_bytes: int, n_tokens: int) -> int:
    """Tokens of `row_bytes` each that the device buffer holds (at least one window, at most the run)."""
    if cfg.buffer_gib is not None:
        budget = cfg.buffer_gib * 2**30
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.5 * free  # the rest: activations and (C, V) chunk temporaries
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = 0.35 * avail
    return int(max(cfg.seq_len, min(n_tokens, budget // row_bytes)))


def segments_of(windows: list[np.ndarray], max_tokens: int) -> list[tuple[int, int, int]]:
    """Consecutive window ranges (first, last+1, token offset) each with <= max_tokens tokens."""
    out, first, offset, count = [], 0, 0, 0
    for i, n in enumerate(scored_counts(windows).tolist()):
        if count and count + n > max_tokens:
            out.append((first, i, offset))
            first, offset, count = i, offset + count, 0
        count += n
    out.append((first, len(windows), offset))
    return out


@dataclass(frozen=True)
class Choice:
    kept: str  # LOGITS or HIDDEN: what the test passes read
    tokens: int  # tokens per segment
    reason: str
    head_us: float | None  # the FP32 head's microseconds per token, where measured


def choose(cfg, device, scorer, head: FrozenHead | None, windows: list, load_s: float, n_tests: int) -> Choice:
    """The rule of the module docstring, for the whole run (fixed before the first reference pass)."""
    n, vocab = int(scored_counts(windows).sum()), scorer.vocab_size
    if head is None:
        why = scorer.split_reason or ("a sharded model" if scorer.sharded else "a head that is not a plain linear layer")
        return Choice(LOGITS, buffer_tokens(cfg, device, 4 * vocab, n), f"no head to re-apply ({why})", None)
    width = head.weight.shape[1]
    as_logits = buffer_tokens(cfg, device, 4 * (vocab + width), n)  # the pass writes both
    as_hidden = buffer_tokens(cfg, device, 4 * width, n)
    if FORCE is not None:
        return Choice(FORCE, as_logits if FORCE == LOGITS else as_hidden, "forced", None)
    if as_logits >= n:
        return Choice(LOGITS, as_logits, "the whole run's reference logits fit the device buffer", None)
    rows = torch.randn(min(scorer.chunk_tokens, n), width, device=device)  # (C, H): one chunk's shape
    head_us = head_seconds_per_token(head, rows) * 1e6
    extra = len(segments_of(windows, as_logits)) - len(segments_of(windows, as_hidden))
    reapply_s, reload_s = head_us * 1e-6 * n * max(1, n_tests), extra * load_s * (1 + n_tests)
    costs = f"re-applying the head {reapply_s:.2f} s, {extra} more segments' loads {reload_s:.2f} s"
    if reapply_s <= reload_s:
        return Choice(HIDDEN, as_hidden, f"the logits do not fit the device buffer; {costs}", head_us)
    return Choice(LOGITS, as_logits, f"the logits do not fit the device buffer; {costs}", head_us)


def fix_plan(loop, model, scorer, head: FrozenHead | None, ref_flags: dict, load_s: float) -> None:
    """The loop's segments and how the reference is kept (`choose`), fixed for the run at its first
    reference pass and recorded in the provenance."""
    choice = choose(loop.cfg, loop.device, scorer, head, loop.windows.windows, load_s, len(loop.tests))
    loop.segments = segments_of(loop.windows.windows, choice.tokens)
    loop.prov.update({
        "logits_path_reason": scorer.split_reason or None, "reference_flags": ref_flags,
        "logits_path": scorer.logits_path, "chunk_tokens": scorer.chunk_tokens, "buffer_tokens": choice.tokens,
        "n_segments": len(loop.segments), "reference_kept": choice.kept, "reference_kept_reason": choice.reason,
        "reference_stored": HIDDEN if head is not None else LOGITS,
        "reference_head_us": choice.head_us,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "placement": placement(model) if loop.cfg.device_map else None})
    if len(loop.segments) > 1:
        what = "hidden states" if choice.kept == HIDDEN else "logits"
        say(f"reference {what} kept in {len(loop.segments)} segments of <= {choice.tokens} tokens")


def allocate(kept_mode: str, n: int, scorer, head: FrozenHead | None, device) -> KeptReference:
    """The segment's KeptReference for the reference pass to fill (hidden states wherever there is a head)."""
    return KeptReference(n, scorer.vocab_size, device, head, logits=kept_mode == LOGITS or head is None)


def on_chunk(scorer, kept: KeptReference, staged):
    """The reference pass's per-chunk function; sets the Scorer to hand out hidden states where kept."""
    scorer.hidden_out = kept.hidden is not None
    if kept.hidden is not None:
        return lambda pos, hidden, tgt: keep_hidden(scorer, kept, staged, pos, hidden, tgt)
    return lambda pos, logits, tgt: keep_reference(kept.logits, staged, pos, logits, tgt)


def measure_head(loop, kept: KeptReference) -> float | None:
    """The FP32 head's microseconds per token on the segment's first chunk, where something reads it:
    the test passes re-apply it, or a reuse decision weighs it (None otherwise, and without a head)."""
    if kept.head is None or not len(kept):
        return None
    if kept.logits is not None and loop.cache is None and not loop.state.enabled:
        return None  # logits kept, nothing stored: the head is never re-applied
    b = kept.bounds
    return head_seconds_per_token(kept.head, kept.hidden[int(b[0]) : int(b[1])]) * 1e6


def keep_for_reuse(loop, seg: int, kept: KeptReference, saved: dict, meta: dict, need_logits: bool) -> None:
    """Write the segment's reference (hidden states and head, or logits) and its arrays, if worth it."""
    store, hidden = loop.refstore, kept.hidden is not None
    tensor = kept.hidden if hidden else kept.logits
    nbytes = tensor.numel() * 4 + (kept.head.nbytes if hidden and not store.has_head() else 0)
    # A read-back run re-applies the head once only where it keeps logits (into the buffer); where it
    # keeps hidden states its test passes re-apply the head as this run's do.
    materialize = hidden and loop.prov.reference_kept == LOGITS
    reapply_s = (loop.prov.reference_head_us or 0.0) * 1e-6 * len(kept) if materialize else 0.0
    pass_s = meta["timing"]["pass_s"]
    if worth_keeping(pass_s, nbytes, reapply_s):
        if need_logits or loop.cache is not None:  # the cache keeps it even when no dtype needs it now
            if hidden:
                if not store.has_head():
                    store.save_head(kept.head.weight, kept.head.bias, {"vocab": kept.head.vocab, "softcap": kept.head.cap})
                saved["kept/bounds"] = kept.bounds
            store.save_tensor(seg, "hidden" if hidden else "logits", tensor)
        store.save(seg, "reference", saved, meta)  # after the tensors: "reference done" implies them
    elif loop.not_kept is None and (loop.cache is not None or loop.state.enabled):
        what = "hidden states and head" if hidden else "logits"
        loop.not_kept = (f"recomputing the reference ({pass_s:.1f} s) is quicker than reading back its "
                         f"{nbytes / 2**30:.1f} GiB of {what}" + (f" and re-applying the head ({reapply_s:.1f} s)"
                                                                  if materialize else ""))
        say(f"reference not kept for reuse: {loop.not_kept}")


def load_kept(store, seg: int, device, saved: dict, kept_mode: str) -> KeptReference:
    """A stored segment as the test passes read it: hidden states re-applied (into logits, where the
    run keeps logits), or the stored logits."""
    if "kept/bounds" not in saved:
        return KeptReference.from_logits(store.load_tensor(seg, "logits", device))  # (N, V)
    weight, bias, meta = store.load_head(device)
    head = FrozenHead(weight, bias, int(meta["vocab"]), meta["softcap"])
    hidden = store.load_tensor(seg, "hidden", device)  # (N, H)
    return KeptReference.from_hidden(hidden, np.asarray(saved["kept/bounds"]), head, logits=kept_mode == LOGITS)
