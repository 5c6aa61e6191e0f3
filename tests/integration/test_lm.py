"""Decoder-only and prefix-LM: the mask position by position, plain-text data, perplexity, generate.

The shared checks (padding, cache, beams, save/load, exact search) run on
these families through TINY_MODELS in conftest.py; these are the rest.
"""
from __future__ import annotations

import io
import json
import math
import random
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from transduce.config import ConfigError
from transduce.registry import config_from_dict, load_config
from transduce.data.pipeline import Batch, pad
from transduce.data.readers import DataError, Pair, read_text
from transduce.data.vocab import BOS, EOS, PAD
from transduce.inference import LoadedRun, generate, perplexity
from transduce.runs import load_run
from transduce.models.lm import attention_mask, sequence_positions


def grid(rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows.split()])


# Columns: s0 s1 <pad> t0 t1 (row 0: a 2-token source padded to 3) and s0 s1 s2 t0 t1 (row 1).
SRC_MASK = torch.tensor([[True, True, False], [True, True, True]])
EXPECTED = {
    False: [  # decoder-only: causal everywhere; padding keys hidden; each query sees itself
        grid("10000 11000 11100 11010 11011"),
        grid("10000 11000 11100 11110 11111"),
    ],
    True: [   # prefix-LM: every query sees the whole (real) source; target causal
        grid("11000 11000 11100 11010 11011"),
        grid("11100 11100 11100 11110 11111"),
    ],
}


@pytest.mark.parametrize("bidirectional", [False, True])
def test_attention_mask_position_by_position(bidirectional):
    m = attention_mask(SRC_MASK, 2, bidirectional)
    assert m.shape == (2, 5, 5) and m.dtype == torch.bool
    for row in range(2):
        for q in range(5):
            for k in range(5):
                assert bool(m[row, q, k]) == bool(EXPECTED[bidirectional][row][q, k]), (row, q, k)
    # The source-only mask (what `encode` uses) is the top-left block.
    assert torch.equal(attention_mask(SRC_MASK, 0, bidirectional), m[:, :3, :3])


def test_positions_skip_source_padding():
    assert sequence_positions(SRC_MASK, 2).tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 3, 4]]
    assert sequence_positions(torch.zeros(2, 0, dtype=torch.bool), 3).tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("name,sees_later_source", [("decoder-only", False), ("prefix-lm", True)])
def test_source_reads_one_way_or_both(name, sees_later_source):
    model = make_model(name)
    src = torch.tensor([[5, 6, 7, 8]])
    changed = torch.tensor([[5, 6, 7, 9]])
    mask = src > 0
    with torch.no_grad():
        a, b = model.encode(src, mask), model.encode(changed, mask)
    k_a, k_b = a.kv[-1][0], b.kv[-1][0]             # top layer keys (1, H, S, dh)
    assert torch.allclose(k_a[:, :, 3], k_b[:, :, 3]) is False   # the changed position itself
    assert torch.allclose(k_a[:, :, :3], k_b[:, :, :3]) is not sees_later_source


@pytest.mark.parametrize("name", ["decoder-only", "prefix-lm"])
def test_target_is_causal_and_conditioned_on_source(name):
    model = make_model(name)
    src = torch.tensor([[5, 6, 7]])
    tgt = torch.tensor([[BOS, 4, 5, 6]])
    labels = torch.tensor([[4, 5, 6, EOS]])
    with torch.no_grad():
        base = model(Batch(src, src > 0, tgt, labels))
        later = model(Batch(src, src > 0, torch.tensor([[BOS, 4, 9, 6]]), labels))
        other_src = model(Batch(torch.tensor([[8, 6, 7]]), src > 0, tgt, labels))
    assert base.shape == (1, 4, 11)                 # logits only at target positions, aligned with labels
    torch.testing.assert_close(base[:, :2], later[:, :2])
    assert not torch.allclose(base[:, 2:], later[:, 2:])
    assert not torch.allclose(base, other_src)


