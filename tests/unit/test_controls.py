"""Decoding controls (transduce/controls.py) through the shared search, on every family and engine:
constraints always met (and the best constrained output where exhaustive search is feasible),
no repeated n-grams, minimum lengths, prefixes kept verbatim, banned phrases absent, the kernel
engine's outputs the torch engine's, an ensemble under constraints, the CLI on a toy run."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from conftest import fake_run, make_engine, make_model, member, random_batch, token_logprobs, vocab_sizes
from transduce.config import DecodeConfig
from transduce.controls import (Controls, ConstraintTracker, bank_order, ban_sequences, controls_for, eos_bonus,
                                force, min_length, no_repeat_ngram, repetition_penalty)
from transduce.data.vocab import EOS, PAD
from transduce.search import Ensemble, beam_search, max_lengths, sample, search

NEG = float("-inf")


def sources(name, b=5, seed=0):
    src_v, tgt_v = vocab_sizes(name)
    batch = random_batch(b, seed, src_v, tgt_v)
    return batch.src, batch.src_mask


def contains(seq: list[int], phrase: list[int]) -> bool:
    n = len(phrase)
    return any(seq[i: i + n] == phrase for i in range(len(seq) - n + 1))


def ngrams(seq: list[int], n: int) -> list[tuple]:
    return [tuple(seq[i: i + n]) for i in range(len(seq) - n + 1)]


def beam(model, src, mask, controls, k=4, nbest=3, b=6, lp=1.0):
    return beam_search(model, src, mask, beam=k, nbest=nbest, length_penalty=lp, max_len_a=1.0, max_len_b=b,
                       controls=controls)


# ---------------------------------------------------------------------------
# The processors, exactly
# ---------------------------------------------------------------------------

def test_processors_on_one_step():
    logp = torch.log_softmax(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), -1)
    hist = torch.tensor([[4, 5, 4, 6], [7, 7, 7, 5]])
    out = min_length(logp.clone(), 3, 4)
    assert torch.isinf(out[:, EOS]).all() and torch.equal(out[:, 4:], logp[:, 4:])
    assert torch.equal(min_length(logp.clone(), 4, 4), logp)
    # bigrams seen: row 0 (4,5) (5,4) (4,6); ends with 6: nothing follows 6 -> no ban. Trigrams of row 1:
    # (7,7,7) (7,7,5); ends with 7,5: nothing banned; bigram size 2 on row 1: ends 5 -> none
    assert torch.equal(no_repeat_ngram(logp.clone(), hist, 2), logp)
    h2 = torch.tensor([[4, 5, 6, 4], [7, 7, 5, 7]])   # ends with 4: (4,5) seen -> 5 banned; ends 7: (7,7), (7,5)
    out = no_repeat_ngram(logp.clone(), h2, 2)
    assert kept_inf(out) == [[5], [5, 7]]
    out = no_repeat_ngram(logp.clone(), h2, 1)      # unigrams: every written token
    assert kept_inf(out) == [[4, 5, 6], [5, 7]]
    out = repetition_penalty(logp.clone(), hist, 2.0)
    assert out[0, 4] == pytest.approx(2 * logp[0, 4]) and out[0, 7] == logp[0, 7] and out[1, 7] == 2 * logp[1, 7]
    out = ban_sequences(logp.clone(), h2, [[6], [7, 5], [5, 6, 4, 4]])
    assert kept_inf(out) == [[4, 6], [5, 6]]        # 6 always; row 1 ends with 7: 5; row 0 with 5 6 4: 4
    out = ban_sequences(logp.clone(), h2, [[5, 6, 4, 4]])
    assert kept_inf(out) == [[4], []]
    out = eos_bonus(logp.clone(), -1.5)
    assert out[0, EOS] == pytest.approx(logp[0, EOS] - 1.5)
    out = force(logp.clone(), logp, torch.tensor([6, -1]))
    assert kept_finite(out[:1]) == [[6]] and out[0, 6] == logp[0, 6] and torch.equal(out[1], logp[1])


def kept_inf(logp):
    return [torch.isinf(r).nonzero()[:, 0].tolist() for r in logp]


def kept_finite(logp):
    return [torch.isfinite(r).nonzero()[:, 0].tolist() for r in logp]


def test_constraint_tracker_banks_and_breaks():
    # one source, phrases [5 6] and [7]; beam 1
    tr = ConstraintTracker([[[5, 6], [7]]], 1, ordered=False)
    assert tr.n_banks == 4
    alive = torch.tensor([0])
    banks = []
    for tok in (5, 6, 4, 5, 7):
        st, bank = tr.advance(alive, torch.zeros(1, 1, dtype=torch.long), torch.tensor([[tok]]))
        tr.take(st, torch.zeros(1, 1, dtype=torch.long))
        banks.append(int(bank))
    # 5: [5 6] in progress (1); 6: met (2); 4: (2); 5: a met phrase does not start again (2); 7: [7] met (3)
    assert banks == [1, 2, 2, 2, 3] and bool(tr.can_end().all())
    ordered = ConstraintTracker([[[7], [5]]], 1, ordered=True)
    for tok in (5, 7):
        st, bank = ordered.advance(alive, torch.zeros(1, 1, dtype=torch.long), torch.tensor([[tok]]))
        ordered.take(st, torch.zeros(1, 1, dtype=torch.long))
    assert int(bank) == 1 and not bool(ordered.can_end().all())  # 5 before 7 did not count


def test_bank_order_takes_turns():
    score = torch.tensor([[-1.0, -2.0, -3.0, -4.0, NEG]])
    bank = torch.tensor([[0, 0, 1, 2, 2]])
    place = bank_order(score, bank, 3)
    assert place.argsort(1)[0].tolist() == [3, 2, 0, 1, 4]  # bank 2's best, bank 1's, bank 0's, then bank 0's


# ---------------------------------------------------------------------------
# Every family, both engines
# ---------------------------------------------------------------------------

CONSTRAINTS = [[[5, 6]], [[7], [5, 5]], [[9, 4, 9]], [[6], [10]], [[4]]]  # several tokens, repeats, unlikely


@pytest.mark.parametrize("ordered", [False, True])
def test_every_finished_hypothesis_meets_its_constraints(decoding_case, ordered):
    name, engine = decoding_case
    model = make_engine(name, engine, seed=3)
    src, mask = sources(name, seed=3)
    found = beam(model, src, mask, Controls(constraints=CONSTRAINTS, ordered=ordered), b=8)
    for hyps, cons in zip(found, CONSTRAINTS):
        assert hyps, "a constrained search always finds an output"
        for h in hyps:
            assert all(contains(h.tokens, p) for p in cons), (h.tokens, cons)
            if ordered:
                assert _ordered_somewhere(h.tokens, cons), (h.tokens, cons)
            assert EOS not in h.tokens and PAD not in h.tokens


def _ordered_somewhere(seq, cons):
    start = 0
    for p in cons:
        hits = [i for i in range(start, len(seq) - len(p) + 1) if seq[i: i + len(p)] == p]
        if not hits:
            return False
        start = hits[0] + len(p)
    return True


def test_processors_hold_in_every_output(decoding_case):
    name, engine = decoding_case
    model = make_engine(name, engine, seed=4)
    src, mask = sources(name, seed=4)
    ctl = Controls(min_length=4, no_repeat_ngram=2, banned=[[7], [5, 6]], prefixes=[[8, 9]] * 5)
    for hyps in beam(model, src, mask, ctl, b=8):
        for h in hyps:
            assert h.tokens[:2] == [8, 9]                                     # prefix verbatim
            assert len(h.tokens) >= 4                                         # min length
            assert len(set(ngrams(h.tokens, 2))) == len(ngrams(h.tokens, 2))  # no repeated bigram
            assert 7 not in h.tokens and not contains(h.tokens, [5, 6])       # banned
            assert sum(h.token_logprobs) == pytest.approx(h.logprob, abs=1e-4)
            assert len(h.token_logprobs) == len(h.tokens) + 1


ALL_OPTIONS = {
    "constraints": dict(constraints=CONSTRAINTS),
    "ordered": dict(constraints=CONSTRAINTS, ordered=True),
    "prefix": dict(prefixes=[[5], [6, 7], [], [8], [9, 9, 9]]),
    "processors": dict(min_length=3, no_repeat_ngram=2, repetition_penalty=1.3, eos_bonus=-0.5, banned=[[6, 6]]),
    "scores": dict(token_scores=True),
    "alignments": dict(alignments=True, coverage_penalty=0.4),
    "alternatives": dict(prefixes=[[5], [6, 7], [], [8], [9]], alternatives=3),
}


@pytest.mark.parametrize("option", list(ALL_OPTIONS))
def test_kernel_engine_gives_the_torch_engines_outputs(option):
    from conftest import DECODING_CASES

    names = [n for n, e in DECODING_CASES if e == "kernels"]
    if not names:
        pytest.fail("the kernels are not built here: the engines cannot be compared")
    cfg = DecodeConfig(beam=4, nbest=2, max_len_a=1.0, max_len_b=6)
    for name in names:
        src, mask = sources(name, seed=6)
        outs = []
        for engine in ("torch", "kernels"):
            model = make_engine(name, engine, seed=6)
            outs.append(search(model, src, mask, cfg, controls=Controls(**ALL_OPTIONS[option])))
        (a, b) = outs
        assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b], name
        assert [[h.alignment for h in x] for x in a] == [[h.alignment for h in x] for x in b], name
        for x, y in zip(a, b):
            assert [h.score for h in x] == pytest.approx([h.score for h in y], abs=1e-4)


def test_kernel_engine_says_once_that_alignments_step_on_the_modules(caplog):
    from conftest import DECODING_CASES

    name = next(n for n, e in DECODING_CASES if e == "kernels")
    model = make_engine(name, "kernels", seed=1)
    src, mask = sources(name, seed=1)
    with caplog.at_level("INFO", logger="transduce"):
        for _ in range(2):
            beam(model, src, mask, Controls(alignments=True))
    assert sum("cross-attention requested" in r.message for r in caplog.records) == 1


def test_empty_controls_change_nothing(decoding_model_name):
    model = make_model(decoding_model_name, seed=2)
    src, mask = sources(decoding_model_name, seed=2)
    plain = beam(model, src, mask, None)
    scored = beam(model, src, mask, Controls(token_scores=True))
    assert [[h.tokens for h in x] for x in plain] == [[h.tokens for h in x] for x in scored]
    for x, y in zip(plain, scored):
        assert [h.score for h in x] == pytest.approx([h.score for h in y], abs=1e-4)


@pytest.mark.parametrize("name", ["transformer-prenorm", "gru-luong-dot", "decoder-only"])
def test_best_constrained_output_by_exhaustive_search(name):
    # 2 symbols (+ <unk>), outputs of up to 3 tokens: every one is enumerated and teacher-forced
    model = make_model(name, seed=7, tgt_v=6)
    src_v, _ = vocab_sizes(name)
    src_v = 6 if src_v == 11 else src_v
    for seed, cons in zip(range(3), ([[5]], [[4, 4]], [[5], [1]])):
        src = torch.randint(4, src_v, (1, 3), generator=torch.Generator().manual_seed(seed))
        mask = src != PAD
        n = int(max_lengths(mask, 0.0, 3)[0])
        best, best_lp = None, -math.inf
        for length in range(n + 1):
            for seq in itertools.product([1, 4, 5], repeat=length):
                if not all(contains(list(seq), p) for p in cons):
                    continue
                lp = float(token_logprobs(model, src, mask, list(seq)).gather(
                    1, torch.tensor(list(seq) + [EOS])[:, None]).sum())
                if lp > best_lp:
                    best, best_lp = list(seq), lp
        hyps = beam_search(model, src, mask, beam=60, nbest=1, length_penalty=0.0, max_len_a=0.0, max_len_b=3,
                           controls=Controls(constraints=[cons]))
        assert hyps[0][0].tokens == best
        assert hyps[0][0].logprob == pytest.approx(best_lp, abs=1e-4)


def test_prefix_scores_a_given_output(decoding_model_name):
    """Forced decoding: the prefix's token log-probabilities are the teacher-forced ones."""
    model = make_model(decoding_model_name, seed=9)
    src, mask = sources(decoding_model_name, b=1, seed=9)
    target = [5, 8, 6]
    h = beam_search(model, src, mask, beam=2, nbest=1, max_len_a=0.0, max_len_b=3,
                    controls=Controls(prefixes=[target]))[0][0]
    want = token_logprobs(model, src, mask, target).gather(1, torch.tensor(target + [EOS])[:, None])[:, 0]
    assert h.tokens == target
    assert h.token_logprobs == pytest.approx(want.tolist(), abs=1e-4)


