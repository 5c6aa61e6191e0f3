"""Checkpoint averaging: the mean of the weights, checked against known checkpoints; the averaged
run directory decodes like any other; train.average_last scores the mean on dev; bad input is named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toyrun import records, toy_config, toy_data, write_config, toy_raw
from transduce.checkpoint import (CheckpointError, average_checkpoints, average_run, checkpoint_dir,
                                  read_checkpoint, read_json, save_checkpoint, step_checkpoints)
from transduce.cli import main
from transduce.registry import config_from_dict
from transduce.runs import load_run
from transduce.inference import translate
from transduce.training.trainer import train


class Tiny(torch.nn.Module):
    def __init__(self, fill: float, steps: int = 0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2, 3), fill))
        self.register_buffer("h", torch.full((4,), fill, dtype=torch.bfloat16))
        self.register_buffer("count", torch.tensor([steps]))


def _save(root: Path, name: str, model: torch.nn.Module) -> Path:
    save_checkpoint(root, name, model, None, {"step": 0}, best=False, keep=10, rng={})
    return root / "checkpoints" / name


def test_mean_of_known_checkpoints(tmp_path):
    paths = [_save(tmp_path, f"step-{i}", Tiny(v)) for i, v in enumerate([1.0, 2.0, 6.0])]
    mean = average_checkpoints(paths)
    assert torch.equal(mean["w"], torch.full((2, 3), 3.0))
    assert mean["w"].dtype == torch.float32
    assert mean["h"].dtype == torch.bfloat16 and torch.equal(mean["h"], torch.full((4,), 3.0, dtype=torch.bfloat16))
    assert torch.equal(mean["count"], torch.tensor([0]))
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-0", "step-1", "step-2"]


def test_mismatched_checkpoints_are_named(tmp_path):
    a = _save(tmp_path, "a", Tiny(1.0))
    b = _save(tmp_path, "b", Tiny(1.0, steps=3))
    with pytest.raises(CheckpointError, match=r"b/model.safetensors: tensor count .*differs"):
        average_checkpoints([a, b])
    other = torch.nn.Module()
    other.w = torch.nn.Parameter(torch.zeros(3, 2))
    c = _save(tmp_path, "c", other)
    with pytest.raises(CheckpointError, match=r"c/model.safetensors: holds other tensors"):
        average_checkpoints([a, c])
    with pytest.raises(CheckpointError, match="no checkpoints"):
        average_checkpoints([])


def test_averaged_checkpoint_is_never_last_and_replaces_the_previous_one(tmp_path):
    _save(tmp_path, "step-1", Tiny(1.0))
    save_checkpoint(tmp_path, "average-1", {"w": torch.zeros(1)}, None, {}, best=False, keep=10, rng={},
                    averaged=True)
    index = read_json(tmp_path / "checkpoints" / "index.json")
    assert index["last"] == "step-1" and index["averaged"] == "average-1" and index["history"] == ["step-1"]
    save_checkpoint(tmp_path, "average-2", {"w": torch.zeros(1)}, None, {}, best=True, keep=10, rng={},
                    averaged=True)
    save_checkpoint(tmp_path, "average-3", {"w": torch.zeros(1)}, None, {}, best=False, keep=10, rng={},
                    averaged=True)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert left == ["average-2", "average-3", "step-1"]  # average-1 went; average-2 stays as best
    _save(tmp_path, "step-2", Tiny(2.0))
    assert read_json(tmp_path / "checkpoints" / "index.json")["best"] == "average-2"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("avg")
    run = folder / "run"
    train(toy_config(toy_data(folder), max_steps=30, save_every=10, keep_checkpoints=5), run, progress=False)
    return folder, run


def test_average_command_writes_a_usable_run_directory(toy_run, capsys):
    folder, run = toy_run
    steps = step_checkpoints(run)
    assert [p.name for p in steps][-3:] == ["step-0000010", "step-0000020", "step-0000030"]
    out = folder / "averaged"
    assert main(["average", "--model", str(run), "--last", "3", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["averaged"] == ["step-0000010", "step-0000020", "step-0000030"]
    state, tensors = read_checkpoint(checkpoint_dir(out))
    assert state["averaged_from"] == printed["averaged"] and "optimizer" not in state
    singles = [read_checkpoint(p)[1] for p in steps[-3:]]
    for k, v in tensors.items():
        assert torch.allclose(v, sum(s[k].double() for s in singles).float() / 3, atol=1e-6), k
    assert any(not torch.equal(v, singles[-1][k]) for k, v in tensors.items())
    loaded = load_run(out)
    weights = loaded.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in tensors.items())
    assert len(translate(loaded, ["a b c"], beam=1)) == 1
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["averaged_from"] == printed["averaged"]
    with pytest.raises(CheckpointError, match="not an empty directory"):
        average_run(run, out, 3)
    with pytest.raises(CheckpointError, match=r"lists \d step checkpoint\(s\), fewer than the 9"):
        average_run(run, folder / "other", 9)
    with pytest.raises(ValueError, match="at least 2"):
        average_run(run, folder / "other", 1)
    cfg = write_config(folder / "again.yaml", toy_raw(folder / "toy.tsv", max_steps=40))
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(out)]) != 0
    assert "not a point training can resume from" in capsys.readouterr().err


def _per_config(data: Path, steps: int):
    raw = toy_raw(data, max_steps=steps, save_every=0, eval_every=10, keep_checkpoints=1, average_last=3)
    raw["eval"] = {"metrics": ["per"]}  # lower is better, and fine-grained
    return config_from_dict(raw)


def test_train_average_last_scores_the_mean_on_dev(tmp_path):
    run, data = tmp_path / "run", toy_data(tmp_path)
    state = train(_per_config(data, 30), run, progress=False)
    averaged = [r for r in records(run) if "dev_averaged" in r]
    assert len(averaged) == 1
    assert averaged[0]["averaged_from"] == ["step-0000010", "step-0000020", "step-0000030"]
    index = read_json(run / "checkpoints" / "index.json")
    name = "average-step-0000010-step-0000030"
    assert index["averaged"] == name and index["last"] == "step-0000030"
    assert state["averaged"]["checkpoint"] == name
    dev_single = min(r["dev"]["per"] for r in records(run) if "dev" in r)
    assert state["averaged"]["best"] == (averaged[0]["dev_averaged"]["per"] < dev_single)
    assert (index["best"] == name) == state["averaged"]["best"]
    saved, _ = read_checkpoint(run / "checkpoints" / name)
    assert saved["dev"] == averaged[0]["dev_averaged"]

    # resumed for longer: the best is the best of every evaluation, the averages' included
    state = train(_per_config(data, 50), run, progress=False)
    scores = [r["dev"]["per"] for r in records(run) if "dev" in r]
    scores += [r["dev_averaged"]["per"] for r in records(run) if "dev_averaged" in r]
    assert state["best"] == min(scores)
    index = read_json(run / "checkpoints" / "index.json")
    assert index["averaged"] == "average-step-0000030-step-0000050"
    kept = {p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("average-")}
    assert index["averaged"] in kept
    assert (name in kept) == (index["best"] == name)  # the first average stays only as the best


def test_resume_keeps_an_average_that_is_best(tmp_path):
    """The last step checkpoint predates the average made best after it: resuming must not forget it."""
    run, data = tmp_path / "run", toy_data(tmp_path)
    train(_per_config(data, 20), run, progress=False)
    state, tensors = read_checkpoint(checkpoint_dir(run, "last"))
    save_checkpoint(run, "average-perfect", tensors, None, dict(state, averaged_from=["x"], dev={"per": 0.0}),
                    best=True, keep=1, rng={}, averaged=True)
    state = train(_per_config(data, 40), run, progress=False)
    assert state["best"] == 0.0 and not state["averaged"]["best"]
    assert read_json(run / "checkpoints" / "index.json")["best"] == "average-perfect"


def test_average_last_of_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="average_last must be 0"):
        toy_config(toy_data(tmp_path), average_last=1)
