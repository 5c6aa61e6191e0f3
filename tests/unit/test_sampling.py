"""Sampling and forced prefixes: exact filtering, seeds, and the limits where sampling is greedy."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_model, random_batch, vocab_sizes
from transduce.data.pipeline import Batch
from transduce.data.vocab import BOS, EOS, PAD
from transduce.search import ForcedPrefix, beam_search, filter_logits, greedy, sample

FAMILIES = ["transformer-prenorm", "gru-luong-dot", "decoder-only", "prefix-lm"]


def sources(name, b=6, seed=0):
    src_v, tgt_v = vocab_sizes(name)
    batch = random_batch(b, seed, src_v, tgt_v)
    return batch.src, batch.src_mask


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero()[:, 0].tolist() for row in logits]


# Probabilities by token id. Row 1 ranks 1 (.5), 3 (.3), 2 (.15), 0 (.05): the mass before each
# in rank order is 0, .5, .8, .95. Row 2 ranks 0 (.6), 1 (.2), 2 (.15), 3 (.05): 0, .6, .8, .95.
PROBS = torch.tensor([[0.05, 0.5, 0.15, 0.3],
                      [0.6, 0.2, 0.15, 0.05]])


@pytest.mark.parametrize("top_p,expected", [
    (1.0, [[0, 1, 2, 3], [0, 1, 2, 3]]),
    (0.97, [[0, 1, 2, 3], [0, 1, 2, 3]]),
    (0.9, [[1, 2, 3], [0, 1, 2]]),
    (0.7, [[1, 3], [0, 1]]),
    (0.55, [[1, 3], [0]]),
    (0.4, [[1], [0]]),
    (1e-6, [[1], [0]]),                  # the most probable token always stays
])
def test_top_p_keeps_the_nucleus(top_p, expected):
    out = filter_logits(PROBS.log(), top_p=top_p)
    assert kept(out) == expected
    finite = torch.isfinite(out)
    torch.testing.assert_close(out[finite], PROBS.log()[finite])  # kept logits unchanged


def test_top_k_and_both():
    logits = PROBS.log()
    assert kept(filter_logits(logits, top_k=2))[0] == [1, 3]
    assert kept(filter_logits(logits, top_k=1)) == [[1], [0]]
    assert kept(filter_logits(logits, top_k=0)) == [[0, 1, 2, 3]] * 2
    assert kept(filter_logits(logits, top_k=9)) == [[0, 1, 2, 3]] * 2
    # top_k first, then the nucleus of what is left, renormalised: 1 -> .5/.95 = .526 is the
    # mass before 3, so top_p .52 drops 3 after top_k 3 but not alone (.5 before it).
    assert kept(filter_logits(logits, top_p=0.52))[0] == [1, 3]
    assert kept(filter_logits(logits, top_k=3, top_p=0.52))[0] == [1]
    assert kept(filter_logits(logits, top_k=3, top_p=0.7))[0] == [1, 3]


class FixedModel:
    """Stub decoder: the same next-token distribution at every step, whatever the input."""

    def __init__(self, probs: list[float]):
        self.logits = torch.tensor(probs).log()

    def encode(self, src, src_mask):
        return None

    def init_state(self, memory, beam, max_len, record_attention=False):
        return None

    def step(self, tokens, state):
        return self.logits.expand(tokens.shape[0], -1), state

    def reorder_state(self, state, rows, batch=None):
        return state


def first_token_counts(model, n, **kw) -> torch.Tensor:
    src = torch.full((n, 1), 4)
    hyps = sample(model, src, src > 0, 0.0, 1, generator=torch.Generator().manual_seed(0), **kw)
    firsts = torch.tensor([h[0].tokens[0] if h[0].tokens else EOS for h in hyps])
    return torch.bincount(firsts, minlength=8).float() / n


def test_sampling_follows_the_filtered_distribution():
    # ids 0..3 are specials; <pad> and <s> are never drawn; </s> (3) and 4..7 are.
    probs = [0.0, 0.0, 0.0, 0.1, 0.4, 0.3, 0.15, 0.05]
    model = FixedModel([max(p, 1e-30) for p in probs])
    freq = first_token_counts(model, 4000)
    torch.testing.assert_close(freq, torch.tensor(probs), atol=0.03, rtol=0)
    freq = first_token_counts(model, 4000, top_k=2)
    torch.testing.assert_close(freq, torch.tensor([0, 0, 0, 0, 4 / 7, 3 / 7, 0, 0]), atol=0.03, rtol=0)
    # Temperature 2 flattens: p ** (1/2), renormalised.
    flat = torch.tensor(probs).sqrt()
    freq = first_token_counts(model, 4000, temperature=2.0)
    torch.testing.assert_close(freq, flat / flat.sum(), atol=0.03, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_same_samples(name):
    model = make_model(name, seed=5)
    src, mask = sources(name, b=8, seed=5)

    def draw(seed):
        hyps = sample(model, src, mask, 1.0, 4, generator=torch.Generator().manual_seed(seed))
        return [h[0].tokens for h in hyps]

    assert draw(1) == draw(1)
    assert any(draw(s) != draw(1) for s in (2, 3, 4))


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_limits_equal_greedy(name):
    model = make_model(name, seed=6)
    src, mask = sources(name, b=8, seed=6)
    g = greedy(model, src, mask, 1.0, 3)
    gen = torch.Generator().manual_seed(0)
    for kw in [dict(top_k=1), dict(temperature=0.0), dict(temperature=1e-4), dict(top_p=1e-6)]:
        s = sample(model, src, mask, 1.0, 3, generator=gen, **kw)
        assert [h[0].tokens for h in s] == [h[0].tokens for h in g], kw
        for x, y in zip(s, g):
            assert x[0].logprob == pytest.approx(y[0].logprob, abs=1e-4)


def test_bad_sampling_options():
    model = make_model("decoder-only")
    src, mask = sources("decoder-only", b=1)
    for kw in [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError):
            sample(model, src, mask, **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_forced_prefix_continues_the_teacher_forced_sequence(name):
    """Greedy after a forced prefix = greedy on the full forward pass that reads the prefix."""
    model = make_model(name, seed=8)
    src, mask = sources(name, b=1, seed=8)
    prefix = [5, 4, 6]
    hyp = greedy(ForcedPrefix(model, prefix), src, mask, 0.0, 4)[0][0]
    seq = prefix + hyp.tokens
    tgt_in = torch.tensor([[BOS] + seq])
    labels = torch.tensor([seq + [EOS]])
    with torch.no_grad():
        logp = torch.log_softmax(model(Batch(src, mask, tgt_in, labels)).float(), -1)[0]
    logp[:, [PAD, BOS]] = -math.inf                  # search never outputs these
    continuation = logp[len(prefix):]
    choices = continuation.argmax(-1).tolist()
    assert choices[: len(hyp.tokens)] == hyp.tokens
    if len(hyp.tokens) < 4:                          # ended by choice, not by the length limit
        assert choices[len(hyp.tokens)] == EOS
    expected = float(continuation.gather(1, labels[0, len(prefix):, None]).sum())
    assert hyp.logprob == pytest.approx(expected, abs=1e-4)
    # Beam 1 agrees, and beam search keeps the prefix out of its hypotheses too.
    b = beam_search(ForcedPrefix(model, prefix), src, mask, beam=1, nbest=1, length_penalty=0.0,
                    max_len_a=0.0, max_len_b=4)
    assert b[0][0].tokens == hyp.tokens
