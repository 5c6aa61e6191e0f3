"""Using a trained run: load it, translate text, evaluate on a test set."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from transduce.checkpoint import CheckpointError, checkpoint_dir, load_model_tensors, read_checkpoint, read_json
from transduce.config import Config, ConfigError, load_config
from transduce.data.pipeline import group_references, pad
from transduce.data.vocab import PAD, TextCodec
from transduce.search import Hypothesis, search


@dataclass
class LoadedRun:
    config: Config
    model: torch.nn.Module
    source: TextCodec
    target: TextCodec
    state: dict           # training state of the loaded checkpoint
    checkpoint: Path


def load_codecs(run_dir: Path) -> tuple[TextCodec, TextCodec]:
    out = []
    for side in ("source", "target"):
        path = Path(run_dir) / f"{side}_codec.json"
        try:
            out.append(TextCodec.from_dict(read_json(path)))
        except (KeyError, ValueError, TypeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: not a valid codec file ({e})") from None
    return out[0], out[1]


def load_run(run_dir: str | Path, which: str = "best") -> LoadedRun:
    """Rebuild the model of a run directory from its files alone."""
    from transduce.models import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    src, tgt = load_codecs(run_dir)
    ckpt = checkpoint_dir(run_dir, which)
    if ckpt is None:
        raise CheckpointError(f"{run_dir / 'checkpoints' / 'index.json'}: missing (no checkpoint was saved)")
    state, tensors = read_checkpoint(ckpt)
    model = build_model(cfg.model, len(src.vocab), len(tgt.vocab))
    load_model_tensors(model, tensors, ckpt / "model.safetensors")
    model.eval()
    return LoadedRun(cfg, model, src, tgt, state, ckpt)


def decode(run: LoadedRun, sources: list[str], beam: int | None = None, nbest: int | None = None,
           batch_size: int | None = None, model=None) -> list[list[Hypothesis]]:
    """n-best hypotheses for each source, in input order. Empty sources give one empty output."""
    model = model or run.model
    cfg = run.config.decode
    batch_size = batch_size or cfg.batch_size
    ids = [run.source.encode(s) for s in sources]
    out: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] for _ in sources]
    todo = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: len(ids[i]))
    for k in range(0, len(todo), batch_size):
        idx = todo[k: k + batch_size]
        src = pad([ids[i] for i in idx])
        for i, hyps in zip(idx, search(model, src, src != PAD, cfg, beam, nbest)):
            out[i] = hyps
    return out


def translate(run: LoadedRun, sources: list[str], beam: int | None = None, nbest: int | None = None,
              batch_size: int | None = None, model=None) -> list[list[str]]:
    return [[run.target.decode(h.tokens) for h in hyps]
            for hyps in decode(run, sources, beam, nbest, batch_size, model)]


def evaluate_pairs(run: LoadedRun, pairs, metrics: list[str], beam: int | None = None,
                   batch_size: int | None = None, model=None) -> tuple[dict, list[str], list[str]]:
    """Metrics over `pairs` (targets of one source grouped as references)."""
    from transduce import metrics as M

    sources, refs = group_references(pairs)
    hyps = [h[0] for h in translate(run, sources, beam, 1, batch_size, model)]
    return M.compute(metrics, hyps, refs), sources, hyps


def dumps_result(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False)
