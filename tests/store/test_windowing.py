"""`--windowing lm-eval` against lm-eval's own HFLM.loglikelihood_rolling, and `stream` unchanged.

Tolerance of the log-likelihood comparison: lm-eval takes a float32 log_softmax of the model's
full forward (a padded batch) and sums each window's scored log-probabilities in float32;
evalsuite takes a float64 log-softmax of the float32 logits of its decoder-then-chunked-head path
and sums in float64. The logits agree to the rounding of matmuls of other shapes, so each token's
log-probability agrees to a few float32 ulps, and a window's float32 sum of up to L = 24 terms
adds rounding of the order of sqrt(L) ~ 5 ulps of the sum (~6e-7 relative). Measured on these
documents: at most 1.3e-7 relative (1.8e-5 nats on sums of 42 to 544 nats); rtol 1e-6 allows
eight times that and is still far below anything a windowing difference moves (one token is ~6 nats).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import run_config, run_pair
from tiny import corpus_text

from evalsuite.model.batching import run_pass
from evalsuite.model.forward import Scorer, scored_positions
from evalsuite.model.loading import load_tokenizer
from evalsuite.model.precision import DTYPES
from evalsuite.store import rolling
from evalsuite.store.corpus import CorpusSpec, load_texts, tokenize
from evalsuite.store.digests import tokens_digest
from evalsuite.store.windows import WindowList, scored_counts

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
lm_eval_utils = pytest.importorskip("lm_eval.utils")

SEQ = 24  # lm-eval's max_length


def _hflm(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return lm_eval_hf.HFLM(pretrained=model, tokenizer=load_tokenizer(str(model_dir)), max_length=SEQ,
                           batch_size=3, device="cpu")


def _documents(lm) -> list[str]:
    """Documents of lm-eval token lengths exactly 7 (< L), L, L + 1, 2L and 3L + 5 (> L: the last window
    scores only some of its targets), cut from corpus lines; and one that starts with the prefix token's
    text (lm-eval encodes it without special tokens)."""
    lines = [line for line in corpus_text().splitlines() if len(line) > 200]
    docs = []
    for n in (7, SEQ, SEQ + 1, 2 * SEQ, 3 * SEQ + 5):
        docs.append(next(line[:k] for line in lines for k in range(1, 200) if len(lm.tok_encode(line[:k])) == n))
    docs.append(lm.tokenizer.decode(lm.prefix_token_id) + lines[-1][:40])
    return docs


def _lm_eval_windows(lm, docs):
    """lm-eval's (input ids, scored ids) of every window, in order, as loglikelihood_rolling makes them."""
    out = []
    for d in docs:
        pairs = lm_eval_utils.get_rolling_token_windows(lm.tok_encode(d), lm.prefix_token_id, lm.max_length, 1)
        for ctx, cont in map(lm_eval_utils.make_disjoint_window, pairs):
            out.append(((ctx + cont)[-(lm.max_length + 1):][:-1], cont))
    return out


def _bos_adding_copy(src, dst):
    """The tiny checkpoint with a tokenizer that adds BOS to every encoding, as Gemma's and Llama's do:
    lm-eval then feeds BOS, BOS and scores the second BOS."""
    from tokenizers.processors import TemplateProcessing

    shutil.copytree(src, dst)
    tok = load_tokenizer(str(dst))
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.save_pretrained(dst)
    assert load_tokenizer(str(dst)).encode("x")[0] == tok.bos_token_id
    return dst


@pytest.fixture(params=["bos", "bos-added", "no-bos"])
def checkpoint(request, tiny_llama, tiny_qwen_no_bos, tmp_path):
    if request.param == "bos-added":
        return _bos_adding_copy(tiny_llama, tmp_path / "bos-added")
    return tiny_llama if request.param == "bos" else tiny_qwen_no_bos


