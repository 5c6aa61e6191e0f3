"""Where a fresh run's weights come from before step 1 (never on resume).

- `train.init_from: RUN_DIR`: that run's best checkpoint, or a Hugging Face
  BART or Marian folder (export/huggingface.py), whose model options must be
  the run's. Tensors load by
  name where the names match; the model's own tensors the run lacks (a new
  head) keep their fresh initialisation, and the run's tensors this model
  lacks (e.g. an MLM head) are dropped. Both are logged. A tensor whose
  shape differs is an error, and so is a run sharing no tensor at all.
- `model.init_encoder`: a pretrained checkpoint outside transduce (the
  model's `init_pretrained`; models/bert.py).
"""
from __future__ import annotations

from pathlib import Path

from transduce.checkpoint import CheckpointError, checkpoint_dir, model_tensors, read_checkpoint
from transduce.config import ConfigError


def _names(keys: list[str]) -> str:
    """Tensor names grouped by their first component: 'head.* (2)'."""
    groups: dict[str, int] = {}
    for k in keys:
        groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0) + 1
    return ", ".join(f"{g}.* ({n})" for g, n in groups.items()) or "none"


def _hf_tensors(model, folder: Path) -> dict:
    """A Hugging Face folder's tensors under our names, once its options are checked against the model's."""
    import dataclasses

    from transduce.export.huggingface import read_folder

    imp = read_folder(folder)
    ours, theirs = dataclasses.asdict(model.config), dataclasses.asdict(imp.model_config)
    skip = {"dropout", "attention_dropout", "activation_dropout", "init_encoder", "init_decoder"}
    diffs = [f"model.{k}: {ours[k]!r} (the checkpoint's: {theirs[k]!r})" for k in ours
             if k not in skip and k in theirs and ours[k] != theirs[k]]
    if diffs:
        raise ConfigError(f"train.init_from {folder}: the model config differs from the checkpoint's: "
                          + "; ".join(diffs) + " (`transduce import` writes its config)")
    return imp.tensors


def load_from_run(model, run_dir: Path) -> list[str]:
    from transduce.export.huggingface import is_hf_folder

    if is_hf_folder(run_dir):
        init, tensors = Path(run_dir), _hf_tensors(model, Path(run_dir))
    else:
        init = checkpoint_dir(Path(run_dir), "best")
        if init is None:
            raise CheckpointError(f"{run_dir}: train.init_from names a run with no checkpoint")
        _, tensors = read_checkpoint(init)
    where = init / "model.safetensors"
    expected = model_tensors(model)
    for k, v in tensors.items():
        if k in expected and expected[k].shape != v.shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(v.shape)}, the model needs "
                                  f"{tuple(expected[k].shape)}")
    loaded = {k: v for k, v in tensors.items() if k in expected}
    if not loaded:
        raise CheckpointError(f"{where}: no tensor fits the model (a different family or layout?)")
    model.load_state_dict(loaded, strict=False)
    new = [k for k in expected if k not in tensors]
    dropped = [k for k in tensors if k not in expected]
    return [f"train.init_from {init}: loaded {len(loaded)} of the model's {len(expected)} tensors; "
            f"newly initialised: {_names(new)}; dropped: {_names(dropped)}"]


def initial_weights(model, cfg, source, target) -> list[str]:
    """Load `train.init_from` or the model's pretrained checkpoint; returns lines for the log."""
    if cfg.train.init_from:
        if getattr(cfg.model, "init_encoder", None):
            raise ConfigError("train.init_from and model.init_encoder both name starting weights; keep one")
        return load_from_run(model, Path(cfg.train.init_from))
    return model.init_pretrained(source, target)
