"""Per-token arrays -> the flat `metrics` dicts, statuses and report sections of `results.json`."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone

import numpy as np
import torch

import evalsuite
from evalsuite.metrics.attribution import attribution
from evalsuite.metrics.stats import divergence_stats, kl_histogram, paired_perplexity, perplexity
from evalsuite.store.provenance import Provenance
from evalsuite.store.results import DtypeResult, RunResults
from evalsuite.store.windows import scored_counts

WORST_TOKENS = 12
CONTEXT_TOKENS = 24


def _divergence(arrays, mask: np.ndarray):
    return divergence_stats(arrays.kl[mask], arrays.top1_agree[mask], arrays.p_ref[mask], arrays.p_test[mask],
                            arrays.max_abs_dlogit[mask])


def environment(prov: Provenance, device: torch.device) -> None:
    """The software and machine facts, into `prov`."""
    import transformers

    prov.evalsuite, prov.python, prov.platform = evalsuite.__version__, sys.version.split()[0], platform.platform()
    prov.torch, prov.transformers, prov.numpy, prov.cuda = (torch.__version__, transformers.__version__,
                                                            np.__version__, torch.version.cuda)
    prov.cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    prov.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    prov.torch_threads = torch.get_num_threads()
    if device.type == "cuda":
        prov.compute_capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        prov.gpu_memory_gib = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)


def _tokens_per_s(a) -> float | None:
    return round(len(a.nll) / a.timing["pass_s"], 1) if a.timing["pass_s"] else None


def build_results(s, loop, stored_dtype: str | None) -> RunResults:
    """The results of a run: `s` is the runner's Setup (cfg, source, device, tokenizer, windows,
    corpus_identity, skipped), `loop` the finished pass loop (ref, noise, arrays, failed, prov)."""
    cfg, tokenizer, windows = s.cfg, s.tokenizer, s.windows
    recipe = {p.name: p.describe() for p in (cfg.reference, *cfg.dtypes)}.get
    noise_metrics, noise_section = _noise(loop.noise, loop.ref)
    ref_ok = loop.ref.nonfinite == 0
    dtypes = {cfg.reference.name: _reference_result(cfg.reference.name, loop.ref, windows.target_bytes,
                                                    noise_metrics, recipe(cfg.reference.name))}
    distributions, worst = {}, {}
    for name, a in loop.arrays.items():
        if name in loop.failed:
            dtypes[name] = DtypeResult(name, "test", "failed", loop.failed[name], recipe=recipe(name))
            continue
        ok = ref_ok & (a.nonfinite == 0)
        dtypes[name] = _test_result(name, a, loop.ref, ok, windows.target_bytes, noise_metrics, recipe(name))
        distributions[name] = kl_histogram(a.kl[ok])
        worst[name] = _worst_tokens(a, loop.ref, ok, windows, tokenizer)
    for name, msg in s.skipped.items():
        dtypes[name] = DtypeResult(name, "test", "skipped", msg, recipe=recipe(name))
    sections = {"noise_floor_detail": noise_section} if noise_section else {}
    sections.update(attribution(dtypes))  # weights' vs compute's share, where both recipes ran
    if distributions:
        sections["kl_histograms"] = distributions
        sections["worst_tokens"] = worst
    model_info = {"source": s.source, "stored_dtype": stored_dtype,
                  "is_demo": cfg.model is None, "vocab_size": int(getattr(tokenizer, "vocab_size", 0) or 0)}
    corpus_info = {**s.corpus_identity, "n_tokens": windows.n_tokens, "n_windows": len(windows.windows),
                   "seq_len": windows.seq_len, "context": windows.context,
                   "n_scored_bytes": int(windows.target_bytes.sum()), "tokenizer": type(tokenizer).__name__,
                   "windowing": windows.windowing}
    if windows.documents is not None:  # lm-eval: the divisors of its byte and word perplexity
        corpus_info.update(n_scored_documents=int(len(np.unique(windows.documents))),
                           n_scored_words=windows.n_words)
    return RunResults(
        config=cfg.to_dict(), provenance=_provenance(loop.prov, s.device), model=model_info, corpus=corpus_info,
        reference=cfg.reference.name, dtypes=dtypes, noise_floor=noise_section, sections=sections,
        created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), evalsuite_version=evalsuite.__version__,
    )


def _noise(noise, ref) -> tuple[dict, dict]:
    """(the noise floor's figures as `noise_*` metrics, the noise_floor section), or two empty dicts."""
    if noise is None:
        return {}, {}
    ns = _divergence(noise, np.isfinite(noise.kl))
    return ns.as_metrics("noise_"), {**ns.as_metrics(), "batch_size": noise.batch_size,
                                     "reference_batch_size": ref.batch_size, "tokens_per_s": _tokens_per_s(noise)}


def _reference_result(name: str, ref, bytes_, noise_metrics: dict, recipe) -> DtypeResult:
    ok = ref.nonfinite == 0
    ppl = perplexity(ref.nll[ok], int(bytes_[ok].sum()))
    metrics = {
        "ppl": ppl.ppl, "ppl_se": ppl.ppl_se, "mean_nll": ppl.mean_nll, "bits_per_byte": ppl.bits_per_byte,
        "n_tokens": ppl.n_tokens, "nonfinite_logits": int(ref.nonfinite.sum()),
        "nonfinite_tokens": int((~ok).sum()), "tokens_per_s": _tokens_per_s(ref), **noise_metrics,
    }
    status, msg = "ok", None
    if not ok.all():
        status = "broken"
        msg = (f"the {name} reference itself gives non-finite logits on {int((~ok).sum())} of {len(ok)} tokens: "
               "the checkpoint is damaged; statistics cover finite tokens only")
    return DtypeResult(name, "reference", status, msg, metrics, {**ref.timing, "batch_size": ref.batch_size}, recipe)


def _test_result(name: str, a, ref, ok, bytes_, noise_metrics: dict, recipe) -> DtypeResult:
    """One test precision's metrics over the tokens both it and the reference score finitely."""
    bad = a.nonfinite > 0
    p = perplexity(a.nll[ok], int(bytes_[ok].sum()))
    pp = paired_perplexity(ref.nll[ok], a.nll[ok])
    d = _divergence(a, ok)
    metrics = {
        "ppl": p.ppl, "ppl_se": p.ppl_se, "mean_nll": p.mean_nll, "bits_per_byte": p.bits_per_byte,
        "n_tokens": int(len(a.nll)), "n_scored_tokens": p.n_tokens,
        "ppl_ratio": pp.ppl_ratio, "ppl_ratio_se": pp.ppl_ratio_se, "delta_ppl": pp.delta_ppl,
        "delta_ppl_se": pp.delta_ppl_se, "delta_nll": pp.delta_nll, "delta_nll_se": pp.delta_nll_se,
        **{k: v for k, v in d.as_metrics().items() if k != "n_tokens"},
        "nonfinite_logits": int(a.nonfinite.sum()), "nonfinite_tokens": int(bad.sum()),
        "finite_only": bool(bad.any()), "tokens_per_s": _tokens_per_s(a), **noise_metrics,
    }
    status, msg = "ok", None
    if bad.any():
        status = "broken"
        msg = (f"{name.upper()} gives non-finite logits (inf/NaN) on {int(bad.sum())} of {len(bad)} tokens "
               f"({bad.mean():.1%}); " + ("no statistic can be computed" if bad.all()
                                          else "its other statistics cover the finite tokens only"))
    return DtypeResult(name, "test", status, msg, metrics, {**a.timing, "batch_size": a.batch_size}, recipe)


def _provenance(prov: Provenance, device: torch.device) -> dict:
    environment(prov, device)
    return prov.to_dict()


def _worst_tokens(a, ref, ok, windows, tokenizer) -> list[dict]:
    """The tokens with the largest KL, with their text context, for the report."""
    kl = np.where(ok, a.kl, -np.inf)
    order = np.argsort(-kl, kind="stable")[:WORST_TOKENS]
    targets = windows.targets
    starts = np.concatenate([[0], np.cumsum(scored_counts(windows.windows))])
    out = []
    for i in order:
        if not np.isfinite(kl[i]):
            break
        w = int(np.searchsorted(starts, i, side="right") - 1)
        lo = max(int(starts[w]), int(i) - CONTEXT_TOKENS)
        out.append({
            "position": int(i), "kl": float(a.kl[i]),
            "context": tokenizer.decode(targets[lo:i].tolist()),
            "target": tokenizer.decode([int(targets[i])]),
            "reference_top": tokenizer.decode([int(ref.argmax[i])]),
            "test_top": tokenizer.decode([int(a.argmax[i])]),
            "p_ref": float(a.p_ref[i]), "p_test": float(a.p_test[i]),
        })
    return out