def test_alternatives_after_a_prefix():
    model = make_model("transformer-prenorm", seed=10)
    src, mask = sources("transformer-prenorm", b=2, seed=10)
    prefixes = [[5, 6], [7]]
    found = search(model, src, mask, DecodeConfig(beam=2, max_len_a=1.0, max_len_b=5),
                   controls=Controls(prefixes=prefixes, alternatives=3))
    for i, hyps in enumerate(found):
        assert len(hyps) == 3
        nexts = [h.tokens[len(prefixes[i])] for h in hyps]
        assert all(h.tokens[: len(prefixes[i])] == prefixes[i] for h in hyps) and len(set(nexts)) == 3
        logp = token_logprobs(model, src[i: i + 1, : int(mask[i].sum())], mask[i: i + 1, : int(mask[i].sum())],
                              prefixes[i])[len(prefixes[i])]
        logp[[PAD, 2, EOS]] = NEG
        assert nexts == logp.topk(3).indices.tolist()   # the most probable next tokens, in order


def test_alignments_and_coverage_penalty():
    model = make_model("lstm-bahdanau", seed=11)
    src, mask = sources("lstm-bahdanau", seed=11)
    plain = beam(model, src, mask, Controls(alignments=True), lp=0.0)
    covered = beam(model, src, mask, Controls(alignments=True, coverage_penalty=1.0), lp=0.0)
    for i, (x, y) in enumerate(zip(plain, covered)):
        n = int(mask[i].sum())
        for h in x + y:
            assert len(h.alignment) == len(h.tokens) and all(0 <= a < n for a in h.alignment)
        for h in y:  # the penalty: beta * sum log min(coverage, 1) <= 0
            assert h.score <= h.logprob + 1e-6
    with pytest.raises(ValueError, match="cross-attention"):
        beam(make_model("decoder-only"), *sources("decoder-only"), Controls(alignments=True))


