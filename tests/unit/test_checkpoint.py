"""Checkpoints are safe to load: safetensors + JSON only, malformed files are named, pickles never run,
and an interrupted save leaves the previous checkpoint in use."""
from __future__ import annotations

import json
import pickle
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import transduce.checkpoint as C
from transduce.checkpoint import (CheckpointError, checkpoint_dir, load_tensors, read_checkpoint, rng_state,
                                  save_checkpoint, save_tensors, set_rng_state)


class Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": Payload(marker)}, protocol=4))


def plant_torch_zip(path: Path, marker: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:  # the layout torch.save writes: a zip holding data.pkl
        z.writestr("archive/data.pkl", pickle.dumps(Payload(marker), protocol=2))


def tiny_checkpoint(root: Path, step: int = 1) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(root, f"step-{step:07d}", model, opt, {"step": step}, best=True, keep=5)
    return root / "checkpoints" / f"step-{step:07d}"


def test_payload_control_really_runs_when_unpickled(tmp_path):
    """Control: the planted file is a working exploit, so its absence below means it never ran."""
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "x.pkl", marker)
    pickle.loads((tmp_path / "x.pkl").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("plant", [plant_pickle, plant_torch_zip])
def test_pickle_in_place_of_safetensors_is_refused_and_never_runs(tmp_path, plant):
    ckpt = tiny_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    plant(ckpt / "model.safetensors", marker)
    for name in ("pytorch_model.bin", "model.pt"):
        plant_pickle(ckpt / name, marker)
    with pytest.raises(CheckpointError, match="never unpickles") as e:
        load_tensors(ckpt / "model.safetensors")          # the parser itself
    assert str(ckpt / "model.safetensors") in str(e.value)
    for verify in (True, False):                          # with and without the checksums of state.json
        with pytest.raises(CheckpointError, match="never unpickles"):
            read_checkpoint(ckpt, verify=verify)
    assert not marker.exists()


def test_pickle_files_instead_of_weights_are_named(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / "model.safetensors").unlink()
    for name in ("pytorch_model.bin", "model.pt"):
        plant_pickle(ckpt / name, marker)
    with pytest.raises(CheckpointError, match="model.pt, pytorch_model.bin.*never loads"):
        read_checkpoint(ckpt)
    assert not marker.exists()


def test_load_run_refuses_planted_pickle(tmp_path):
    """Through the public loader (`translate`, `evaluate`): same refusal, payload never runs."""
    from transduce.runs import load_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {family: transformer, d_model: 16, heads: 2}\n")
    for side in ("source", "target"):
        (run / f"{side}_codec.json").write_text(json.dumps(
            {"tokenizer": {"kind": "char", "lowercase": False}, "symbols": ["<pad>", "<unk>", "<s>", "</s>", "a"]}))
    ckpt = tiny_checkpoint(run)
    marker = tmp_path / "pwned"
    plant_pickle(ckpt / "model.safetensors", marker)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_run(run)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# Malformed safetensors: a CheckpointError naming the file, from the parser itself
# ---------------------------------------------------------------------------

def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32x4 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def good_file(path: Path) -> bytes:
    save_tensors({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)},
                 path)
    return path.read_bytes()


MALFORMED = {
    "empty": lambda good: b"",
    "seven_bytes": lambda good: good[:7],
    "truncated_data": lambda good: good[:-5],
    "truncated_header": lambda good: good[:20],
    "huge_header_length": lambda good: struct.pack("<Q", 2 ** 63) + good[8:],
    "header_longer_than_file": lambda good: struct.pack("<Q", len(good)) + good[8:],
    "header_not_json": lambda good: struct.pack("<Q", 4) + b"\xff{{{" + bytes(16),
    "header_not_object": lambda good: safetensors_bytes([1, 2], b""),
    "offsets_past_end": lambda good: safetensors_bytes({"w": {**F32x4, "data_offsets": [0, 64]}}, bytes(16)),
    "size_mismatch": lambda good: safetensors_bytes({"w": {**F32x4, "shape": [3, 3]}}, bytes(16)),
    "negative_offsets": lambda good: safetensors_bytes({"w": {**F32x4, "data_offsets": [8, 4]}}, bytes(16)),
    "overlap": lambda good: safetensors_bytes({"w": F32x4, "v": F32x4}, bytes(16)),
    "gap": lambda good: safetensors_bytes({"w": {**F32x4, "data_offsets": [8, 24]}}, bytes(24)),
    "trailing_bytes": lambda good: safetensors_bytes({"w": F32x4}, bytes(20)),
    "unknown_dtype": lambda good: safetensors_bytes({"w": {**F32x4, "dtype": "F128"}}, bytes(16)),
    "bad_shape": lambda good: safetensors_bytes({"w": {**F32x4, "shape": [-4, -1]}}, bytes(16)),
    "missing_fields": lambda good: safetensors_bytes({"w": {"dtype": "F32"}}, bytes(16)),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_safetensors_is_a_named_error(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    path.write_bytes(MALFORMED[kind](good_file(path)))
    with pytest.raises(CheckpointError) as e:
        load_tensors(path)
    assert str(path) in str(e.value)


def test_malformed_weights_in_a_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=f"{path}.*truncated"):  # the parser, checksums skipped
        read_checkpoint(ckpt, verify=False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10 ** 6)))
def test_corrupted_safetensors_never_crash(tmp_path, edits, cut):
    """Random byte flips and truncations: either valid tensors or a CheckpointError, nothing else."""
    path = tmp_path / "fuzz.safetensors"
    data = bytearray(good_file(path))
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path.write_bytes(bytes(data))
    try:
        tensors = load_tensors(path)
    except CheckpointError as e:
        assert str(path) in str(e)
    else:
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())


# ---------------------------------------------------------------------------
# Crash safety of the folder layout
# ---------------------------------------------------------------------------

def test_interrupted_save_leaves_previous_checkpoint_in_use(tmp_path, monkeypatch):
    first = tiny_checkpoint(tmp_path, step=1)
    calls = []

    def dying(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt  # as good as a kill for what is left on disk
        return save_tensors(tensors, path)

    monkeypatch.setattr(C, "save_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        tiny_checkpoint(tmp_path, step=2)
    assert checkpoint_dir(tmp_path, "last") == first
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    read_checkpoint(first)


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    first = tiny_checkpoint(tmp_path, step=1)
    second = tiny_checkpoint(tmp_path, step=2)
    # A folder of a crashed save (no state.json), even one the index names, is skipped.
    (second / "state.json").unlink()
    assert checkpoint_dir(tmp_path, "last") == first
    (tmp_path / "checkpoints" / ".tmp-step-0000003-99").mkdir()
    assert checkpoint_dir(tmp_path, "last") == first


def test_rng_state_round_trip():
    random.random(), np.random.rand(), torch.rand(1), random.gauss(0, 1), np.random.randn()
    saved = rng_state()
    first = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3).tolist())
    set_rng_state(saved)
    assert first == (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3).tolist())


def test_checkpoint_holds_rng_states_and_checksums(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    state, _ = read_checkpoint(ckpt)
    assert set(state["files"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}
    rng = load_tensors(ckpt / "rng.safetensors")
    assert {"rank0.torch", "rank0.python", "rank0.numpy"} <= set(rng)
