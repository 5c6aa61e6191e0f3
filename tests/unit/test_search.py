"""Search: beam 1 equals greedy; beam search finds the exact best where exhaustive search is feasible."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import make_model, random_batch, vocab_sizes
from transduce.data.pipeline import Batch, pad
from transduce.data.vocab import BOS, EOS, PAD, UNK
from transduce.search import beam_search, greedy, max_lengths


def sources(name, b=6, seed=0):
    src_v, tgt_v = vocab_sizes(name)
    batch = random_batch(b, seed, src_v, tgt_v)
    return batch.src, batch.src_mask


def test_beam_one_equals_greedy(decoding_model_name):
    model = make_model(decoding_model_name, seed=5)
    src, mask = sources(decoding_model_name, b=8, seed=5)
    g = greedy(model, src, mask, 1.0, 3)
    b = beam_search(model, src, mask, beam=1, nbest=1, length_penalty=0.0, max_len_a=1.0, max_len_b=3)
    assert [h[0].tokens for h in g] == [h[0].tokens for h in b]
    for x, y in zip(g, b):
        assert x[0].logprob == pytest.approx(y[0].logprob, abs=1e-4)


def sequence_logprob(model, src, mask, tokens: list[int]) -> float:
    """log P(tokens </s> | src) by one teacher-forced forward pass."""
    tgt_in = torch.tensor([[BOS] + tokens])
    labels = torch.tensor([tokens + [EOS]])
    with torch.no_grad():
        logits = model(Batch(src, mask, tgt_in, labels))
    logp = torch.log_softmax(logits.float(), -1)
    return float(logp[0].gather(1, labels[0][:, None]).sum())


def test_beam_search_is_exact_on_tiny_model(decoding_model_name):
    # Target vocabulary: 4 specials + 2 symbols (+ <unk>); outputs of up to 3 symbols.
    model = make_model(decoding_model_name, seed=7, tgt_v=6)
    src_v, _ = vocab_sizes(decoding_model_name)
    src_v = 6 if src_v == 11 else src_v  # shared-embedding model has one 6-symbol vocabulary
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        src = torch.randint(4, src_v, (1, 3), generator=g)
        mask = src != PAD
        max_len = int(max_lengths(mask, 0.0, 3)[0])
        best, best_lp, all_lp = None, -math.inf, {}
        for n in range(max_len + 1):
            for seq in itertools.product([1, 4, 5], repeat=n):  # <unk> is a possible output too
                lp = sequence_logprob(model, src, mask, list(seq))
                all_lp[seq] = lp
                if lp > best_lp:
                    best, best_lp = list(seq), lp
        # Beam larger than any step's candidate count: nothing is pruned.
        hyps = beam_search(model, src, mask, beam=27, nbest=3, length_penalty=0.0, max_len_a=0.0, max_len_b=3)
        assert hyps[0][0].tokens == best
        assert hyps[0][0].logprob == pytest.approx(best_lp, abs=1e-4)
        ranked = sorted(all_lp.items(), key=lambda kv: -kv[1])[:3]
        assert [h.tokens for h in hyps[0]] == [list(s) for s, _ in ranked]


def test_length_penalty_and_limits():
    model = make_model("transformer-prenorm", seed=11)
    src, mask = sources("transformer-prenorm", b=5, seed=11)
    limits = max_lengths(mask, 0.5, 1)
    for a, b in [(greedy(model, src, mask, 0.5, 1), None),
                 (beam_search(model, src, mask, beam=4, nbest=4, max_len_a=0.5, max_len_b=1), None)]:
        for i, hyps in enumerate(a):
            assert hyps, "every source gets a hypothesis"
            for h in hyps:
                assert len(h.tokens) <= int(limits[i])
                assert EOS not in h.tokens and PAD not in h.tokens and BOS not in h.tokens
    nb = beam_search(model, src, mask, beam=4, nbest=4, length_penalty=1.0, max_len_a=0.5, max_len_b=1)
    for hyps in nb:
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:
            assert h.score == pytest.approx(h.logprob / (len(h.tokens) + 1), abs=1e-5)


def test_batched_beam_equals_one_by_one():
    model = make_model("transformer-prenorm", seed=13)
    src, mask = sources("transformer-prenorm", b=6, seed=13)
    together = beam_search(model, src, mask, beam=3, nbest=2)
    for i in range(6):
        s = int(mask[i].sum())
        alone = beam_search(model, src[i: i + 1, :s], mask[i: i + 1, :s], beam=3, nbest=2)
        assert [h.tokens for h in alone[0]] == [h.tokens for h in together[i]]


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_batch_with_finished_sources_equals_one_by_one(decoding_model_name, search):
    """Sources that finish early stay in the batch until enough have finished (search.COMPACT_AT),
    then leave it; neither changes any other source's output."""
    model = make_model(decoding_model_name, seed=17)
    src, mask = sources(decoding_model_name, b=12, seed=17)

    def run(s, m):
        if search == "greedy":
            return [h[0] for h in greedy(model, s, m, 1.0, 4)]
        return [h[0] for h in beam_search(model, s, m, beam=3, nbest=1, max_len_a=1.0, max_len_b=4)]

    together = run(src, mask)
    lengths = {len(h.tokens) for h in together}
    assert len(lengths) > 2, "the sources should finish at different steps"
    for i in range(src.shape[0]):
        s = int(mask[i].sum())
        alone = run(src[i: i + 1, :s], mask[i: i + 1, :s])[0]
        assert alone.tokens == together[i].tokens
        assert alone.logprob == pytest.approx(together[i].logprob, abs=1e-4)