def test_ensemble_with_constraints():
    ens = Ensemble([member("transformer-prenorm", 1), member("lstm-bahdanau", 2)])
    src, mask = sources("transformer-shared", seed=12)
    for hyps, cons in zip(beam(ens, src, mask, Controls(constraints=CONSTRAINTS), b=8), CONSTRAINTS):
        assert hyps and all(all(contains(h.tokens, p) for p in cons) for h in hyps)


def test_sampling_follows_the_processors():
    model = make_model("transformer-prenorm", seed=13)
    src, mask = sources("transformer-prenorm", b=8, seed=13)
    g = torch.Generator().manual_seed(0)
    for hyps in sample(model, src, mask, 1.0, 6, generator=g,
                       controls=Controls(min_length=3, banned=[[5]], prefixes=[[6]] * 8, no_repeat_ngram=1)):
        h = hyps[0]
        assert h.tokens[0] == 6 and len(h.tokens) >= 3 and 5 not in h.tokens and len(set(h.tokens)) == len(h.tokens)
    with pytest.raises(ValueError, match="beam search"):
        sample(model, src, mask, controls=Controls(constraints=[[[5]]] * 8))


# ---------------------------------------------------------------------------
# From text: validation
# ---------------------------------------------------------------------------

def test_controls_from_text_name_what_is_wrong():
    run = fake_run("transformer-prenorm", 0)
    cfg = DecodeConfig(constraints=["P1 P2"], banned=["P3"], prefix="P0")
    ctl = controls_for(cfg, run.target, 2)
    p = run.target.vocab.stoi
    assert ctl.constraints == [[[p["P1"], p["P2"]]]] * 2 and ctl.banned == [[p["P3"]]] and ctl.prefixes == [[p["P0"]]] * 2
    with pytest.raises(ValueError, match="--constraints line 2: symbol 'Q9'"):
        controls_for(cfg, run.target, 2, constraints=[["P1"], ["P2 Q9"]])
    with pytest.raises(ValueError, match="2 lines for 3 inputs"):
        controls_for(cfg, run.target, 3, prefixes=["P1", "P2"])
    for bad, what in [(dict(min_length=-1), "min_length"), (dict(repetition_penalty=0.0), "repetition_penalty"),
                      (dict(coverage_penalty=-1.0), "coverage_penalty"), (dict(no_repeat_ngram=-2), "no_repeat_ngram"),
                      (dict(alternatives=2, constraints=["P1"]), "alternatives")]:
        with pytest.raises(ValueError, match=what):
            DecodeConfig(**bad).validate()


