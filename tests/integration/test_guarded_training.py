"""Guarded training: a non-finite loss or gradient skips the update (schedule and optimizer stand still),
is logged with its batch, and too many in a row stop training with advice, keeping the last good checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

import transduce.training.trainer as trainer
from toyrun import records, toy_config, toy_data, toy_raw, write_config
from transduce.checkpoint import checkpoint_dir, load_tensors, read_json
from transduce.training.schedule import lr_at
from transduce.training.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_data(tmp_path_factory.mktemp("toy"))


class NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def poison(monkeypatch, bad: set[int], how: str = "loss") -> None:
    """Make the model's forward calls numbered in `bad` (1-based) produce a NaN loss or NaN gradients."""
    build = trainer.build_model

    def build_poisoned(*args, **kwargs):
        model = build(*args, **kwargs)
        forward, calls = model.forward, [0]

        def poisoned(batch):
            calls[0] += 1
            out = forward(batch)
            if calls[0] not in bad:
                return out
            return out * float("nan") if how == "loss" else NaNGrad.apply(out)

        model.forward = poisoned
        return model

    monkeypatch.setattr(trainer, "build_model", build_poisoned)


@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_non_finite_update_is_skipped_and_logged(data, tmp_path, monkeypatch, how):
    poison(monkeypatch, {3, 4, 9}, how)
    cfg = toy_config(data, max_steps=10, save_every=0)
    state = train(cfg, tmp_path / "run", progress=False)
    assert state["step"] == 10 and state["stop_reason"] == "max_steps"
    recs = records(tmp_path / "run")
    skipped = [r for r in recs if r.get("skipped")]
    # Logged with the update it would have been and the batch it came from.
    assert [(r["step"], r["epoch"], r["batch"]) for r in skipped] == [(3, 0, 2), (3, 0, 3), (7, 0, 8)]
    assert all(math.isnan(float(r["grad_norm"])) for r in skipped)
    if how == "loss":
        assert all(r["loss"] == "nan" for r in skipped)
    else:
        assert all(math.isfinite(float(r["loss"])) for r in skipped)
    steps = [r for r in recs if "loss_exact" in r]
    # The schedule did not advance on the skipped updates; every update logs a finite gradient norm.
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert [r["lr"] for r in steps] == [lr_at(i, cfg.train) for i in range(10)]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    # The optimizer stepped 10 times, not 13.
    opt = load_tensors(checkpoint_dir(tmp_path / "run", "last") / "optimizer.safetensors")
    assert opt["0.step"].item() == 10


def test_consecutive_non_finite_updates_stop_keeping_last_good_checkpoint(data, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(5, 1000)))
    with pytest.raises(FloatingPointError, match=r"3 consecutive updates .* checkpoints/step-0000004 is kept\. "
                                                 r"Try a lower train\.lr"):
        train(toy_config(data, max_steps=10, save_every=2, max_bad_steps=3), tmp_path / "run", progress=False)
    index = read_json(tmp_path / "run" / "checkpoints" / "index.json")
    assert index["last"] == "step-0000004"
    assert [r["step"] for r in records(tmp_path / "run") if r.get("skipped")] == [5, 5, 5]


def test_huge_learning_rate_stops_with_advice(data, tmp_path, capsys):
    """No monkeypatching: an absurd lr blows the weights up and training stops with a suggestion."""
    from transduce.cli import main

    raw = toy_raw(data, lr=1e36, warmup_steps=1, clip_norm=0.0, max_bad_steps=4, max_steps=30)
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw)), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "4 consecutive updates had a non-finite loss or gradient" in err and "lower train.lr" in err
    assert sum(1 for r in records(tmp_path / "run") if r.get("skipped")) == 4


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 3.0, 100.0])
def test_clip_gradients_is_clip_grad_norm(max_norm):
    # the same norm and the same gradients as torch's clip_grad_norm_, which always multiplies; here
    # the gradients are scaled only when their norm is over max_norm (0: never)
    from transduce.training.trainer import clip_gradients

    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(7, 5), (5,), (3, 4)]]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    a.append(torch.nn.Parameter(torch.ones(2)))  # no gradient: left out of the norm, as torch does
    before = [p.grad.clone() for p in b]
    norm = clip_gradients(a, max_norm)
    ref = float(torch.nn.utils.clip_grad_norm_(b, max_norm or float("inf")))
    assert norm == pytest.approx(ref, rel=1e-6) and 2.0 < norm < 20.0
    for p, q, g0 in zip(a, b, before):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
        assert torch.equal(p.grad, g0) == (not max_norm or norm <= max_norm)
    assert clip_gradients([torch.nn.Parameter(torch.ones(1))], 1.0) == 0.0
