"""End-to-end smoke tests: a tiny model learns to copy and to reverse within seconds."""
from __future__ import annotations

import random

import pytest

from transduce.registry import config_from_dict
from transduce.inference import evaluate_pairs
from transduce.runs import load_run
from transduce.data.readers import read_tsv
from transduce.training.trainer import train


def toy_file(path, n, seed, fn):
    g = random.Random(seed)
    lines = []
    for _ in range(n):
        seq = [g.choice("abcdefgh") for _ in range(g.randint(3, 7))]
        lines.append(" ".join(seq) + "\t" + " ".join(fn(seq)) + "\n")
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize("task,fn", [("copy", lambda s: s), ("reverse", lambda s: s[::-1])])
def test_tiny_transformer_learns_toy_task(tmp_path, task, fn):
    train_f = toy_file(tmp_path / "train.tsv", 3000, 0, fn)
    dev_f = toy_file(tmp_path / "dev.tsv", 200, 1, fn)
    cfg = config_from_dict({
        "model": {"family": "transformer", "d_model": 64, "heads": 4, "encoder_layers": 2,
                  "decoder_layers": 2, "ff_dim": 128, "dropout": 0.0, "max_positions": 32},
        "data": {"train": str(train_f), "dev": str(dev_f), "test": str(dev_f),
                 "source_tokenizer": {"kind": "whitespace"}, "target_tokenizer": {"kind": "whitespace"}},
        "train": {"batch_tokens": 1200, "lr": 3e-3, "warmup_steps": 50, "max_steps": 600,
                  "eval_every": 300, "log_every": 50, "label_smoothing": 0.0, "threads": 1},
        "decode": {"beam": 1},
        "eval": {"metrics": ["seq_acc"]},
    })
    train(cfg, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    pairs, _ = read_tsv(dev_f)
    result, _, _ = evaluate_pairs(run, pairs, ["seq_acc"], beam=1)
    assert result["seq_acc"] > 95.0, result
