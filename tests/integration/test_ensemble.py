"""Ensembles: the search sees several models as one whose next-token distribution is the mean of
theirs; exact where search can be exhaustive, unchanged by batching and dropped sources, of mixed
families; runs that cannot be ensembled are named; the CLI decodes and evaluates with several runs."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from conftest import make_model, member, random_batch, token_logprobs
from toyrun import toy_config, toy_data
from transduce.checkpoint import CheckpointError
from transduce.cli import main
from transduce.data.pipeline import Batch
from transduce.data.vocab import BOS, EOS, PAD
from transduce.inference import ensemble, translate
from transduce.runs import load_run
from transduce.registry import build_model
from transduce.search import Ensemble, beam_search, greedy, max_lengths
from transduce.training.trainer import train

MEMBERS = ["transformer-prenorm", "lstm-bahdanau", "prefix-lm"]  # three families, one vocabulary


def mixture_logprob(models, src, mask, tokens: list[int]) -> float:
    """log P(tokens </s>) under the per-step mean of the models' distributions."""
    labels = torch.tensor(tokens + [EOS])
    per_model = torch.stack([token_logprobs(m, src, mask, tokens) for m in models])  # (M, T, V)
    mixed = torch.logsumexp(per_model, 0) - math.log(len(models))
    return float(mixed.gather(1, labels[:, None]).sum())


def test_ensemble_of_one_decodes_as_its_model():
    model = make_model("transformer-prenorm", seed=3)
    batch = random_batch(6, seed=3)
    one = Ensemble([model])
    for a, b in [(greedy(model, batch.src, batch.src_mask, 1.0, 4), greedy(one, batch.src, batch.src_mask, 1.0, 4)),
                 (beam_search(model, batch.src, batch.src_mask, beam=3, nbest=2),
                  beam_search(one, batch.src, batch.src_mask, beam=3, nbest=2))]:
        assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b]
        for x, y in zip(a, b):
            assert x[0].logprob == pytest.approx(y[0].logprob, abs=1e-5)


def test_beam_search_over_an_ensemble_is_exact():
    models = [member(name, 7 + i, vocab=6) for i, name in enumerate(MEMBERS)]
    ens = Ensemble(models)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        src = torch.randint(4, 6, (1, 3), generator=g)
        mask = src != PAD
        max_len = int(max_lengths(mask, 0.0, 3, ens)[0])
        scored = {seq: mixture_logprob(models, src, mask, list(seq))
                  for n in range(max_len + 1) for seq in itertools.product([1, 4, 5], repeat=n)}
        ranked = sorted(scored.items(), key=lambda kv: -kv[1])[:3]
        hyps = beam_search(ens, src, mask, beam=27, nbest=3, length_penalty=0.0, max_len_a=0.0, max_len_b=3)[0]
        assert [h.tokens for h in hyps] == [list(s) for s, _ in ranked]
        for h, (_, lp) in zip(hyps, ranked):
            assert h.logprob == pytest.approx(lp, abs=1e-4)
        # The mixture is not any one member: at least one member alone ranks differently.
        alone = [beam_search(m, src, mask, beam=27, nbest=3, length_penalty=0.0, max_len_a=0.0,
                             max_len_b=3)[0] for m in models]
        assert any([h.tokens for h in a] != [h.tokens for h in hyps] or
                   abs(a[0].logprob - hyps[0].logprob) > 1e-3 for a in alone)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_ensemble_batch_equals_one_by_one(search):
    """Members' states are reordered and compacted together: sources finishing early and leaving
    the batch change no other source's output."""
    ens = Ensemble([member(name, 17 + i) for i, name in enumerate(MEMBERS)])
    batch = random_batch(12, seed=17, src_v=11)

    def run(s, m):
        if search == "greedy":
            return [h[0] for h in greedy(ens, s, m, 1.0, 4)]
        return [h[0] for h in beam_search(ens, s, m, beam=3, nbest=1, max_len_a=1.0, max_len_b=4)]

    together = run(batch.src, batch.src_mask)
    assert len({len(h.tokens) for h in together}) > 2, "the sources should finish at different steps"
    for i in range(12):
        s = int(batch.src_mask[i].sum())
        alone = run(batch.src[i: i + 1, :s], batch.src_mask[i: i + 1, :s])[0]
        assert alone.tokens == together[i].tokens
        assert alone.logprob == pytest.approx(together[i].logprob, abs=1e-4)


def test_ensemble_output_lengths_follow_the_tightest_member():
    short = member("prefix-lm", 1)       # source and output share its 64 positions
    ens = Ensemble([member("transformer-prenorm", 1), short])
    mask = torch.ones(2, 10, dtype=torch.bool)
    assert torch.equal(ens.max_output_len(mask), short.max_output_len(mask))
    assert Ensemble([member("lstm-bahdanau", 1)]).max_output_len(mask) is None


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ens")
    data = toy_data(folder)
    runs = []
    for seed in (1, 2):
        run = folder / f"run{seed}"
        cfg = toy_config(data, max_steps=25, seed=seed)
        cfg.decode.beam = 2
        train(cfg, run, progress=False)
        runs.append(run)
    return folder, runs


def test_ensembled_runs_translate_as_their_ensemble(two_runs, capsys):
    folder, runs = two_runs
    loaded = [load_run(r) for r in runs]
    ens = ensemble(loaded, [str(r) for r in runs])
    assert isinstance(ens.model, Ensemble) and ens.config is loaded[0].config
    words = ["a b c", "h g f e", "d d a b c"]
    expected = translate(ens, words, beam=2)
    direct = Ensemble([r.model for r in loaded])
    assert translate(loaded[0], words, beam=2, model=direct) == expected
    (folder / "in.txt").write_text("".join(w + "\n" for w in words))
    out = folder / "out.txt"
    assert main(["translate", "--model", str(runs[0]), str(runs[1]), "--quantize", "none",
                 "--input", str(folder / "in.txt"), "--output", str(out)]) == 0
    assert out.read_text().splitlines() == [h[0] for h in expected]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(runs[0]), str(runs[1]), "--split", "dev", "--quantize", "none"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["seq_acc"] <= 100.0 and result["items"] > 0


def test_runs_that_cannot_ensemble_are_named(two_runs, tmp_path, capsys):
    folder, runs = two_runs
    other = toy_config(toy_data(tmp_path), max_steps=2)  # the same data
    other.data.target_tokenizer.kind = "char"   # a different target vocabulary
    train(other, tmp_path / "other", progress=False)
    with pytest.raises(CheckpointError, match=r"other: its target vocabulary differs from .*run1's"):
        ensemble([load_run(runs[0]), load_run(tmp_path / "other")], [str(runs[0]), str(tmp_path / "other")])
    assert main(["translate", "--model", str(runs[0]), str(runs[1]), "--engine", "ctranslate2"]) == 2
    assert "an ensemble needs --engine torch" in capsys.readouterr().err
    assert main(["translate", "--model", str(runs[0]), str(runs[1]), "--attention", str(tmp_path / "a.jsonl"),
                 "--input", str(folder / "toy.tsv")]) == 2
    assert "an ensemble has none of its own" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])


def test_every_member_decodes_as_quantize_says(two_runs):
    import argparse

    from transduce.cli import _decoding_run
    from transduce.models.quantize import Int8Linear

    _, runs = two_runs
    for flag, want in (("int8", True), ("none", False)):
        run = _decoding_run(argparse.Namespace(model=[str(r) for r in runs], quantize=flag))
        assert len(run.model.models) == 2
        assert all(any(isinstance(m, Int8Linear) for m in member.modules()) == want for member in run.model.models)
