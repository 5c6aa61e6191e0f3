"""Encoder-only families: MLM masking, toy classification and tagging, init_from a new head, CLI."""
from __future__ import annotations

import io
import json
import logging
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import make_model
from transduce.checkpoint import checkpoint_dir, read_checkpoint
from transduce.config import ConfigError
from transduce.registry import config_from_dict
from transduce.data.masking import Masking, mask_tokens
from transduce.data.readers import DataError
from transduce.data.vocab import BOS, EOS, PAD
from transduce.runs import load_run
from transduce.inference import translate
from transduce.metrics import entities, tagging_metrics
from transduce.registry import build_model
from transduce.tasks import TagTask
from transduce.registry import task_for
from transduce.training.trainer import train
from transduce.training.warmstart import load_from_run

LETTERS = "abcdefgh"


def tiny_model(family: str, **kw) -> dict:
    return {"family": family, "d_model": 32, "heads": 4, "encoder_layers": 1, "ff_dim": 64, "dropout": 0.0,
            "max_positions": 32, **kw}


def tiny_train(**kw) -> dict:
    return {"batch_tokens": 600, "lr": 3e-3, "warmup_steps": 20, "eval_every": 0, "log_every": 20,
            "label_smoothing": 0.0, "threads": 1, **kw}


def seqs(n: int, seed: int) -> list[list[str]]:
    g = random.Random(seed)
    return [[g.choice(LETTERS) for _ in range(g.randint(3, 8))] for _ in range(n)]


def spam(seq: list[str]) -> str:
    return "spam" if "a" in seq else "ham"


