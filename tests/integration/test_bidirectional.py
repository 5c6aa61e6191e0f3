"""Right-to-left decoders and their rescoring with left-to-right ones.

A codec with `reverse` encodes ids last symbol first, on every encoding path,
and decodes back to reading order; a run trained so decodes in reading order;
`Bidirectional` ranks the union of each direction's n-best by the mean of the
directions' teacher-forced log-probabilities, exactly, batched or not; runs of
both directions given to `--model` decode and evaluate that way."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import random_batch
from conftest import member, token_logprobs
from toyrun import toy_config, toy_data
from transduce.checkpoint import CheckpointError
from transduce.cli import main
from transduce.config import DecodeConfig, TokenizerConfig
from transduce.data.pipeline import fit_encode_pairs
from transduce.data.readers import Pair
from transduce.data.vocab import EOS, TextCodec, reverse_segments
from transduce.inference import ensemble, perplexity, translate
from transduce.runs import load_run
from transduce.search import (Bidirectional, Ensemble, SourceReversed, beam_search, bidirectional_search,
                              greedy)
from transduce.training.trainer import train

TEXTS = ["AH0 B AW1 T", "K AE1 T", "", "T", "Z IY1 R OW0 Z"]


@pytest.mark.parametrize("kind", ["whitespace", "char"])
def test_a_reversed_codec_encodes_last_symbol_first_on_every_path(kind):
    plain, flat, lengths = TextCodec.fit_encode(TokenizerConfig(kind=kind), TEXTS)
    rev, rflat, rlengths = TextCodec.fit_encode(TokenizerConfig(kind=kind, reverse=True), TEXTS)
    assert rev.vocab.itos == plain.vocab.itos and np.array_equal(lengths, rlengths)
    for t in TEXTS:
        assert rev.encode(t) == plain.encode(t)[::-1]
        assert rev.decode(rev.encode(t)) == plain.decode(plain.encode(t))
    bulk, bulk_lengths = rev.encode_many(TEXTS)
    assert np.array_equal(bulk, rflat) and np.array_equal(bulk_lengths, lengths)
    assert rflat.tolist() == [i for t in TEXTS for i in plain.encode(t)[::-1]]
    fitted = TextCodec.fit(TokenizerConfig(kind=kind, reverse=True), TEXTS)
    assert [fitted.encode(t) for t in TEXTS] == [rev.encode(t) for t in TEXTS]
    again = TextCodec.from_dict(json.loads(rev.dumps()))
    assert again.reverse and again.encode(TEXTS[0]) == rev.encode(TEXTS[0])
    assert "reverse" not in plain.to_dict()  # codecs saved before `reverse` existed compare equal
    with pytest.raises(ValueError, match="no word positions"):
        rev.encode_words(["a", "b"])


def test_reverse_segments_handles_empty_and_single_sequences():
    flat = np.array([1, 2, 3, 4, 5, 6], dtype=np.int32)
    assert reverse_segments(flat, np.array([0, 3, 1, 0, 2])).tolist() == [3, 2, 1, 4, 6, 5]
    assert reverse_segments(np.zeros(0, np.int32), np.array([0, 0])).tolist() == []


def test_training_pairs_of_a_reversed_target_are_encoded_right_to_left(tmp_path):
    pairs = [Pair("a b c", "A B C", "t:1"), Pair("d e", "D E", "t:2")]
    cfg = toy_config(toy_data(tmp_path), max_steps=1).data
    _, _, plain = fit_encode_pairs(cfg, pairs)
    cfg.target_tokenizer.reverse = True
    _, tgt, rev = fit_encode_pairs(cfg, pairs)
    for i in range(len(pairs)):
        assert rev.tgt[i].tolist() == plain.tgt[i].tolist()[::-1]
        assert rev.src[i].tolist() == plain.src[i].tolist()
    assert tgt.decode(rev.tgt[0]) == "A B C"


def mean_logprob(directions, src, mask, reading: list[int]) -> float:
    """Mean over directions of log P(output </s>), each direction scoring the output in its order."""
    total = 0.0
    for model, reverse in directions:
        tokens = reading[::-1] if reverse else reading
        logp = token_logprobs(model, src, mask, tokens)
        total += float(logp.gather(1, torch.tensor(tokens + [EOS])[:, None]).sum())
    return total / len(directions)


@pytest.mark.parametrize("beam", [1, 3])
def test_bidirectional_search_ranks_the_union_of_proposals_by_the_mean_score(beam):
    left, right = member("transformer-prenorm", 5), member("lstm-bahdanau", 6)
    directions = [(left, False), (right, True)]
    cfg = DecodeConfig(beam=beam, length_penalty=1.0, max_len_a=1.0, max_len_b=3)
    batch = random_batch(6, seed=5, src_v=11)
    got = bidirectional_search(Bidirectional(directions), batch.src, batch.src_mask, cfg, beam, 10)
    for i in range(6):
        s = int(batch.src_mask[i].sum())
        src, mask = batch.src[i: i + 1, :s], batch.src_mask[i: i + 1, :s]
        if beam == 1:
            proposed = [greedy(left, src, mask, 1.0, 3)[0], greedy(right, src, mask, 1.0, 3)[0]]
        else:
            proposed = [beam_search(left, src, mask, beam, beam, 1.0, 1.0, 3)[0],
                        beam_search(right, src, mask, beam, beam, 1.0, 1.0, 3)[0]]
        union = {tuple(h.tokens) for h in proposed[0]} | {tuple(h.tokens[::-1]) for h in proposed[1]}
        scored = sorted(((mean_logprob(directions, src, mask, list(o)) / (len(o) + 1), list(o)) for o in union),
                        key=lambda x: -x[0])
        assert [h.tokens for h in got[i]] == [o for _, o in scored]
        for h, (score, _) in zip(got[i], scored):
            assert h.score == pytest.approx(score, abs=1e-4)
        assert len(got[i]) == len(union) >= 1


def test_bidirectional_outputs_follow_the_first_runs_direction_and_nbest():
    left, right = member("transformer-prenorm", 8), member("transformer-prenorm", 9)
    batch = random_batch(4, seed=8, src_v=11)
    cfg = DecodeConfig(beam=2, length_penalty=1.0, max_len_a=1.0, max_len_b=3)
    a = bidirectional_search(Bidirectional([(left, False), (right, True)]), batch.src, batch.src_mask, cfg, 2, 2)
    b = bidirectional_search(Bidirectional([(right, True), (left, False)], out_reverse=True),
                             batch.src, batch.src_mask, cfg, 2, 2)
    assert all(len(h) <= 2 for h in a)
    assert [[h.tokens for h in x] for x in a] == [[h.tokens[::-1] for h in x] for x in b]
    with pytest.raises(ValueError, match="at least two directions"):
        Bidirectional([(left, False)])


def test_an_ensemble_scores_a_batch_as_the_mixture_it_decodes_with():
    models = [member("transformer-prenorm", 11), member("lstm-bahdanau", 12)]
    batch = random_batch(3, seed=11, src_v=11)
    hyps = beam_search(Ensemble(models), batch.src, batch.src_mask, beam=2, nbest=1, max_len_a=1.0,
                       max_len_b=3)
    from transduce.search import sequence_logprobs

    rows = torch.arange(3)
    scored = sequence_logprobs(Ensemble(models), batch.src, batch.src_mask, rows, [h[0].tokens for h in hyps])
    for h, lp in zip(hyps, scored.tolist()):
        assert h[0].logprob == pytest.approx(lp, abs=1e-4)


def test_a_model_trained_on_reversed_sources_reads_them_in_reading_order():
    model = member("transformer-prenorm", 14)
    batch = random_batch(5, seed=14, src_v=11)
    flipped = SourceReversed.flip(batch.src, batch.src_mask)
    for i in range(5):
        n = int(batch.src_mask[i].sum())
        assert flipped[i, :n].tolist() == batch.src[i, :n].tolist()[::-1]
        assert flipped[i, n:].tolist() == batch.src[i, n:].tolist()
    direct = beam_search(model, flipped, batch.src_mask, beam=3, nbest=2, max_len_a=1.0, max_len_b=3)
    adapted = beam_search(SourceReversed(model), batch.src, batch.src_mask, beam=3, nbest=2, max_len_a=1.0,
                          max_len_b=3)
    assert [[h.tokens for h in x] for x in direct] == [[h.tokens for h in x] for x in adapted]
    assert torch.allclose(SourceReversed(model)(batch), model(dataclasses.replace(batch, src=flipped)))


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    """Left to right; right to left; right to left reading reversed sources."""
    folder = tmp_path_factory.mktemp("bidi")
    data = toy_data(folder)
    runs = []
    for seed, reverse, reverse_source in ((1, False, False), (2, True, False), (3, True, True)):
        run = folder / f"run{seed}"
        cfg = toy_config(data, max_steps=30, seed=seed)
        cfg.decode.beam = 2
        cfg.data.target_tokenizer.reverse = reverse
        cfg.data.source_tokenizer.reverse = reverse_source
        train(cfg, run, progress=False)
        runs.append(run)
    return folder, runs


def test_a_right_to_left_run_decodes_in_reading_order(both_ways, capsys):
    _, runs = both_ways
    for run_dir, orders in ((runs[0], {}), (runs[2], {"source_order": "right to left",
                                                       "target_order": "right to left"})):
        assert main(["info", str(run_dir)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert {k: v for k, v in info.items() if k.endswith("_order")} == orders
    run = load_run(runs[1])
    assert run.target.reverse and run.config.data.target_tokenizer.reverse
    words = ["a b c", "h g f e"]
    hyps = beam_search(run.model, *_src(run, words), beam=2, nbest=1, max_len_a=run.config.decode.max_len_a,
                       max_len_b=run.config.decode.max_len_b)
    texts = translate(run, words, beam=2)
    for h, t in zip(hyps, texts):
        assert t[0] == " ".join(run.target.vocab.itos[i] for i in h[0].tokens[::-1])


def _src(run, words):
    from transduce.data.pipeline import pad

    src = pad([run.source.encode(w) for w in words])
    return src, src != 0


def test_runs_of_both_directions_decode_by_rescoring(both_ways, capsys):
    folder, runs = both_ways
    loaded = [load_run(r) for r in runs]
    both = ensemble(loaded, [str(r) for r in runs])
    assert isinstance(both.model, Bidirectional) and both.config is loaded[0].config
    (left, l_rev), (right, r_rev) = both.model.directions
    assert not l_rev and r_rev and isinstance(right, Ensemble) and len(right.models) == 2
    assert right.models[0] is loaded[1].model and isinstance(right.models[1], SourceReversed)
    assert right.models[1].model is loaded[2].model
    words = ["a b c", "h g f e", "d d a b c"]
    expected = translate(both, words, beam=2)
    (folder / "in.txt").write_text("".join(w + "\n" for w in words))
    out = folder / "out.txt"
    assert main(["translate", "--model", *map(str, runs), "--quantize", "none", "--beam", "2",
                 "--input", str(folder / "in.txt"), "--output", str(out)]) == 0
    assert out.read_text().splitlines() == [h[0] for h in expected]
    # the right-to-left run first: outputs still in reading order, the same ranking
    first_r2l = ensemble([loaded[1], loaded[2], loaded[0]])
    assert translate(first_r2l, words, beam=2) == expected
    # a run reading reversed sources first: sources are encoded its way, the others turn them back
    first_reversed_source = ensemble([loaded[2], loaded[0], loaded[1]])
    assert first_reversed_source.source.reverse
    assert translate(first_reversed_source, words, beam=2) == expected
    capsys.readouterr()
    assert main(["evaluate", "--model", *map(str, runs), "--split", "dev"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["seq_acc"] <= 100.0 and result["items"] > 0
    with pytest.raises(ValueError, match="no common next-token distribution"):
        perplexity(both, [Pair("a b", "b a", "t:1")])


def test_every_direction_decodes_as_quantize_says(both_ways):
    from transduce.cli import _decoding_run
    from transduce.models.quantize import Int8Linear

    _, runs = both_ways
    run = _decoding_run(argparse.Namespace(model=[str(r) for r in runs], quantize="int8"))
    left, right = (m for m, _ in run.model.directions)
    for m in [left, *right.models]:
        m = getattr(m, "model", m)  # a run reading sources the other way is wrapped
        assert any(isinstance(x, Int8Linear) for x in m.modules())
    assert translate(run, ["a b c"], beam=2)[0][0] != ""


def test_runs_that_differ_in_more_than_direction_are_named(both_ways, tmp_path):
    _, runs = both_ways
    other = toy_config(toy_data(tmp_path), max_steps=2)
    other.data.target_tokenizer.kind = "char"
    other.data.target_tokenizer.reverse = True
    train(other, tmp_path / "other", progress=False)
    with pytest.raises(CheckpointError, match=r"other: its target vocabulary differs"):
        ensemble([load_run(runs[0]), load_run(tmp_path / "other")], [str(runs[0]), str(tmp_path / "other")])


def test_encoder_families_refuse_a_reversed_source(tmp_path):
    from transduce.config import ConfigError
    from transduce.registry import config_from_dict

    with pytest.raises(ConfigError, match="source_tokenizer.reverse: applies to families with a decoder"):
        config_from_dict({"model": {"family": "encoder_classifier", "d_model": 16, "heads": 2,
                                    "encoder_layers": 1, "ff_dim": 32},
                          "data": {"train": "x.tsv", "source_tokenizer": {"kind": "char", "reverse": True}}})