def test_windows_are_lm_evals(checkpoint):
    lm = _hflm(checkpoint)
    docs = _documents(lm)
    w = rolling.tokenize(docs, lm.tokenizer, SEQ)
    theirs = _lm_eval_windows(lm, docs)
    assert len(w.windows) == len(theirs)
    for window, unscored, (inputs, scored) in zip(w.windows, w.windows.unscored, theirs, strict=True):
        assert window[:-1].tolist() == inputs and window[1 + unscored:].tolist() == scored
    assert [len(lm.tok_encode(d)) for d in docs[:5]] == [7, SEQ, SEQ + 1, 2 * SEQ, 3 * SEQ + 5]
    assert max(w.windows.unscored) > 0  # the last-window case is exercised
    assert w.targets.tolist() == [t for d in docs for t in lm.tok_encode(d)]
    prefix = lm.prefix_token_id
    if lm.tok_encode(docs[0])[0] == prefix:  # a BOS-adding tokenizer: lm-eval scores BOS after BOS
        assert w.windows[0][:2].tolist() == [prefix, prefix]
    assert w.context == ("eos" if lm.tokenizer.bos_token_id is None else "bos")
    per_doc_bytes = np.bincount(w.documents, weights=w.target_bytes, minlength=len(docs))
    assert per_doc_bytes.tolist() == [len(d.encode("utf-8")) for d in docs]  # lm-eval's count_bytes


