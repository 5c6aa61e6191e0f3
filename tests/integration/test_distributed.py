"""Two gloo processes (`transduce train --nproc 2`, through torch.distributed.run) make the same updates as one
process with the same global batch, including across uneven epochs and a resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from toyrun import losses, records, toy_data, toy_raw, write_config
from transduce.checkpoint import checkpoint_dir, load_tensors, read_checkpoint
from transduce.registry import config_from_dict
from transduce.data.pipeline import epoch_plan
from transduce.training.trainer import prepare, train

ROOT = Path(__file__).resolve().parents[2]


def raw_config(data: Path, **train) -> dict:
    raw = toy_raw(data, save_every=0, deterministic=False, **train)
    raw["model"]["dropout"] = 0.0  # each rank draws its own dropout masks; compare the arithmetic only
    return raw


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    data = toy_data(tmp_path, n=70)
    # One process, two batches per update ...
    single = config_from_dict(raw_config(data, max_steps=6, accum_steps=2))
    _, _, _, encoded = prepare(single, tmp_path, resuming=False)
    plan_sizes = [len(epoch_plan(encoded, 200, 512, single.train.seed, e)) for e in range(3)]
    assert all(n % 2 == 1 for n in plan_sizes)  # uneven: one batch per epoch waits for the next shuffle
    train(single, tmp_path / "single", progress=False)

    # ... and two processes, one batch each per update: 3 steps, killed-and-resumed style, then 3 more.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for steps in (3, 6):
        config = write_config(tmp_path / "ddp.yaml", raw_config(data, max_steps=steps, accum_steps=1))
        p = subprocess.run([sys.executable, "-m", "transduce", "train", str(config), "--out", str(tmp_path / "ddp"),
                            "--nproc", "2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads(p.stdout.strip().splitlines()[-1])["step"] == steps  # printed once, by rank 0
    assert "resuming" in p.stderr

    ddp_ckpt, single_ckpt = checkpoint_dir(tmp_path / "ddp", "last"), checkpoint_dir(tmp_path / "single", "last")
    state, ddp_weights = read_checkpoint(ddp_ckpt)
    _, single_weights = read_checkpoint(single_ckpt)
    assert state["world_size"] == 2 and state["step"] == 6 and state["epoch"] == 2
    assert {"rank0.torch", "rank1.torch"} <= set(load_tensors(ddp_ckpt / "rng.safetensors"))
    for name, w in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], w, rtol=0, atol=1e-6, msg=name)
    # Losses are normalised by the global token count, so they agree too; rank 0 alone logged them.
    ddp_losses, single_losses = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [s for s, _ in ddp_losses] == list(range(1, 7))
    assert all(abs(a[1] - b[1]) < 1e-5 for a, b in zip(ddp_losses, single_losses))
    assert state["tokens"] == read_checkpoint(single_ckpt)[0]["tokens"]
    assert len([r for r in records(tmp_path / "ddp") if "dev" in r]) == 2
