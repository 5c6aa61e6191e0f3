"""Learning-rate schedules: the pure function, and decay over a time budget."""
from __future__ import annotations

import math
import os

import pytest

from toyrun import records, toy_config, toy_data
from transduce.checkpoint import checkpoint_dir, read_checkpoint
from transduce.config import TrainConfig
from transduce.training.schedule import lr_at
from transduce.training.trainer import train


def test_schedules_warm_up_then_decay():
    inv = TrainConfig(lr=1e-3, warmup_steps=10, schedule="inverse_sqrt")
    cos = TrainConfig(lr=1e-3, warmup_steps=10, schedule="cosine", max_steps=110, min_lr_ratio=0.1)
    assert [lr_at(s, inv) for s in (0, 4, 9)] == [1e-4, 5e-4, 1e-3]
    assert math.isclose(lr_at(39, inv), 1e-3 * math.sqrt(10 / 40))
    assert math.isclose(lr_at(59, cos), 1e-4 + 9e-4 * 0.5)          # half-way: halfway to the floor
    assert math.isclose(lr_at(109, cos), 1e-4) and math.isclose(lr_at(500, cos), 1e-4)
    assert math.isclose(lr_at(59, cos, total_steps=210), 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_over_a_time_budget_follows_the_clock(tmp_path, schedule):
    """With max_minutes and no max_steps, the decay starts at the end of warmup (saved in the
    checkpoint) and follows the share of the time budget used, so it ends with the budget whatever
    the speed: the learning rate only goes down, and is near the floor by the last update."""
    data = toy_data(tmp_path)
    cfg = toy_config(data, max_steps=0, max_minutes=0.05, schedule=schedule, warmup_steps=5, save_every=0,
                     deterministic=False)
    state = train(cfg, tmp_path / "run", progress=False)
    start = state["decay_start_s"]
    assert 0 < start < 3.0
    logged = [r for r in records(tmp_path / "run") if "lr" in r]
    if os.path.exists("/proc/stat"):  # the host's steal share rides along with tokens/s (Linux),
        steal = [r["cpu_steal"] for r in logged if "cpu_steal" in r]  # where a clock tick passed
        assert steal and all(0.0 <= x <= 1.0 for x in steal)
    lrs = [r["lr"] for r in logged]
    assert lrs[4] == max(lrs) == 3e-3                             # the peak at the last warmup update
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))          # then it only goes down
    assert lrs[-1] < lrs[5]
    # Each update's rate is the schedule's at the clock when it started: after the previous update was
    # logged and before its own log line (elapsed_s is rounded to 0.1 s). A slow host changes how far
    # the rate gets by the last update, never this.
    budget = cfg.train.max_minutes * 60

    def rate(clock: float) -> float:
        return lr_at(cfg.train.warmup_steps, cfg.train, progress=min(1.0, max(0.0, (clock - start) / (budget - start))))

    for prev, rec in zip(logged[5:], logged[6:]):
        assert rate(rec["elapsed_s"] + 0.05) - 1e-12 <= rec["lr"] <= rate(prev["elapsed_s"] - 0.05) + 1e-12
    assert logged[-1]["elapsed_s"] >= budget - 0.05                # it trained until the budget ran out
    saved = read_checkpoint(checkpoint_dir(tmp_path / "run", "last"))[0]
    assert saved["decay_start_s"] == start


def test_linear_decays_to_the_floor_in_a_straight_line():
    lin = TrainConfig(lr=1e-3, warmup_steps=10, schedule="linear", max_steps=110, min_lr_ratio=0.1)
    assert lr_at(9, lin) == 1e-3                                  # the peak at the last warmup update
    assert math.isclose(lr_at(34, lin), 1e-4 + 9e-4 * 0.75)        # a quarter of the way down
    assert math.isclose(lr_at(59, lin), 1e-4 + 9e-4 * 0.5)
    assert math.isclose(lr_at(109, lin), 1e-4) and math.isclose(lr_at(500, lin), 1e-4)
    assert math.isclose(lr_at(50, lin, progress=0.25), 1e-4 + 9e-4 * 0.75)


def test_cosine_progress_overrides_the_step_count():
    cos = TrainConfig(lr=1e-3, warmup_steps=10, schedule="cosine", max_steps=110)
    assert lr_at(50, cos, progress=0.0) == 1e-3 and lr_at(50, cos, progress=2.0) == 0.0
    assert math.isclose(lr_at(50, cos, progress=0.5), 0.5e-3)
    assert lr_at(3, cos, progress=0.9) == 4e-4                    # warmup is by steps regardless