def test_a_prefix_longer_than_the_maximum_length_is_refused():
    model = make_model("transformer-prenorm", seed=1)
    src, mask = sources("transformer-prenorm", b=1, seed=1)
    n = int(max_lengths(mask, 0.0, 3)[0])
    with pytest.raises(ValueError, match="prefix has 4 tokens, more than the maximum output length 3"):
        beam_search(model, src, mask, beam=2, max_len_a=0.0, max_len_b=3, controls=Controls(prefixes=[[5] * (n + 1)]))
    with pytest.raises(ValueError, match="constraints"):
        beam_search(model, src, mask, beam=2, max_len_a=0.0, max_len_b=3, controls=Controls(constraints=[[[5, 5], [6, 6]]]))


# ---------------------------------------------------------------------------
# The commands on a toy run
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from toyrun import toy_config, toy_data
    from transduce.training.trainer import train

    folder = tmp_path_factory.mktemp("controls")
    cfg = toy_config(toy_data(folder, 200), max_steps=30, save_every=30)
    cfg.model.dropout = 0.0
    train(cfg, folder / "run")
    return folder / "run"


def test_commands_take_the_controls(toy_run, tmp_path, capsys):
    from transduce.cli import main

    inputs = tmp_path / "in.txt"
    inputs.write_text("a b c\nd e f g\n")
    (tmp_path / "cons.txt").write_text("h h\tg\n\n")
    (tmp_path / "prefix.txt").write_text("c\nf g\n")
    out, scores, align = tmp_path / "out.txt", tmp_path / "scores.jsonl", tmp_path / "align.txt"
    assert main(["translate", "--model", str(toy_run), "--input", str(inputs), "--output", str(out), "--beam", "3",
                 "--constraints", str(tmp_path / "cons.txt"), "--scores", str(scores), "--alignment", str(align),
                 "--ban", "a a", "--no-repeat-ngram", "3"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and contains(lines[0].split(), ["h", "h"]) and "g" in lines[0].split()
    records = [json.loads(x) for x in scores.read_text().splitlines()]
    assert records[0][0]["output"] == lines[0] and len(records[0][0]["token_logprobs"]) == len(lines[0].split()) + 1
    pairs = [a.split() for a in align.read_text().splitlines()]
    assert [len(p) for p in pairs] == [len(x.split()) for x in lines]
    assert all(0 <= int(x.split("-")[0]) < 4 for p in pairs for x in p)
    assert main(["translate", "--model", str(toy_run), "--input", str(inputs), "--output", str(out),
                 "--prefix", str(tmp_path / "prefix.txt"), "--min-length", "5"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].split()[:1] == ["c"] and lines[1].split()[:2] == ["f", "g"]
    assert all(len(x.split()) >= 5 for x in lines)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(toy_run), "--constraints", str(tmp_path / "cons.txt"),
                 "--metrics", "seq_acc"]) == 2   # one line per distinct source: the dev set has more
    assert "--constraints: 2 lines for" in capsys.readouterr().err
    assert main(["generate", "--model", str(toy_run), "--prompt", "a b c", "--beam", "2", "--constraint", "e e",
                 "--prefix", "d"]) == 0
    got = capsys.readouterr().out.split()
    assert got[0] == "d" and contains(got, ["e", "e"])
    assert main(["translate", "--model", str(toy_run), "--input", str(inputs), "--ban", "zz"]) == 2
    assert "'zz'" in capsys.readouterr().err


def test_replace_unk_copies_the_most_attended_source_symbol():
    from transduce.inference import decode, translate

    run = fake_run("transformer-prenorm", 3)
    run.config.decode.prefix = "<unk>"   # the output starts with <unk>, which the source then fills in
    run.config.decode.replace_unk = True
    sources = ["abcd", "ghe"]
    found = decode(run, sources, beam=2, nbest=1)
    texts = translate(run, sources, beam=2, nbest=1)
    for s, hyps, text in zip(sources, found, texts):
        h = hyps[0]
        assert h.tokens[0] == 1 and len(h.alignment) == len(h.tokens)
        assert text[0][: 1] == s[h.alignment[0]] and "<unk>" not in text[0]
    run.config.decode.replace_unk = False
    assert translate(run, sources[:1], beam=2, nbest=1)[0][0].startswith("<unk>")
