"""Greedy decoding against transformers' own `generate`, teacher-forced scoring against a plain forward,
a planted near-tie, batch composition on CPU, non-finite logits.

On a tiny Llama trained to repeat four corpus lines and stop at EOS (tests/tiny.py), so prompts from
those lines end at EOS and other prompts run to the token limit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny import corpus_text

from evalsuite.metrics.generation import NEAR_TIE, compare
from evalsuite.model.decode import eos_ids, greedy, pad_id, teacher_forced

CPU = torch.device("cpu")
STEPS = 20


@pytest.fixture(scope="module")
def trained(tiny_trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_trained)
    model = AutoModelForCausalLM.from_pretrained(tiny_trained, dtype=torch.float32).eval()
    lines = [line for line in corpus_text().splitlines() if line.strip()]
    # four prefixes of trained lines (they end at EOS) and two of other lines (they run to the limit), of
    # different lengths so the batch is left-padded
    cuts = [(0, 3), (1, 6), (2, 2), (3, 4), (4, 20), (6, 9)]
    prompts = [[tok.bos_token_id] + tok(lines[i][:n], add_special_tokens=False).input_ids for i, n in cuts]
    return model, tok, prompts


def _generate(model, prompts, pad, eos, steps=STEPS):
    """transformers' greedy decoding of the same left-padded batch, with its raw logits per step."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model = copy.copy(model)
    model.generation_config = copy.deepcopy(model.generation_config)
    model.generation_config.eos_token_id = list(eos) or None
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps, pad_token_id=pad,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, width:].numpy(), np.stack([x.double().numpy() for x in out.logits], axis=1)  # (B, S, V)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_greedy_equals_generate(trained, stop_at_eos):
    model, tok, prompts = trained
    eos = eos_ids(model, tok) if stop_at_eos else ()
    pad = pad_id(tok, eos_ids(model, tok))
    d = greedy(model, prompts, range(len(prompts)), len(prompts), STEPS, eos, pad, CPU)
    seqs, logits = _generate(model, prompts, pad, eos)
    lengths = [len(t) for t in d.tokens]
    if stop_at_eos:
        assert min(lengths) < STEPS and max(lengths) == STEPS  # both ends: EOS and the token limit
        assert all(int(t[-1]) in eos for t in d.tokens if len(t) < STEPS)
    else:
        assert lengths == [STEPS] * len(prompts)
    lp = _log_softmax(logits)  # (B, S, V) float64, from generate's own float32 logits
    for i, t in enumerate(d.tokens):
        assert t.tolist() == seqs[i, : len(t)].tolist()  # token for token
        assert (seqs[i, len(t):] == pad).all()  # after its EOS generate only pads
        for s in range(len(t)):
            order = np.argsort(-logits[i, s], kind="stable")
            assert d.topk_ids[i, s].tolist() == order[:5].tolist()
            assert d.topk_logprobs[i, s] == pytest.approx(lp[i, s, order[:5]], abs=1e-12)
            assert d.margins[i, s] == pytest.approx(logits[i, s, order[0]] - logits[i, s, order[1]], abs=1e-12)
        assert np.isnan(d.margins[i, len(t):]).all()
    assert (d.first_nonfinite == -1).all() and d.n_tokens == sum(lengths)


def test_teacher_forced_against_plain_forward(trained):
    model, tok, prompts = trained
    eos = eos_ids(model, tok)
    d = greedy(model, prompts, range(len(prompts)), 3, STEPS, eos, pad_id(tok, eos), CPU)
    pairs = [(p, t.tolist()) for p, t in zip(prompts, d.tokens, strict=True)] + [(prompts[0], [])]
    got = teacher_forced(model, pairs, 4, CPU)
    assert got[-1].size == 0
    for (p, c), lp in zip(pairs[:-1], got, strict=False):
        with torch.no_grad():  # one unpadded sequence, the whole vocabulary, log-softmax in numpy
            logits = model(input_ids=torch.tensor([p + c[:-1]])).logits[0, len(p) - 1 :].double().numpy()
        want = _log_softmax(logits)[np.arange(len(c)), c]
        assert lp == pytest.approx(want, abs=2e-5)  # batching on CPU moves float32 logits by ~1e-5
    for i, lp in enumerate(got[:-1]):  # the chosen tokens were the argmax: their log-prob is the top-1
        assert lp == pytest.approx(d.topk_logprobs[i, : len(lp), 0], abs=2e-5)


