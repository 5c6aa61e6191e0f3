"""Metrics: multi-reference WER/PER, stress stripping, CER, sacrebleu scores."""
from __future__ import annotations

import pytest

from transduce import metrics as M


def test_edit_distance():
    assert M.edit_distance([], []) == 0
    assert M.edit_distance(list("kitten"), list("sitting")) == 3
    assert M.edit_distance(["A"], []) == 1


def test_wer_per_multi_reference():
    hyps = ["K AE1 T", "D AO1 G", "F UW1"]
    refs = [["K AE2 T", "K AE1 T"],      # matches the second reference
            ["D AA1 G"],                 # one substitution of 3
            ["F UW1 B AA1 R"]]           # three deletions of 5
    r = M.compute(["wer", "per", "seq_acc"], hyps, refs)
    assert r["wer"] == pytest.approx(200 / 3, abs=1e-3)
    assert r["seq_acc"] == pytest.approx(100 / 3, abs=1e-3)
    # PER against the closest reference: 0 + 1 + 3 edits over 3 + 3 + 5 phonemes
    assert r["per"] == pytest.approx(100 * 4 / 11, abs=1e-3)


def test_nostress_and_cer():
    r = M.compute(["wer", "wer_nostress", "per_nostress", "cer"], ["K AE2 T"], [["K AE1 T"]])
    assert r["wer"] == 100.0 and r["wer_nostress"] == 0.0 and r["per_nostress"] == 0.0
    assert r["cer"] == pytest.approx(100 / 7, abs=1e-3)


def test_bleu_chrf():
    good = M.compute(["bleu", "chrf"], ["the cat sat on the mat"], [["the cat sat on the mat"]])
    bad = M.compute(["bleu", "chrf"], ["a dog ran"], [["the cat sat on the mat"]])
    assert good["bleu"] == pytest.approx(100.0) and good["chrf"] == pytest.approx(100.0)
    assert bad["bleu"] < 10 and bad["chrf"] < good["chrf"]


def test_is_better():
    assert M.is_better("wer", 10.0, 20.0) and not M.is_better("wer", 30.0, 20.0)
    assert M.is_better("bleu", 30.0, 20.0) and M.is_better("bleu", 1.0, None)