def bio(seq: list[str]) -> list[str]:
    """Runs of a/b are entities: B-X on the first, I-X on the rest."""
    out = []
    for i, t in enumerate(seq):
        inside = t in "ab"
        out.append(("I-X" if i and seq[i - 1] in "ab" else "B-X") if inside else "O")
    return out


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny classifier and tagger, each trained for a few seconds on a toy task."""
    root = tmp_path_factory.mktemp("encoder")
    cls = {s: write(root / f"cls_{s}.tsv", [" ".join(q) + "\t" + spam(q) for q in seqs(n, seed)])
           for s, n, seed in (("train", 2000, 0), ("dev", 200, 1))}
    tag = {s: write(root / f"tag_{s}.tsv", [" ".join(q) + "\t" + " ".join(bio(q)) for q in seqs(n, seed)])
           for s, n, seed in (("train", 2000, 2), ("dev", 200, 3))}
    out = {}
    # The tagger needs two layers: B-X or I-X depends on the previous token.
    for name, family, files, steps, kw in (("classify", "encoder_classifier", cls, 150, {}),
                                           ("tag", "encoder_tagger", tag, 400, {"encoder_layers": 2, "heads": 2})):
        cfg = config_from_dict({
            "model": tiny_model(family, **kw),
            "data": {"train": str(files["train"]), "dev": str(files["dev"]), "test": str(files["dev"]),
                     "source_tokenizer": {"kind": "whitespace"}},
            "train": tiny_train(max_steps=steps),
        })
        train(cfg, root / name, progress=False)
        out[name] = root / name
    out["files"] = {"classify": cls, "tag": tag}
    return out


# ---------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------

def test_masking_follows_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (400, 250), generator=g)
    ids[:, 0], ids[:, -1] = BOS, EOS
    ids[::2, 200:] = PAD
    m = Masking(rate=0.15, mask_token=0.8, random_token=0.1, mask_id=4, vocab_size=300)
    inputs, labels = mask_tokens(ids, m, torch.Generator().manual_seed(1))
    maskable = ids >= 5
    sel = labels != PAD
    assert not (sel & ~maskable).any()                        # specials and padding never selected
    assert torch.equal(labels[sel], ids[sel])                  # labels: the original symbols
    assert torch.equal(inputs[~sel], ids[~sel])                # unselected positions untouched
    n = int(sel.sum())
    assert abs(n / int(maskable.sum()) - 0.15) < 0.005
    masked = inputs[sel] == 4
    unchanged = inputs[sel] == ids[sel]
    random_ = ~masked & ~unchanged
    assert abs(float(masked.float().mean()) - 0.8) < 0.015
    assert abs(float(unchanged.float().mean()) - 0.1) < 0.01   # (+ ~0.05% random draws of the same symbol)
    assert abs(float(random_.float().mean()) - 0.1) < 0.01
    drawn = inputs[sel][random_]
    assert bool(((drawn >= 5) & (drawn < 300)).all())          # random symbols: regular ones only
    again, _ = mask_tokens(ids, m, torch.Generator().manual_seed(1))
    other, _ = mask_tokens(ids, m, torch.Generator().manual_seed(2))
    assert torch.equal(again, inputs) and not torch.equal(other, inputs)


def test_masking_selects_at_least_one_per_sequence():
    ids = torch.tensor([[BOS, 7, EOS, PAD], [9, 8, PAD, PAD], [BOS, EOS, PAD, PAD]])
    m = Masking(rate=0.01, mask_token=0.8, random_token=0.1, mask_id=4, vocab_size=20)
    for seed in range(20):
        _, labels = mask_tokens(ids, m, torch.Generator().manual_seed(seed))
        assert (labels[:2] != PAD).sum(1).tolist() == [1, 1] and not (labels[2] != PAD).any()


# ---------------------------------------------------------------------------
# Toy tasks, init_from, data and config checks
# ---------------------------------------------------------------------------

def test_tiny_classifier_learns_toy_task(runs):
    run = load_run(runs["classify"])
    pairs, _ = task_for(run.config).read(str(runs["files"]["classify"]["dev"]))
    result, rows = task_for(run.config).evaluate(run, pairs, ["accuracy", "macro_f1"])
    assert result["accuracy"] > 95.0, result
    assert json.loads((runs["classify"] / "target_codec.json").read_text())["symbols"][4:] in (
        ["ham", "spam"], ["spam", "ham"])
    dev = [json.loads(line)["dev"] for line in (runs["classify"] / "metrics.jsonl").read_text().splitlines()
           if "dev" in line]
    assert set(dev[-1]) == {"accuracy"}                         # the task's metric during training


def test_tiny_tagger_learns_toy_task(runs):
    run = load_run(runs["tag"])
    pairs, _ = TagTask().read(str(runs["files"]["tag"]["dev"]))
    result, _ = TagTask().evaluate(run, pairs, ["token_accuracy", "entity_f1", "label_f1"])
    assert result["token_accuracy"] > 95.0 and result["entity_f1"] > 90.0, result


def test_mlm_then_classifier_head_from_it(tmp_path, caplog):
    text = write(tmp_path / "text.txt", [" ".join(q) for q in seqs(300, 5)] + [""])
    mlm = config_from_dict({"model": tiny_model("encoder_mlm"),
                            "data": {"train": str(text), "dev": str(text), "source_tokenizer": {"kind": "whitespace"}},
                            "train": tiny_train(max_steps=20, eval_every=10)})
    assert mlm.eval.metrics == ["mlm_loss", "mlm_accuracy"]
    train(mlm, tmp_path / "mlm", progress=False)
    dev = [json.loads(line)["dev"] for line in (tmp_path / "mlm" / "metrics.jsonl").read_text().splitlines()
           if "dev" in line]
    assert len(dev) == 2 and dev[1]["mlm_loss"] < dev[0]["mlm_loss"] and 0 <= dev[1]["mlm_accuracy"] <= 100
    source = json.loads((tmp_path / "mlm" / "source_codec.json").read_text())
    assert source["symbols"][4] == "<mask>"

    labelled = write(tmp_path / "cls.tsv", [" ".join(q) + "\t" + spam(q) for q in seqs(200, 6)])
    cfg = config_from_dict({"model": tiny_model("encoder_classifier"),
                            "data": {"train": str(labelled), "source_tokenizer": {"kind": "char"}},
                            "train": tiny_train(max_steps=2, init_from=str(tmp_path / "mlm"))})
    classifier = build_model(cfg.model, len(source["symbols"]), 6)
    head_before = classifier.head.weight.detach().clone()
    lines = load_from_run(classifier, tmp_path / "mlm")
    assert "newly initialised: head.* (2)" in lines[0]
    assert "transform.* (4)" in lines[0].split("dropped:")[1] and "output.* (1)" in lines[0].split("dropped:")[1]
    _, mlm_tensors = read_checkpoint(checkpoint_dir(tmp_path / "mlm"))
    for k, v in classifier.state_dict().items():
        if k.startswith(("src_embed", "encoder")):
            assert torch.equal(v, mlm_tensors[k]), k
    assert torch.equal(classifier.head.weight, head_before)
    # Through the trainer: the MLM run's source vocabulary is reused (not refitted with kind char).
    with caplog.at_level(logging.INFO, logger="transduce"):
        train(cfg, tmp_path / "cls", progress=False)
    assert json.loads((tmp_path / "cls" / "source_codec.json").read_text()) == source
    assert any("train.init_from" in r.getMessage() and "newly initialised: head.*" in r.getMessage()
               for r in caplog.records)


def test_tag_data_with_wrong_label_count_names_the_line(tmp_path):
    bad = write(tmp_path / "t.tsv", ["a b\tO O", "a b c\tB-X O"])
    with pytest.raises(DataError, match=f"{bad}:2: 3 tokens but 2 labels"):
        TagTask().read(str(bad))
    pairs, report = TagTask().read(str(bad), skip_invalid=True)
    assert len(pairs) == 1 and report.skipped == 1


def test_classification_label_must_be_one_symbol(tmp_path):
    bad = write(tmp_path / "c.tsv", ["a b\tspam", "c d\tnot spam"])
    cfg = config_from_dict({"model": tiny_model("encoder_classifier"), "data": {"train": str(bad)}})
    with pytest.raises(DataError, match=f"{bad}:2: label 'not spam' is not one symbol"):
        task_for(cfg).read(str(bad))


@pytest.mark.parametrize("extra,needle", [
    ({"eval": {"metrics": ["wer"]}}, "eval.metrics: invalid choice 'wer' for model.family 'encoder_tagger'"),
    ({"data": {"train": "x", "target_tokenizer": {"kind": "whitespace"}}}, "data.target_tokenizer: does not apply"),
    ({"data": {"dataset": "cmudict"}}, "data.dataset: 'cmudict' is not tag data"),
])
def test_encoder_config_errors(extra, needle):
    raw = {"model": tiny_model("encoder_tagger"), "data": {"train": "x"}, **extra}
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(raw)


def test_default_metrics_follow_the_family():
    assert config_from_dict({"model": tiny_model("encoder_tagger")}).eval.metrics == ["entity_f1", "token_accuracy"]
    assert config_from_dict({"model": {"family": "transformer"}}).eval.metrics == ["wer", "per"]


def test_entities_and_f1():
    assert entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-PER", "NN"]) == {
        (0, 2, "PER"), (3, 4, "LOC"), (4, 5, "LOC"), (5, 6, "PER"), (6, 7, "NN")}
    r = tagging_metrics(["token_accuracy", "entity_f1", "label_f1"],
                        [["B-X", "I-X", "O", "B-Y"]], [["B-X", "O", "O", "B-Y"]])
    # entities: gold {X 0-2, Y 3}, predicted {X 0-1, Y 3}: 1 right of 2 and 2 -> F1 50
    assert r == {"token_accuracy": 75.0, "entity_f1": 50.0, "label_f1": pytest.approx(100 * (1 + 0 + 1) / 3, abs=1e-3)}


def test_encoder_only_models_do_not_decode(runs):
    run = load_run(runs["classify"])
    assert not make_model("encoder-tagger").can_decode
    with pytest.raises(ValueError, match="no decoder .* use `transduce classify`"):
        translate(run, ["a b"])


# ---------------------------------------------------------------------------
# CLI (in-process: the subprocess path is covered by test_cli.py)
# ---------------------------------------------------------------------------

@pytest.fixture
def cli(capsys, monkeypatch):
    from transduce.cli import main

    def run(*args, stdin: str = "", check: bool = True):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8"))))
        code = main(list(args))
        out, err = capsys.readouterr()
        assert code == 0 or not check, err
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def test_cli_classify_keeps_order_and_empty_lines(runs, cli):
    p = cli("classify", "--model", str(runs["classify"]), stdin="a b c\n\nd e f g\nh a\n")
    assert p.stdout == "spam\n\nham\nspam\n"


def test_cli_tag_writes_tokens_tab_labels(runs, cli, tmp_path):
    src = write(tmp_path / "in.txt", ["c a b d", "", "b   h"])
    p = cli("tag", "--model", str(runs["tag"]), "--input", str(src))
    assert p.stdout == "c a b d\tO B-X I-X O\n\nb h\tB-X O\n"


def test_cli_evaluate_and_wrong_command(runs, cli):
    files = runs["files"]
    r = json.loads(cli("evaluate", "--model", str(runs["tag"]), "--data", str(files["tag"]["dev"]),
                       "--show", "2").stdout.strip().splitlines()[-1])
    assert r["items"] == 200 and set(r) == {"data", "items", "entity_f1", "token_accuracy"}
    r = json.loads(cli("evaluate", "--model", str(runs["classify"])).stdout.strip().splitlines()[-1])
    assert r["data"] == "data:test" and r["accuracy"] > 95.0
    p = cli("tag", "--model", str(runs["classify"]), stdin="a b\n", check=False)
    assert p.returncode == 2 and "use `transduce classify`" in p.stderr
    p = cli("translate", "--model", str(runs["tag"]), stdin="a b\n", check=False)
    assert p.returncode == 2 and "no decoder" in p.stderr