def _with_bias(model, bias: torch.Tensor):
    """The model with an LM head bias added (Llama's head has none): a planted change to some logits."""
    m = copy.deepcopy(model)
    head = torch.nn.Linear(m.lm_head.in_features, m.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.copy_(bias)
    m.lm_head = head
    return m


def _plant_site(model, prompt, cont, eps):
    """(step t, token b, bias) such that adding `bias` to token b's logit leaves b eps below the top
    token at step t and at least 2 eps below it at every earlier step."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + cont.tolist()])).logits[0, len(prompt) - 1 :].double()
    for t in range(len(cont) - 1, 1, -1):
        top2 = logits[t].topk(2)
        b = int(top2.indices[1])
        delta = float(top2.values[0] - top2.values[1]) - eps
        if all(float(logits[s, b]) + delta < float(logits[s].max()) - 3 * eps for s in range(t)):
            return t, b, delta
    raise AssertionError("no step to plant a tie at")


def test_planted_near_tie_moves_the_first_divergence(trained):
    model, tok, prompts = trained
    eos, eps, vocab = eos_ids(model, tok), 1e-3, model.lm_head.out_features
    pad, prompt = pad_id(tok, eos), prompts[4]  # an untrained prompt: it runs to the limit
    base = greedy(model, [prompt], [0], 1, STEPS, eos, pad, CPU)
    t, b, delta = _plant_site(model, prompt, base.tokens[0], eps)
    ref_bias, test_bias = torch.zeros(vocab), torch.zeros(vocab)
    ref_bias[b], test_bias[b] = delta, delta + 2 * eps  # b just below the top at t in the reference, just above in the test
    ref = greedy(_with_bias(model, ref_bias), [prompt], [0], 1, STEPS, eos, pad, CPU)
    test = greedy(_with_bias(model, test_bias), [prompt], [0], 1, STEPS, eos, pad, CPU)
    near_bias = ref_bias.clone()
    near_bias[b] = delta + 0.5 * eps  # closer still, but b stays below the top at t
    near = greedy(_with_bias(model, near_bias), [prompt], [0], 1, STEPS, eos, pad, CPU)
    assert ref.tokens[0][: t + 1].tolist() == base.tokens[0][: t + 1].tolist()  # the plant changes nothing up to t
    assert test.tokens[0][t] == b != ref.tokens[0][t]
    c = compare(ref.tokens, ref.topk_ids, ref.margins, ref.first_nonfinite, test.tokens, test.first_nonfinite, STEPS)
    assert c.first_div[0] == t and c.margin[0] == pytest.approx(eps, abs=1e-4) and c.margin[0] < NEAR_TIE
    assert c.in_topk[0] == 1.0 and ref.topk_ids[0, t, 1] == b  # the test's token was the reference's runner-up
    control = compare(ref.tokens, ref.topk_ids, ref.margins, ref.first_nonfinite, near.tokens, near.first_nonfinite,
                      STEPS)
    assert control.first_div[0] > t  # a change that does not cross the tie does not part there


def test_batch_composition_on_cpu(trained):
    """The noise floor's two compositions on CPU: not bit-exact (another padded width and batch size
    change float32 reductions: log-probs moved by up to ~1e-5 here, 2e-5 on Gemma 3 270M), so
    identical tokens follow only where the reference's margins are far above that; they are here."""
    model, tok, prompts = trained
    eos = eos_ids(model, tok)
    pad, n = pad_id(tok, eos), len(prompts)
    a = greedy(model, prompts, range(n), n, STEPS, eos, pad, CPU)
    b = greedy(model, prompts, list(range(n))[::-1], n // 2, STEPS, eos, pad, CPU)
    moved = float(np.nanmax(np.abs(a.topk_logprobs - b.topk_logprobs)))
    assert moved < 1e-4 and float(np.nanmin(a.margins)) > 100 * moved
    assert [t.tolist() for t in a.tokens] == [t.tolist() for t in b.tokens]
    assert b.batch_size == n // 2


def test_nonfinite_logits_are_marked(trained):
    model, tok, prompts = trained
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight[5] = float("inf")  # every logit row now holds an inf or NaN
    eos = eos_ids(model, tok)
    d = greedy(broken, prompts, range(len(prompts)), 3, 4, eos, pad_id(tok, eos), CPU)
    assert (d.first_nonfinite == 0).all()
    ref = greedy(model, prompts, range(len(prompts)), 3, 4, eos, pad_id(tok, eos), CPU)
    c = compare(ref.tokens, ref.topk_ids, ref.margins, ref.first_nonfinite, d.tokens, d.first_nonfinite, 4)
    assert (c.first_div == 0).all() and c.nonfinite.all() and (c.in_topk == 0).all()
