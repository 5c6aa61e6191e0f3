"""Run directories and checkpoints: safetensors for tensors, JSON for everything else.

Layout of a run directory:

    config.yaml                resolved config (the model rebuilds from it)
    source_codec.json          tokenizer + vocabulary per side
    target_codec.json
    metrics.jsonl              one JSON object per logged step / evaluation
    checkpoints/index.json     {"last": "step-000100", "best": "step-000050", ...}
    checkpoints/step-000100/   model.safetensors, optimizer.safetensors, rng.safetensors,
                               source_codec.json, target_codec.json, state.json

state.json holds the training position (step, epoch, batch within the
epoch), the resolved config, a fingerprint (hashes of config and
vocabularies, checked on resume) and a SHA-256 of every other file.
rng.safetensors holds every random-number generator that training draws
from (torch, CUDA, Python `random`, NumPy), per process.

A checkpoint is written into a temporary folder, flushed, renamed into
place, and only then named in index.json (itself replaced atomically), so a
crash at any moment leaves the previous checkpoint intact and never exposes
a partial one. Nothing is ever unpickled: weights are parsed as safetensors
after checking the header ourselves, and pickle-based files
(`pytorch_model.bin`, `*.pt`) are refused with an explanation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from transduce.io import atomic_write_json, fsync_dir

log = logging.getLogger("transduce")


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used; the message names the file."""


class RunDirWriteError(CheckpointError):
    """A run directory that cannot be written (no permission, disk full); what was saved stays intact."""


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
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge numbers
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 << 20
# Files that PyTorch and others write with pickle; loading one can run arbitrary code.
PICKLE_NAMES = ("pytorch_model.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.bin")


def _refuse_pickle(path: Path, head: bytes) -> None:
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a Python pickle"
    elif head[:4] == b"PK\x03\x04":
        kind = "a zip archive (the torch.save format, which holds a pickle)"
    else:
        return
    raise CheckpointError(f"{path}: is {kind}, not safetensors; transduce never unpickles files, because "
                          "unpickling can run arbitrary code. Convert trusted weights to safetensors.")


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's layout without trusting it; CheckpointError names the file.

    Layout: 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}}, then the tensor data,
    which the offsets must cover exactly, each span matching shape x dtype.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        _refuse_pickle(path, head)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, truncated)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit the "
                                  f"{size}-byte file; truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPE_BYTES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
        if offsets[1] > data_len:
            raise CheckpointError(f"{where}: data ends at byte {offsets[1]}, past the {data_len} bytes of "
                                  "data in the file (truncated?)")
        need = math.prod(shape) * _DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != need:
            raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} bytes of data, but shape {shape} "
                                  f"of {dtype} needs {need}")
        spans.append((offsets[0], offsets[1]))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise CheckpointError(f"{path}: tensor data overlaps or leaves gaps at byte {covered}")
        covered = end
    if covered != data_len:
        raise CheckpointError(f"{path}: {data_len - covered} bytes after the last tensor (not safetensors)")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; any malformed file is a CheckpointError naming it."""
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file; a failed write (disk full, no permission) is an OSError."""
    from safetensors.torch import save_file

    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except OSError:
        raise
    except Exception as e:  # safetensors reports I/O failures as SafetensorError("... (os error 28) ...")
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


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
# Random-number generators: every one training may draw from
# ---------------------------------------------------------------------------