def lm_batch(b=4, seed=0) -> Batch:
    """Plain-text LM batch: empty sources (B, 0)."""
    g = random.Random(seed)
    tgts = [[g.randrange(4, 11) for _ in range(g.randint(1, 9))] for _ in range(b)]
    src = torch.zeros(b, 0, dtype=torch.long)
    return Batch(src, src != PAD, pad([[BOS] + t for t in tgts]), pad([t + [EOS] for t in tgts]))


@pytest.mark.parametrize("name", ["decoder-only", "prefix-lm"])
def test_language_model_without_source(name):
    """Empty sources: padding invariance and cache == full forward."""
    model = make_model(name)
    batch = lm_batch(5)
    with torch.no_grad():
        full = model(batch)
        for i in range(5):
            t = int((batch.labels[i] != PAD).sum())
            one = Batch(batch.src[i: i + 1], batch.src_mask[i: i + 1], batch.tgt_in[i: i + 1, :t],
                        batch.labels[i: i + 1, :t])
            torch.testing.assert_close(full[i, :t], model(one)[0], atol=1e-5, rtol=1e-4)
        state = model.init_state(model.encode(batch.src, batch.src_mask), 1, batch.tgt_in.shape[1])
        steps = []
        for t in range(batch.tgt_in.shape[1]):
            logits, state = model.step(batch.tgt_in[:, t], state)
            steps.append(logits)
    real = batch.labels != PAD
    torch.testing.assert_close(torch.stack(steps, 1)[real], full[real], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# Config and data
# ---------------------------------------------------------------------------

def lm_config(tmp_path, **data):
    return {"model": {"family": "decoder_only", "d_model": 32, "heads": 2, "layers": 1, "ff_dim": 64,
                      "max_positions": 64},
            "data": {"train": str(tmp_path / "t.txt"), "format": "text", "max_target_len": 64, **data}}


def test_config_single_vocabulary_and_checks(tmp_path):
    cfg = config_from_dict(lm_config(tmp_path))
    assert cfg.model.share_embeddings is True and "share_embeddings" not in cfg.to_dict()["model"]
    bad = lm_config(tmp_path)
    bad["model"]["share_embeddings"] = False
    with pytest.raises(ConfigError, match="model.share_embeddings: unknown key"):
        config_from_dict(bad)
    bad = lm_config(tmp_path)
    bad["model"]["family"] = "transformer"
    del bad["model"]["layers"]
    with pytest.raises(ConfigError, match="data.format: 'text'.*decoder_only, prefix_lm"):
        config_from_dict(bad)
    with pytest.raises(ConfigError, match="max_positions=64 is shorter .* \\(65 ="):
        config_from_dict(lm_config(tmp_path, max_target_len=65))
    with pytest.raises(ConfigError, match="format 'text'.*dataset 'cmudict'"):
        config_from_dict(lm_config(tmp_path, dataset="cmudict"))
    with pytest.raises(ConfigError, match="not 'src_file\\|tgt_file'"):
        config_from_dict(lm_config(tmp_path, dev="a|b"))
    with pytest.raises(ConfigError, match="layers must be at least 1"):
        load_config("recipes/g2p_cmudict_prefixlm.yaml", ["model.layers=0"])
    # Pairs: source + target must fit.
    with pytest.raises(ConfigError, match="max_positions=100 is shorter .* \\(128 ="):
        load_config("recipes/g2p_cmudict_prefixlm.yaml", ["model.max_positions=100"])


def test_read_text_reports_file_and_line(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xef\xbb\xbfone line\r\n\nthird \xff line\nlast\n")
    with pytest.raises(DataError, match=f"{f}:3: invalid UTF-8"):
        read_text(f)
    pairs, report = read_text(f, skip_invalid=True)   # the blank line 2 separates documents
    assert pairs == [Pair("", "one line", f"{f}:1"), Pair("", "last", f"{f}:4")]
    assert report.skipped == 1 and f"{f}:3: invalid UTF-8" in report.first_problems[0]


def test_perplexity_is_exp_mean_token_loss(tmp_path):
    cfg = config_from_dict(lm_config(tmp_path))
    from transduce.data.pipeline import fit_codecs

    pairs = [Pair("", t, f"x:{i}") for i, t in enumerate(["abc", "a", "cabbage", "bad cab"])]
    src, tgt = fit_codecs(cfg.data, pairs, shared=True)
    torch.manual_seed(0)
    from transduce.registry import build_model

    model = build_model(cfg.model, len(src.vocab), len(tgt.vocab)).eval()
    run = LoadedRun(cfg, model, src, tgt, {}, tmp_path)
    nll, n = 0.0, 0
    with torch.no_grad():
        for p in pairs:
            ids = tgt.encode(p.target)
            logits = model(Batch(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool),
                                 torch.tensor([[BOS] + ids]), torch.tensor([ids + [EOS]])))
            nll += float(F.cross_entropy(logits[0], torch.tensor(ids + [EOS]), reduction="sum"))
            n += len(ids) + 1
    assert perplexity(run, pairs) == pytest.approx(math.exp(nll / n), rel=1e-5)


# ---------------------------------------------------------------------------
# End to end: a tiny LM learns "each letter is followed by the next one"
# ---------------------------------------------------------------------------

LETTERS = "abcdefghijklmnop"


def runs_of_letters(path, n, seed):
    g = random.Random(seed)
    lines = []
    for _ in range(n):
        start = g.randrange(0, len(LETTERS) - 3)
        lines.append(LETTERS[start: start + g.randint(3, len(LETTERS) - start)])
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from transduce.training.trainer import train

    d = tmp_path_factory.mktemp("lm")
    runs_of_letters(d / "train.txt", 2000, 0)
    runs_of_letters(d / "dev.txt", 50, 1)
    cfg = config_from_dict({
        "model": {"family": "decoder_only", "d_model": 32, "heads": 2, "layers": 2, "ff_dim": 64,
                  "dropout": 0.0, "max_positions": 48},
        "data": {"train": str(d / "train.txt"), "dev": str(d / "dev.txt"), "format": "text",
                 "max_target_len": 32, "target_tokenizer": {"kind": "char"}},
        "train": {"batch_tokens": 600, "lr": 3e-3, "warmup_steps": 20, "max_steps": 120, "eval_every": 60,
                  "log_every": 20, "label_smoothing": 0.0, "threads": 1},
        "decode": {"max_len_b": 20},
        "eval": {"metrics": ["ppl"]},
    })
    train(cfg, d / "run", progress=False)
    return d / "run"


def test_lm_trains_with_dev_perplexity(lm_run):
    records = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    dev = [r["dev"]["ppl"] for r in records if "dev" in r]
    assert len(dev) == 2 and dev[-1] < dev[0] and dev[-1] < 4.0   # vocabulary of 20: uniform ppl 20


def test_generate_continues_the_prompt(lm_run):
    run = load_run(lm_run)
    assert generate(run, "cde", max_len=3)[0].startswith("cdefgh")
    beams = generate(run, "ghi", beam=4, num=3, max_len=3)
    assert len(beams) == 3 and all(b.startswith("ghi") for b in beams) and beams[0].startswith("ghijkl")
    a = generate(run, "b", sampling=True, num=4, seed=7, temperature=1.5)
    assert a == generate(run, "b", sampling=True, num=4, seed=7, temperature=1.5) and len(a) == 4
    assert all(s.startswith("b") for s in a)
    assert generate(run, "b", sampling=True, top_k=1, max_len=5) == generate(run, "b", max_len=5)
    with pytest.raises(ValueError, match="no beam"):
        generate(run, "b", sampling=True, beam=2)


def test_generate_command(lm_run):
    from transduce.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["generate", "--model", str(lm_run), "--prompt", "cde", "--sample", "--seed", "3",
                     "--num", "2", "--top-p", "0.9", "--max-len", "4"]) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("cde") for line in lines)
    again = io.StringIO()
    with redirect_stdout(again):
        main(["generate", "--model", str(lm_run), "--prompt", "cde", "--sample", "--seed", "3",
              "--num", "2", "--top-p", "0.9", "--max-len", "4"])
    assert again.getvalue() == out.getvalue()