def test_reference_nll_equals_lm_evals_loglikelihood_rolling(checkpoint, tmp_path):
    from lm_eval.api.instance import Instance

    lm = _hflm(checkpoint)
    docs = _documents(lm)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs), encoding="utf-8")
    cfg = run_config(tmp_path / "out", model=str(checkpoint), corpus=CorpusSpec(str(corpus)), seq_len=SEQ,
                     max_tokens=None, windowing="lm-eval", dtypes=(DTYPES["bf16"],), numerics=False, batch_size=3)
    results, per_token = run_pair(cfg, str(checkpoint))
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i) for i, d in enumerate(docs)]
    theirs = np.array(lm.loglikelihood_rolling(requests, disable_tqdm=True))  # (D,) sums of log-probabilities
    ours = -np.bincount(per_token["document"], weights=per_token["fp32/nll"], minlength=len(docs))  # (D,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    assert per_token["targets"].tolist() == [t for d in docs for t in lm.tok_encode(d)]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    corpus_info = results.corpus
    assert corpus_info["windowing"] == "lm-eval" and corpus_info["n_scored_bytes"] == n_bytes
    assert corpus_info["n_scored_documents"] == len(docs)
    assert corpus_info["n_scored_words"] == sum(len(lm_eval_utils.re.split(r"\s+", d)) for d in docs)
    bpb = -theirs.sum() / n_bytes / np.log(2)  # lm-eval's bits_per_byte aggregation
    assert results.dtypes["fp32"].metrics["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
    assert results.config["windowing"] == "lm-eval"


def test_max_tokens_takes_whole_documents_then_cuts_the_last(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    docs = [line[:60] for line in corpus_text().splitlines() if len(line) > 60][:4]
    lengths = [len(tok.encode(d)) for d in docs]
    cap = lengths[0] + lengths[1] // 2
    w = rolling.tokenize(docs, tok, SEQ, max_tokens=cap)
    assert w.n_tokens == cap and set(w.documents.tolist()) == {0, 1}
    assert w.targets.tolist() == tok.encode(docs[0]) + tok.encode(docs[1])[: cap - lengths[0]]


def test_a_tokenizer_without_bos_or_eos_is_refused():
    from evalsuite.errors import CorpusError

    class Neither:
        bos_token_id = eos_token_id = None

    with pytest.raises(CorpusError, match="BOS or EOS"):
        rolling.tokenize(["x"], Neither(), SEQ)


def test_scored_positions_against_a_mask():
    rng = np.random.default_rng(0)
    unscored = rng.integers(0, 9, size=5)  # (B,)
    mask = np.arange(9)[None, :] >= unscored[:, None]  # (B, T) scored targets
    got = scored_positions(torch.from_numpy(unscored), 9, int(mask.sum()))
    assert got.tolist() == np.flatnonzero(mask.reshape(-1)).tolist()


def test_chunks_yield_only_scored_positions(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    scorer = Scorer(model, torch.device("cpu"))
    ids = torch.randint(0, 300, (3, SEQ + 1), generator=torch.Generator().manual_seed(0))
    unscored = torch.tensor([0, 5, SEQ - 1])
    n = int((SEQ - unscored).sum())
    full = torch.cat([c[1] for c in scorer.chunks(ids)]).view(3, SEQ, -1)  # (B, T, V)
    got = list(scorer.chunks(ids, (unscored, n)))
    logits, targets = torch.cat([c[1] for c in got]), torch.cat([c[2] for c in got])  # (n, V), (n,)
    want = torch.cat([full[b, u:] for b, u in enumerate(unscored.tolist())])
    assert targets.tolist() == torch.cat([ids[b, 1 + u:] for b, u in enumerate(unscored.tolist())]).tolist()
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)


def test_stream_windowing_is_unchanged(tiny_llama, tiny_qwen_no_bos):
    """The default windowing's tokens and bytes, as digests taken before the lm-eval windowing existed."""
    texts, _ = load_texts(CorpusSpec())
    w = tokenize(texts, load_tokenizer(str(tiny_llama)), 64, 700)
    assert type(w.windows) is list and w.windowing == "stream" and w.documents is None
    assert tokens_digest(w.windows) == "d2d33c923a02c55f13301dd27e355be1e97ba46e35a6f3214ab9c70e09a1e3f7"
    assert _sha(w.target_bytes) == "dd8c15059e7bf467a06800b2854b88886eb37e419fee2c4e5c67ee6f79ae5523"
    w = tokenize(texts, load_tokenizer(str(tiny_qwen_no_bos)), 64)
    assert tokens_digest(w.windows) == "04c5f11c6dd2510b4f53b05c79cd6385fc76850efca8cd8467c7f729d3a113e6"
    assert _sha(w.target_bytes) == "d46d154abf5a32f618842c380c14aa86f585277ec6b13a62d9606b4d16fdce80"
    assert tokens_digest(WindowList(w.windows)) != tokens_digest(w.windows)  # lm-eval windows hash apart


def test_a_window_list_with_nothing_unscored_scores_as_a_plain_list(tiny_llama):
    """run_pass skips no selection where no window of a batch has unscored targets: the same bits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    scorer = Scorer(model, torch.device("cpu"))
    texts, _ = load_texts(CorpusSpec())
    windows = tokenize(texts, load_tokenizer(str(tiny_llama)), 32, 200).windows

    def nll(ws):
        out = {}
        run_pass(scorer, ws, 2, lambda pos, logits, tgt: out.__setitem__(pos, logits.clone()), "t", False)
        return torch.cat([out[k] for k in sorted(out)])

    assert torch.equal(nll(windows), nll(WindowList(windows)))
    assert scored_counts(WindowList(windows, [0] * (len(windows) - 1) + [3])).sum() == 200 - 3


def _sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(a.tobytes()).hexdigest()


def test_data_parallel_parts_add_up_to_the_whole(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    docs = [line[:k] for line, k in zip(corpus_text().splitlines()[:6], (5, 30, 80, 12, 60, 9), strict=True)]
    whole = rolling.tokenize(docs, tok, SEQ)
    parts = [whole.part(a, b) for a, b in ((0, 2), (2, 5), (5, len(whole.windows)))]
    assert sum(p.n_tokens for p in parts) == whole.n_tokens
    for name in ("targets", "target_bytes", "documents"):
        assert np.concatenate([getattr(p, name) for p in parts]).tolist() == getattr(whole, name).tolist()