def test_search_stops_where_the_positions_run_out(decoding_model_name):
    """Asked for far longer outputs than the model's positions hold, search stops at the model's
    limit (per source for single stacks, where the source takes positions too) instead of failing."""
    model = make_model(decoding_model_name, seed=3)
    src, mask = sources(decoding_model_name, b=4, seed=3)
    limit = model.max_output_len(mask)
    asked = max_lengths(mask, 30.0, 100)
    capped = max_lengths(mask, 30.0, 100, model)
    if limit is None:  # recurrent decoders have no positions
        assert torch.equal(capped, asked)
        return
    assert (capped < asked).all() and torch.equal(capped, torch.minimum(asked, limit))
    for hyps in (greedy(model, src, mask, 30.0, 100),
                 beam_search(model, src, mask, beam=2, nbest=1, length_penalty=0.0, max_len_a=30.0, max_len_b=100)):
        assert all(len(h[0].tokens) <= int(capped[i]) for i, h in enumerate(hyps))


def test_greedy_pick_kernel_is_the_python_bookkeeping():
    # one greedy step's bookkeeping on the kernels against search.py's ops: the most probable token
    # other than pad and bos (the first of ties), eos at a row's last step, log-probabilities over
    # the whole vocabulary, rows finishing only while live
    from transduce import kernels
    from transduce.search import _log_probs

    g = torch.Generator().manual_seed(0)
    n, v = 40, 11
    logits = torch.randn(n, v, generator=g)
    logits[0, PAD] = logits[1, BOS] = 50.0  # never chosen
    logits[2, 3] = logits[2, 5] = 40.0      # a tie: the first
    logits[3, EOS] = logits[4, EOS] = 40.0  # eos chosen: row 3 live, row 4 already finished
    stop = torch.randint(3, 6, (n,), generator=g)
    live = torch.rand(n, generator=g) > 0.2
    live[3], live[4] = True, False
    logprob = torch.randn(n, generator=g)
    t = 4
    logp = _log_probs(logits)
    want = logp.argmax(-1)
    want[stop == t] = EOS
    want_lp = logprob + logp.gather(1, want[:, None])[:, 0]
    want_done = ((want == EOS) & live).nonzero()[:, 0]
    want_live = live & ~(want == EOS)
    live_k, lp_k = live.clone(), logprob.clone()
    best, done, n_live = kernels.ops().greedy_pick(logits, stop, t, live_k, lp_k, PAD, BOS, EOS)
    assert torch.equal(best, want) and best[0] != PAD and best[1] != BOS and best[2] == 3
    assert torch.equal(done, want_done) and 3 in done.tolist() and 4 not in done.tolist()
    assert torch.equal(live_k, want_live) and n_live == int(want_live.sum())
    torch.testing.assert_close(lp_k, want_lp, rtol=1e-6, atol=1e-5)


