"""Run directories and checkpoints: safetensors for tensors, JSON for everything else.

Layout of a run directory:

    config.yaml                resolved config (the model rebuilds from it)
    source_codec.json          tokenizer + vocabulary per side
    target_codec.json
    metrics.jsonl              one JSON object per logged step / evaluation
    checkpoints/index.json     {"last": "step-000100", "best": "step-000050", ...}
    checkpoints/step-000100/   model.safetensors, optimizer.safetensors, state.json

A checkpoint is written into a temporary folder, flushed, renamed into
place, and only then named in index.json (itself replaced atomically), so a
crash at any moment leaves the previous checkpoint intact and never exposes
a partial one. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from transduce.io import atomic_write_json, fsync_dir


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; any malformed file is a CheckpointError naming it."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    with open(path, "rb") as f:
        head = f.read(8)
    size = path.stat().st_size
    if len(head) < 8 or int.from_bytes(head, "little") > min(size - 8, 100 << 20):
        raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


# ---------------------------------------------------------------------------
# Model weights (tied weights are stored once)
# ---------------------------------------------------------------------------

def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with each tied tensor once, under its first name."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = model_tensors(model)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for k, v in tensors.items():
        if expected[k].shape != v.shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(v.shape)}, "
                                  f"the model needs {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------------------
# Optimizer state: tensors to safetensors, the rest to JSON
# ---------------------------------------------------------------------------

def optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{name}"] = val
            else:
                scalars.setdefault(str(pid), {})[name] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, name: str, model, optimizer, state: dict,
                    best: bool, keep: int) -> None:
    """Write checkpoints/<name> atomically, then point index.json at it."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_tensors(model_tensors(model), tmp / "model.safetensors")
        files = ["model.safetensors"]
        if optimizer is not None:
            opt_tensors, opt_meta = optimizer_split(optimizer)
            save_tensors(opt_tensors, tmp / "optimizer.safetensors")
            state = dict(state, optimizer=opt_meta)
            files.append("optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        save_tensors(rng, tmp / "rng.safetensors")
        files.append("rng.safetensors")
        state = dict(state, files={f: _sha256(tmp / f) for f in files})
        atomic_write_json(tmp / "state.json", state)
        for f in files:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        final = ckpt_root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index_path = ckpt_root / "index.json"
    index = read_json(index_path) if index_path.exists() else {}
    index["last"] = name
    if best:
        index["best"] = name
    history = [n for n in index.get("history", []) if n != name] + [name]
    protected = {index["last"], index.get("best")}
    removable = [n for n in history if n not in protected]
    drop = removable[: max(0, len(removable) - max(0, keep - 1))]
    index["history"] = [n for n in history if n not in drop]
    atomic_write_json(index_path, index)
    for n in drop:
        shutil.rmtree(ckpt_root / n, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoint_dir(run_dir: Path, which: str = "best") -> Path | None:
    """The folder of the `best` (falling back to `last`) or `last` checkpoint, or None."""
    index_path = Path(run_dir) / "checkpoints" / "index.json"
    if not index_path.exists():
        return None
    index = read_json(index_path)
    name = index.get(which) or index.get("last")
    if not name:
        raise CheckpointError(f"{index_path}: names no checkpoint")
    path = index_path.parent / name
    if not path.is_dir():
        raise CheckpointError(f"{index_path}: names {name}, but {path} is missing")
    return path


def read_checkpoint(path: Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json contents, model tensors) of one checkpoint folder."""
    state = read_json(path / "state.json")
    if verify:
        for f, digest in state.get("files", {}).items():
            if not (path / f).is_file():
                raise CheckpointError(f"{path / f}: missing")
            if _sha256(path / f) != digest:
                raise CheckpointError(f"{path / f}: checksum does not match state.json (corrupt or altered)")
    return state, load_tensors(path / "model.safetensors")
