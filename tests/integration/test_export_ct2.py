"""CTranslate2 export: float32 greedy outputs identical to ours."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import fake_run
from transduce.config import Config
from transduce.data.vocab import SPECIALS, CharTokenizer, TextCodec, Vocab, WhitespaceTokenizer
from transduce.export.ctranslate2 import CT2Translator, export
from transduce.inference import LoadedRun, decode


@pytest.mark.parametrize("name", ["transformer-prenorm", "transformer-postnorm-learned", "transformer-shared",
                                  "transformer-bert-style", "transformer-postnorm-geglu", "transformer-swiglu"])
def test_ctranslate2_greedy_matches(tmp_path, name):
    run = fake_run(name, seed=21)
    out = export(run, tmp_path / "ct2")
    ct2 = CT2Translator(out, threads=1)
    g = random.Random(0)
    letters = run.source.vocab.itos[4:]
    sources = ["".join(g.choice(letters) for _ in range(g.randint(1, 9))) for _ in range(60)]
    ours = [h[0].tokens for h in decode(run, sources, beam=1, nbest=1, batch_size=16)]
    theirs = [h[0] for h in ct2.translate_ids([run.source.encode(s) for s in sources], beam=1)]
    assert sum(len(o) for o in ours) > 60, "outputs should not be trivially empty"
    assert len({tuple(o) for o in ours}) > 5, "outputs should vary"
    assert ours == theirs
    # the text path too
    assert ct2.translate(sources[:5]) == [[run.target.decode(o)] for o in ours[:5]]
    # two batches at a time, both engines: the same outputs, in input order
    threads = torch.get_num_threads()
    assert [h[0].tokens for h in decode(run, sources, beam=1, nbest=1, batch_size=16, workers=2)] == ours
    assert torch.get_num_threads() == threads  # restored
    two = CT2Translator(out, threads=2, workers=2)
    assert [h[0] for h in two.translate_ids([run.source.encode(s) for s in sources], beam=1, batch_size=16)] == ours


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_export_never_writes_into_the_model(tmp_path, quantization):
    """CTranslate2 rewrites a spec's arrays in place (quantization, fusing): the export hands it
    copies, so the exported model keeps decoding as before."""
    run = fake_run("transformer-shared", seed=5)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    export(run, tmp_path / "ct2", quantization)
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_run_reading_and_writing_reversed_exports_with_its_codecs(tmp_path):
    """A right-to-left run (reversed source too) decodes with CTranslate2 as with us: the export keeps
    the codecs, which turn the ids around on the way in and out."""
    from transduce.inference import translate

    run = fake_run("transformer-postnorm-learned", seed=21)
    run.source.reverse = run.target.reverse = True
    ct2 = CT2Translator(export(run, tmp_path / "ct2"), threads=1)
    assert ct2.source.reverse and ct2.target.reverse
    g = random.Random(0)
    letters = run.source.vocab.itos[4:]
    sources = ["".join(g.choice(letters) for _ in range(g.randint(1, 9))) for _ in range(60)]
    ours = translate(run, sources, beam=1, nbest=1, batch_size=8)
    assert len({o[0] for o in ours}) > 5
    assert ct2.translate(sources) == ours


def test_an_empty_output_is_allowed_as_in_our_search(tmp_path):
    """A model whose first step prefers the end token: our search outputs nothing for those sources,
    and so does CTranslate2 (its default would forbid the end token at the first step)."""
    run = fake_run("transformer-prenorm", seed=21)
    with torch.no_grad():  # push the final state toward the end token's (tied) output row
        run.model.dec_norm.bias.add_(2 * run.model.output.weight[SPECIALS.index("</s>")])
    ct2 = CT2Translator(export(run, tmp_path / "ct2"), threads=1)
    g = random.Random(1)
    letters = run.source.vocab.itos[4:]
    sources = ["".join(g.choice(letters) for _ in range(g.randint(1, 9))) for _ in range(40)]
    ids = [run.source.encode(s) for s in sources]
    ours = [h[0].tokens for h in decode(run, sources, beam=1, nbest=1, batch_size=16)]
    assert 0 < sum(not o for o in ours) < len(ours), "some outputs empty, some not"
    assert [h[0] for h in ct2.translate_ids(ids, beam=1)] == ours
