"""Translation on sentence data: one subword tokenizer fitted on both sides (data.joint_tokenizer),
shared embeddings over it, detokenised output and sacreBLEU scores with their signatures."""
from __future__ import annotations

import json
import random

import pytest

from toyrun import toy_raw
from transduce.cli import main
from transduce.config import ConfigError
from transduce.data.pipeline import fit_codecs
from transduce.data.readers import Pair
from transduce.metrics import sacrebleu_scores
from transduce.registry import config_from_dict

WORDS = {"the": "der", "dog": "hund", "runs": "läuft", "cat": "katze", "sleeps": "schläft", "a": "ein",
         "big": "großer", "small": "kleiner", "house": "haus", "stands": "steht"}


def sentence_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    g = random.Random(seed)
    out = []
    for _ in range(n):
        words = [g.choice(list(WORDS)) for _ in range(g.randint(2, 6))]
        out.append((" ".join(words).capitalize() + ".", " ".join(WORDS[w] for w in words).capitalize() + "."))
    return out


def write_aligned(folder, name: str, pairs) -> str:
    src, tgt = folder / f"{name}.en", folder / f"{name}.de"
    src.write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    tgt.write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return f"{src}|{tgt}"


def translation_raw(tmp_path, **train) -> dict:
    raw = toy_raw(tmp_path / "unused", **train)
    raw["data"] = {"train": write_aligned(tmp_path, "train", sentence_pairs(300)),
                   "dev": write_aligned(tmp_path, "val", sentence_pairs(30, seed=1)),
                   "joint_tokenizer": True,
                   "source_tokenizer": {"kind": "bpe", "vocab_size": 60},
                   "target_tokenizer": {"kind": "bpe", "vocab_size": 60}}
    raw["model"].update(share_embeddings=True, tie_output=True, dropout=0.0)
    raw["eval"] = {"metrics": ["bleu", "chrf"]}
    return raw


def test_joint_tokenizer_is_one_tokenizer_and_vocabulary_over_both_sides(tmp_path):
    cfg = config_from_dict(translation_raw(tmp_path))
    train = [Pair(s, t, f"train:{i}") for i, (s, t) in enumerate(sentence_pairs(300))]
    src, tgt = fit_codecs(cfg.data, train, shared=True)
    assert src.vocab.itos == tgt.vocab.itos
    assert src.tokenizer is tgt.tokenizer
    # pieces of both languages are in it, and both sides decode back to their text
    for text in ("The big dog runs.", "Der großer hund läuft."):
        ids = src.encode(text)
        assert src.vocab.itos.index("<unk>") not in ids
        assert tgt.decode(ids) == text


def test_joint_tokenizer_refuses_different_settings_per_side(tmp_path):
    raw = translation_raw(tmp_path)
    raw["data"]["target_tokenizer"]["vocab_size"] = 90
    with pytest.raises(ConfigError, match="target_tokenizer.vocab_size differ"):
        config_from_dict(raw)


def test_sacrebleu_scores_come_with_their_signature():
    scores = sacrebleu_scores(["bleu", "chrf", "wer"], ["Der Hund läuft."], [["Der Hund läuft.", "Ein Hund läuft."]])
    assert set(scores) == {"bleu", "chrf"}
    bleu, sig = scores["bleu"]
    assert bleu == pytest.approx(100.0)
    assert sig.startswith("nrefs:2|") and "tok:13a" in sig and "version:" in sig
    assert scores["chrf"][1].startswith("nrefs:2|")


def test_a_translation_run_trains_and_evaluates_detokenised_with_signatures(tmp_path, capsys):
    import yaml

    raw = translation_raw(tmp_path, max_steps=60, lr=3e-3)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg_path), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--data", raw["data"]["dev"], "--beam", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["items"] == 30 and 0.0 <= result["bleu"] <= 100.0
    assert result["signature"]["bleu"].startswith("nrefs:1|case:mixed")
    assert "chrf" in result["signature"]
    (tmp_path / "in.txt").write_text("The dog runs.\n", encoding="utf-8")
    assert main(["translate", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "in.txt")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "▁" not in line, "output is detokenised text, not pieces"