def rng_state(device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """This process's generator states as fixed-size tensors (torch, CUDA, Python, NumPy)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([py_version, *py_state], dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor(np.asarray(np_keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.device(device).type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(tensors["torch"])
    if "python" in tensors:
        py = tensors["python"].tolist()
        has_gauss, gauss = tensors["python_gauss"].tolist()
        random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), gauss if has_gauss else None))
    if "numpy" in tensors:
        pos, has_gauss, gauss = tensors["numpy_extra"].tolist()
        np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), int(pos),
                             int(has_gauss), gauss))
    if "cuda" in tensors and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"], device)


# ---------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, name: str, model, optimizer, state: dict,
                    best: bool, keep: int, rng: dict[str, torch.Tensor] | None = None,
                    texts: dict[str, str] | None = None, averaged: bool = False) -> None:
    """Write checkpoints/<name> atomically, then point index.json at it.

    `model`: the module, or its tensors (as `average_checkpoints` gives);
    `rng`: generator states to store (default: this process's, as rank 0);
    `texts`: further small files (the codecs), checksummed like the rest.
    `averaged`: weights averaged over checkpoints, not a point training can
    resume from: named in the index as "averaged" (and "best" if `best`),
    never as "last", and kept out of the history; the previous averaged
    checkpoint goes unless it is still the best.
    An OSError (disk full, no permission) leaves no trace and the previous
    checkpoint and index.json untouched.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_tensors(model if isinstance(model, dict) else model_tensors(model), tmp / "model.safetensors")
        files = ["model.safetensors"]
        if optimizer is not None:
            opt_tensors, opt_meta = optimizer_split(optimizer)
            save_tensors(opt_tensors, tmp / "optimizer.safetensors")
            state = dict(state, optimizer=opt_meta)
            files.append("optimizer.safetensors")
        if rng is None:
            rng = {f"rank0.{k}": v for k, v in rng_state().items()}
        save_tensors(rng, tmp / "rng.safetensors")
        files.append("rng.safetensors")
        for fname, text in (texts or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
            files.append(fname)
        for f in files:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        state = dict(state, files={f: _sha256(tmp / f) for f in files})
        atomic_write_json(tmp / "state.json", state)
        fsync_dir(tmp)
        final = ckpt_root / name
        if final.exists():  # an unindexed leftover of a crash between rename and index update
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index_path = ckpt_root / "index.json"
    index = read_json(index_path) if index_path.exists() else {}
    roles = ("last", "best", "averaged")
    before = {index.get(r) for r in roles} | set(index.get("history", []))
    history = index.get("history", [])
    if averaged:
        index["averaged"] = name
    else:
        index["last"] = name
        history = [n for n in history if n != name] + [name]
    if best:
        index["best"] = name
    protected = {index.get(r) for r in roles}
    removable = [n for n in history if n not in protected]
    index["history"] = [n for n in history if n not in removable[: max(0, len(removable) - max(0, keep - 1))]]
    # whatever the index no longer names goes (a step checkpoint past `keep`, an averaged one
    # neither best nor the latest average)
    drop = sorted(n for n in before - protected - set(index["history"]) - {None, name})
    atomic_write_json(index_path, index)
    for n in drop:  # renamed first, so a crash never leaves a half-deleted checkpoint under its name
        if (ckpt_root / n).is_dir():
            os.rename(ckpt_root / n, ckpt_root / f".tmp-drop-{n}")
    for stale in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoint_dir(run_dir: Path, which: str = "best") -> Path | None:
    """The folder of the `best` (falling back to `last`) or `last` checkpoint, or None.

    Only complete checkpoints (with state.json) are returned: should the one
    named be gone, the newest complete one in the index's history is used.
    """
    index_path = Path(run_dir) / "checkpoints" / "index.json"
    if not index_path.exists():
        return None
    index = read_json(index_path)
    name = index.get(which) or index.get("last") or index.get("best")  # averaged weights alone: no "last"
    if not name:
        raise CheckpointError(f"{index_path}: names no checkpoint")
    path = index_path.parent / name
    if (path / "state.json").is_file():
        return path
    for other in reversed(index.get("history", [])):
        if (index_path.parent / other / "state.json").is_file():
            log.warning("%s: names %s, which is missing or incomplete; using %s", index_path, name, other)
            return index_path.parent / other
    raise CheckpointError(f"{index_path}: names {name}, but {path} is missing or incomplete")


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete step checkpoints (not averaged ones), oldest first, as index.json lists them."""
    index_path = Path(run_dir) / "checkpoints" / "index.json"
    if not index_path.exists():
        return []
    index = read_json(index_path)
    return [index_path.parent / n for n in index.get("history", [])
            if (index_path.parent / n / "state.json").is_file()]


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The elementwise mean of the model weights of `paths` (checkpoints of one model).

    As in Vaswani et al. (2017) and fairseq's average_checkpoints: floating-point
    tensors are summed in float64 and returned in their own dtype; any other
    tensor (an integer buffer) must be the same in every checkpoint. Checkpoints
    whose tensors differ in names, shapes or dtypes are a CheckpointError naming
    the file.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    first = Path(paths[0]) / "model.safetensors"
    for i, path in enumerate(paths):
        _, tensors = read_checkpoint(Path(path))
        where = Path(path) / "model.safetensors"
        if i == 0:
            total = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
            dtypes = {k: v.dtype for k, v in tensors.items()}
            continue
        if set(tensors) != set(total):
            missing, extra = sorted(set(total) - set(tensors)), sorted(set(tensors) - set(total))
            raise CheckpointError(f"{where}: holds other tensors than {first} (missing {missing[:3]}, "
                                  f"extra {extra[:3]}); only checkpoints of one model can be averaged")
        for k, v in tensors.items():
            if v.shape != total[k].shape or v.dtype != dtypes[k]:
                raise CheckpointError(f"{where}: tensor {k} is {v.dtype} {tuple(v.shape)}, in {first} "
                                      f"{dtypes[k]} {tuple(total[k].shape)}")
            if v.is_floating_point():
                total[k] += v
            elif not torch.equal(v, total[k]):
                raise CheckpointError(f"{where}: tensor {k} ({v.dtype}) differs from {first}; only "
                                      "floating-point tensors can be averaged")
    return {k: (v / len(paths)).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()}


def average_run(run_dir: Path, out_dir: Path, last: int) -> list[str]:
    """Write the mean of `run_dir`'s last `last` step checkpoints as the run directory `out_dir`.

    `out_dir` gets the config and vocabularies and one checkpoint (best, no
    optimizer state): translate, evaluate, export and train.init_from take it,
    resuming training from it is refused. It appears all at once (written
    aside, then renamed); an existing non-empty `out_dir` is never touched.
    Returns the names of the checkpoints averaged.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if last < 2:
        raise ValueError(f"--last must be at least 2 (got {last})")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.yaml)")
    paths = step_checkpoints(run_dir)
    if len(paths) < last:
        raise CheckpointError(
            f"{run_dir / 'checkpoints' / 'index.json'}: lists {len(paths)} step checkpoint(s), fewer than the "
            f"{last} to average; train with --set train.keep_checkpoints={last} to keep that many")
    paths = paths[-last:]
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: exists and is not an empty directory; name a new one")
    if out_dir.resolve() == run_dir.resolve():
        raise CheckpointError(f"{out_dir}: is the run directory itself; name a new one")
    tensors = average_checkpoints(paths)
    names = [p.name for p in paths]
    state = read_json(paths[-1] / "state.json")
    for key in ("files", "optimizer"):
        state.pop(key, None)
    texts = {}
    for fname in ("source_codec.json", "target_codec.json"):
        try:
            texts[fname] = (run_dir / fname).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CheckpointError(f"{run_dir / fname}: missing") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shutil.copyfile(run_dir / "config.yaml", tmp / "config.yaml")
        for fname, text in texts.items():
            (tmp / fname).write_text(text, encoding="utf-8")
        save_checkpoint(tmp, f"average-{names[0]}-{names[-1]}", tensors, None, dict(state, averaged_from=names),
                        best=True, keep=1, rng={}, texts=texts, averaged=True)
        fsync_dir(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def read_checkpoint(path: Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json contents, model tensors) of one checkpoint folder."""
    state = read_json(path / "state.json")
    if not (path / "model.safetensors").is_file():
        pickled = sorted({p.name for pattern in PICKLE_NAMES for p in path.glob(pattern)})
        if pickled:
            raise CheckpointError(f"{path / 'model.safetensors'}: missing; found {', '.join(pickled)}, "
                                  "pickle-based PyTorch files that transduce never loads (unpickling can "
                                  "run arbitrary code). Convert trusted weights to safetensors.")
    if verify:
        for f, digest in state.get("files", {}).items():
            if not (path / f).is_file():
                raise CheckpointError(f"{path / f}: missing")
            if f.endswith(".safetensors"):
                with open(path / f, "rb") as fh:
                    _refuse_pickle(path / f, fh.read(8))
            if _sha256(path / f) != digest:
                raise CheckpointError(f"{path / f}: checksum does not match state.json (corrupt or altered)")
    return state, load_tensors(path / "model.safetensors")
