"""A tiny, fast training setup shared by the resume, guarded-training and distributed tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from transduce.config import Config
from transduce.registry import config_from_dict


def toy_data(folder: Path, n: int = 300, seed: int = 0) -> Path:
    """A reverse-the-letters task as TSV."""
    g = random.Random(seed)
    lines = []
    for _ in range(n):
        seq = [g.choice("abcdefgh") for _ in range(g.randint(3, 7))]
        lines.append(" ".join(seq) + "\t" + " ".join(reversed(seq)) + "\n")
    path = Path(folder) / "toy.tsv"
    path.write_text("".join(lines))
    return path


def toy_raw(data: Path, **train) -> dict:
    """Config dict: a 1+1-layer transformer with dropout (so the RNG matters), deterministic, 1 thread."""
    t = {"batch_tokens": 200, "lr": 3e-3, "warmup_steps": 5, "max_steps": 40, "eval_every": 0, "save_every": 3,
         "log_every": 1, "threads": 1, "deterministic": True, "eval_max_items": 20}
    t.update(train)
    return {"model": {"family": "transformer", "d_model": 16, "heads": 2, "encoder_layers": 1, "decoder_layers": 1,
                      "ff_dim": 32, "dropout": 0.3, "max_positions": 32},
            "data": {"train": str(data), "dev": str(data), "source_tokenizer": {"kind": "whitespace"},
                     "target_tokenizer": {"kind": "whitespace"}},
            "train": t, "eval": {"metrics": ["seq_acc"]}, "decode": {"beam": 1}}


def toy_config(data: Path, **train) -> Config:
    return config_from_dict(toy_raw(data, **train))


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, exact loss) of every logged update, in file order."""
    return [(r["step"], r["loss_exact"]) for r in records(run_dir) if "loss_exact" in r]


def toy_run(folder: Path, **train) -> Path:
    """A trained run of the reverse-the-letters task in `folder`/run (a few seconds on one thread)."""
    from transduce.training.trainer import train as train_run

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = toy_config(toy_data(folder), **{"max_steps": 40, "save_every": 0, "eval_every": 0, **train})
    train_run(cfg, folder / "run", progress=False)
    return folder / "run"