def test_greedy_on_the_kernels_equals_greedy_on_torch_ops(decoding_model_name, monkeypatch):
    import transduce.search as S

    model = make_model(decoding_model_name, seed=7)
    src, mask = sources(decoding_model_name, b=9, seed=7)
    fast = greedy(model, src, mask, 1.5, 4)
    calls = []
    real = S.kernels.ops
    monkeypatch.setattr(S.kernels, "ops", lambda: calls.append(1) or None)
    slow = greedy(model, src, mask, 1.5, 4)
    monkeypatch.setattr(S.kernels, "ops", real)
    assert calls  # the second run took the torch ops' path
    assert [h[0].tokens for h in fast] == [h[0].tokens for h in slow]
    for x, y in zip(fast, slow):
        assert x[0].logprob == pytest.approx(y[0].logprob, abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_on_the_kernels_equals_beam_search_on_torch_ops(decoding_model_name, monkeypatch,
                                                                     length_penalty):
    # beam_advance (the step's ranking, finished hypotheses, stopping, in one call) against the
    # torch ops' path: the same n-best lists, sources finishing at different steps
    import transduce.search as S

    model = make_model(decoding_model_name, seed=8)
    src, mask = sources(decoding_model_name, b=9, seed=8)
    run = lambda: beam_search(model, src, mask, beam=4, nbest=3, length_penalty=length_penalty,
                              max_len_a=1.5, max_len_b=3)
    calls = []
    real = S.kernels.ops
    monkeypatch.setattr(S.kernels, "ops", lambda: calls.append(1) or real())
    fast = run()
    assert calls and real() is not None
    monkeypatch.setattr(S.kernels, "ops", lambda: None)
    slow = run()
    assert [[h.tokens for h in n] for n in fast] == [[h.tokens for h in n] for n in slow]
    for x, y in zip(fast, slow):
        assert [h.score for h in x] == pytest.approx([h.score for h in y], abs=1e-4)
        assert len(x) == 3


def test_beam_advance_skips_missing_beams_and_impossible_tokens():
    # scores of -inf (no beam yet) and logits of -inf (a token a model rules out) are never chosen;
    # with fewer finite continuations than beams, the rest are -inf
    from transduce import kernels

    n, k, v = 2, 3, 6
    logits = torch.zeros(n * k, v)
    logits[:, 2:] = float("-inf")
    logits[:, UNK] = 0.0                    # the only possible token: pad, bos, eos and the rest ruled out
    scores = torch.tensor([[0.0, float("-inf"), float("-inf")]] * n)
    live, count, best = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), torch.full((n, k), float("-inf"))
    stop = torch.full((n,), 10)
    new_scores, tok, rows, ended, raw, n_live = kernels.ops().beam_advance(
        logits, scores, stop, 0, live, count, best, 1, 1.0, PAD, BOS, EOS)
    allowed = {UNK}
    assert torch.isfinite(new_scores[:, 0]).all() and set(tok[:, 0].tolist()) <= allowed
    assert torch.isinf(new_scores[:, len(allowed):]).all()  # fewer continuations than beams
    assert (rows.view(n, k)[:, 0] == torch.arange(n) * k).all()  # they continue beam 0, the only one
    assert ended.shape == (0, 3) and n_live == n and count.tolist() == [0, 0]


def test_search_under_controls_at_beam_one_is_greedy(decoding_model_name):
    # with controls, beam 1 runs through beam search's step (one body for every control): the same
    # outputs as greedy, and each token's log-probability
    from transduce.config import DecodeConfig
    from transduce.controls import Controls
    from transduce.search import search

    model = make_model(decoding_model_name, seed=21)
    src, mask = sources(decoding_model_name, b=6, seed=21)
    cfg = DecodeConfig(beam=1, nbest=1, max_len_a=1.0, max_len_b=4, length_penalty=0.0)
    plain = search(model, src, mask, cfg)
    scored = search(model, src, mask, cfg, controls=Controls(token_scores=True))
    assert [h[0].tokens for h in plain] == [h[0].tokens for h in scored]
    for x, y in zip(plain, scored):
        assert sum(y[0].token_logprobs) == pytest.approx(x[0].logprob, abs=1e-4)
