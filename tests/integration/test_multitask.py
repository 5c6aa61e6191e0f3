"""Text-to-text multitask (T5): task prefixes, mixing by weight, per-task metrics, a tiny run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from transduce.cli import main
from transduce.config import ConfigError
from transduce.registry import config_from_dict
from transduce.data.multitask import load_multitask, mixture, quotas, task_of
from transduce.data.pipeline import TokenArray, epoch_plan
from transduce.data.readers import DataError
from transduce.data.datasets import MixedData
from transduce.tasks import MultitaskTask
from transduce.registry import task_for
from transduce.training.trainer import train

torch.set_num_threads(1)

TASKS = [{"name": "g2p", "dataset": "cmudict", "weight": 1.0},
         {"name": "p2g", "dataset": "cmudict", "inverse": True, "weight": 1.0},
         {"name": "num2words", "dataset": "num2words", "langs": ["en", "fr"], "numbers": 60, "max_number": 2000,
          "weight": 0.5}]


def raw(tasks=TASKS, **train) -> dict:
    return {"model": {"family": "transformer", "d_model": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1,
                      "ff_dim": 64, "dropout": 0.0, "max_positions": 128, "share_embeddings": True},
            "data": {"dataset": "multitask", "multitask": {"tasks": tasks},
                     "cmudict": {"max_words": 300, "dev_fraction": 0.1, "test_fraction": 0.1},
                     "max_target_len": 120},
            "train": {"batch_tokens": 1500, "lr": 3e-3, "warmup_steps": 5, "threads": 1, "log_every": 2,
                      "eval_every": 0, **train},
            "eval": {"metrics": ["wer", "cer"]}, "decode": {"beam": 1, "max_len_a": 1.0, "max_len_b": 5}}


# ---------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------

def test_each_epoch_shares_examples_by_weight():
    task_ids = np.array([0] * 50 + [1] * 500 + [2] * 1000)
    weights = (1.0, 2.0, 1.0)
    assert quotas(weights, 1550) == [388, 775, 387] and sum(quotas((0.3, 0.3, 0.4), 7)) == 7
    pool = mixture(task_ids, weights, 0, seed=3)
    assert np.bincount(task_ids[pool], minlength=3).tolist() == [388, 775, 387]
    small = np.bincount(pool[task_ids[pool] == 0], minlength=50)
    assert small.min() == 7 and small.max() == 8            # upsampled: cycles through all its examples
    assert np.bincount(pool[task_ids[pool] == 2]).max() == 1  # downsampled: no repeats
    assert np.array_equal(pool, mixture(task_ids, weights, 0, seed=3))
    assert not np.array_equal(np.sort(pool), np.sort(mixture(task_ids, weights, 0, seed=4)))
    assert np.bincount(task_ids[mixture(task_ids, weights, 200, 0)]).tolist() == [50, 100, 50]


def test_epoch_plan_draws_the_mixture_seeded_by_epoch():
    g = np.random.default_rng(0)
    task_ids = np.repeat([0, 1, 2], [100, 300, 600])
    lengths = g.integers(2, 12, len(task_ids))
    seqs = [[5] * int(n) for n in lengths]
    data = MixedData(TokenArray(seqs), TokenArray(seqs), task_ids, (2.0, 1.0, 1.0), 2000)
    shares = []
    for epoch in range(3):
        plan = epoch_plan(data, 300, 64, 1, epoch)
        drawn = np.array([i for batch in plan for i in batch])
        assert np.bincount(task_ids[drawn]).tolist() == [1000, 500, 500]
        assert plan == epoch_plan(data, 300, 64, 1, epoch)   # a resumed run repeats it
        shares.append(np.sort(drawn))
    assert not np.array_equal(shares[1][-500:], shares[2][-500:])  # the big task: another subset


# ---------------------------------------------------------------------------
# Data and config
# ---------------------------------------------------------------------------

def test_prefixes_inverse_and_num2words_pairs():
    from num2words import num2words

    cfg = config_from_dict(raw())
    assert isinstance(task_for(cfg), MultitaskTask)
    splits = load_multitask(cfg.data)
    by_task = {}
    for p in splits["train"]:
        by_task.setdefault(task_of(p.source), []).append(p)
    assert set(by_task) == {"g2p", "p2g", "num2words"}
    g2p = {(p.source[len("g2p: "):], p.target) for p in by_task["g2p"]}
    p2g = {(p.target, p.source[len("p2g: "):]) for p in by_task["p2g"]}
    assert g2p == p2g and len(g2p) > 200
    for p in by_task["num2words"]:
        lang, digits = p.source[len("num2words: "):].split(" ")
        assert lang in ("en", "fr") and p.target == num2words(int(digits), lang=lang)
    assert {task_of(p.source) for p in splits["dev"]} == {"g2p", "p2g", "num2words"}
    held_out = {p.source for p in splits["test"] if task_of(p.source) != "p2g"}  # (homophones may cross)
    assert held_out and not held_out & {p.source for p in splits["train"]}


@pytest.mark.parametrize("tasks,needle", [
    ([{"name": "g2p", "dataset": "wiki"}],
     "data.multitask.tasks\\[0\\].dataset: invalid choice 'wiki'; valid choices: 'cmudict', 'num2words', 'files'"),
    ([{"name": "g2p", "size": 3}], "data.multitask.tasks\\[0\\].size: unknown key; valid keys here: dataset"),
    ([{"name": "g2p", "langs": ["fr"]}], "langs applies to dataset 'num2words' only"),
    ([{"name": "g2p"}, {"name": "g2p", "inverse": True}], "task names must differ"),
    ([{"name": "g2p: x"}], "give a task name of letters"),
    ([{"name": "g2p", "weight": 0}], "weight must be positive"),
    ([{"name": "n", "dataset": "num2words"}], "needs langs"),
    ([], "dataset 'multitask' needs multitask.tasks"),
])
def test_bad_tasks_are_named(tasks, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(raw(tasks))


def test_unknown_language_lists_the_choices():
    cfg = config_from_dict(raw([{"name": "n", "dataset": "num2words", "langs": ["xx"]}]))
    with pytest.raises(DataError, match="langs: invalid choice 'xx'; valid choices: .*fr"):
        load_multitask(cfg.data)


# ---------------------------------------------------------------------------
# A tiny run: trains on the mixture, evaluates per task
# ---------------------------------------------------------------------------

def test_tiny_multitask_run_reports_each_task(tmp_path, capsys):
    cfg = config_from_dict(raw(max_steps=6))
    state = train(cfg, tmp_path / "run", progress=False)
    assert state["step"] == 6
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    dev = [r["dev"] for r in records if "dev" in r][-1]
    assert set(dev["tasks"]) == {"g2p", "p2g", "num2words"} and "wer" in dev and "cer" in dev
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--beam", "1"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(result["tasks"]) == {"g2p", "p2g", "num2words"}
    for name, part in result["tasks"].items():
        assert set(part) == {"items", "wer", "cer"} and part["items"] > 0
    assert sum(p["items"] for p in result["tasks"].values()) == result["items"]
    assert 0 <= result["wer"] <= 100


def test_recipe_loads():
    from transduce.registry import load_config

    cfg = load_config("recipes/multitask_g2p_p2g_num.yaml")
    assert isinstance(task_for(cfg), MultitaskTask)
    assert [t.name for t in cfg.data.multitask.tasks] == ["g2p", "p2g", "num2words"]
    assert cfg.data.multitask.tasks[2].langs == ["en", "fr", "de", "es"]
