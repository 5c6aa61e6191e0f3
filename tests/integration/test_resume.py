"""Never lose a run: SIGKILL at random moments (also mid-save) and the resumed run repeats the uninterrupted
one's losses bit for bit; a changed config or vocabulary is refused; write failures stop cleanly."""
from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import transduce.checkpoint as C
import transduce.training.trainer as trainer
from toyrun import losses, toy_config, toy_data, toy_raw, write_config
from transduce.checkpoint import CheckpointError, RunDirWriteError, checkpoint_dir, read_checkpoint, read_json
from transduce.registry import config_from_dict
from transduce.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy data and an uninterrupted reference run."""
    folder = tmp_path_factory.mktemp("toy")
    data = toy_data(folder)
    reference = folder / "reference"
    train(toy_config(data, max_steps=STEPS), reference, progress=False)
    assert [s for s, _ in losses(reference)] == list(range(1, STEPS + 1))
    return data, losses(reference)


def launch(config: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "transduce", "train", str(config), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)


def logged_steps(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_text().count('"loss_exact"')
    except FileNotFoundError:
        return 0


def saving(run: Path) -> bool:
    try:
        return any(n.startswith(".tmp-") for n in os.listdir(run / "checkpoints"))
    except FileNotFoundError:
        return False


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(toy, tmp_path):
    data, reference = toy
    seed = int(os.environ.get("TRANSDUCE_KILL_SEED", random.randrange(10 ** 6)))
    g = random.Random(seed)
    config = write_config(tmp_path / "c.yaml", toy_raw(data, max_steps=STEPS))
    run = tmp_path / "run"
    # How each attempt dies: at a random time (often during start-up), in the middle of writing a
    # checkpoint, and a few steps after the last attempt's progress, a few milliseconds into a step.
    plans = ["time", *g.sample(["save", "steps"], 2)]
    killed, stderr = [], []
    for plan in plans:
        before = logged_steps(run)
        p = launch(config, run)
        deadline = time.monotonic() + 120
        target = max(before, 3) + g.randint(1, 8)  # past the first checkpoint (step 3): the next run resumes
        wait_s = g.uniform(0.2, 3.0)
        t0 = time.monotonic()
        while p.poll() is None and time.monotonic() < deadline:
            # (by half the run at the latest: on a fast machine 3 s can be the whole run, and the next
            # attempts need steps left to be killed in)
            if plan == "time" and (time.monotonic() - t0 >= wait_s or logged_steps(run) >= STEPS // 2):
                break
            if plan == "save" and saving(run):
                break
            if plan == "steps" and logged_steps(run) >= target:
                time.sleep(g.uniform(0, 0.02))
                break
            time.sleep(0.002)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed.append((plan, logged_steps(run), saving(run)))
        stderr.append(p.communicate()[1])
        assert p.returncode in (0, -signal.SIGKILL), stderr[-1]
    p = launch(config, run)
    stderr.append(p.communicate(timeout=300)[1])
    assert p.returncode == 0, stderr[-1]
    note = f"TRANSDUCE_KILL_SEED={seed}; kills (plan, steps logged, mid-save): {killed}"
    print(note)
    assert len(killed) >= 2, note
    assert any("resuming" in e for e in stderr), note
    assert losses(run) == reference, note  # every step once, every loss bit for bit


def test_control_a_missing_rng_state_would_be_caught(toy, tmp_path, monkeypatch):
    """The comparison above is sharp: resuming without the saved generator states changes the losses."""
    data, reference = toy
    for restore in (True, False):
        run = tmp_path / f"run-{restore}"
        train(toy_config(data, max_steps=9), run, progress=False)  # "killed" after the checkpoint at 9
        if not restore:
            monkeypatch.setattr(trainer, "set_rng_state", lambda *a, **k: None)
        train(toy_config(data, max_steps=STEPS), run, progress=False)
        got = losses(run)
        assert got[:9] == reference[:9]
        assert (got == reference) is restore


def test_resume_refuses_changed_config_or_vocabulary(toy, tmp_path):
    data, reference = toy
    run = tmp_path / "run"
    train(toy_config(data, max_steps=3), run, progress=False)
    raw = toy_raw(data, max_steps=6)
    raw["model"]["d_model"] = 32
    with pytest.raises(CheckpointError, match="model.d_model: 16 -> 32"):
        train(config_from_dict(raw), run)
    raw = toy_raw(data, max_steps=6)
    raw["data"]["target_tokenizer"]["lowercase"] = True
    with pytest.raises(CheckpointError, match="data.target_tokenizer.lowercase: False -> True"):
        train(config_from_dict(raw), run)

    codec_path = run / "target_codec.json"
    original = codec_path.read_text()
    codec = json.loads(original)
    codec["symbols"].append("zz")
    codec_path.write_text(json.dumps(codec))
    with pytest.raises(CheckpointError, match=r"target_codec.json: cannot resume .* 1 symbols added \('zz'\)"):
        train(toy_config(data, max_steps=6), run)
    codec = json.loads(original)
    codec["symbols"][4], codec["symbols"][5] = codec["symbols"][5], codec["symbols"][4]
    codec_path.write_text(json.dumps(codec))
    with pytest.raises(CheckpointError, match="another order"):
        train(toy_config(data, max_steps=6), run)
    codec_path.write_text(original)
    # Budgets may change; the run then continues exactly.
    assert train(toy_config(data, max_steps=6), run, progress=False)["step"] == 6
    assert losses(run) == reference[:6]


def test_torn_metrics_line_is_dropped_on_resume(toy, tmp_path):
    data, reference = toy
    run = tmp_path / "run"
    train(toy_config(data, max_steps=3), run, progress=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss_ex')  # killed mid-write
    train(toy_config(data, max_steps=5), run, progress=False)
    assert losses(run) == reference[:5]


def fail_second_checkpoint_enospc(monkeypatch):
    real, calls = C.save_tensors, []

    def full(tensors, path):
        calls.append(path)
        if len(calls) > 3:  # the first checkpoint writes 3 tensor files; the second runs out of space
            Path(path).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(tensors, path)

    monkeypatch.setattr(C, "save_tensors", full)
    return "No space left on device"


def fail_second_checkpoint_file_size_limit(monkeypatch):
    """A real failing write: the kernel refuses to grow a file past RLIMIT_FSIZE (EFBIG)."""
    real, calls = trainer.save_checkpoint, []

    def limited(*args, **kwargs):
        calls.append(1)
        if len(calls) != 2:
            return real(*args, **kwargs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write(), not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            return real(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(trainer, "save_checkpoint", limited)
    return "File too large"


@pytest.mark.parametrize("failure", [fail_second_checkpoint_enospc, fail_second_checkpoint_file_size_limit])
def test_failed_checkpoint_write_stops_and_keeps_previous(toy, tmp_path, monkeypatch, failure):
    data, reference = toy
    run = tmp_path / "run"
    reason = failure(monkeypatch)
    with pytest.raises(RunDirWriteError, match=f"could not write checkpoint step-0000006 \\({reason}\\).*"
                                               "step-0000003 is intact.*run the same command to resume"):
        train(toy_config(data, max_steps=9), run, progress=False)
    assert read_json(run / "checkpoints" / "index.json")["last"] == "step-0000003"
    assert sorted(os.listdir(run / "checkpoints")) == ["index.json", "step-0000003"]
    read_checkpoint(checkpoint_dir(run, "last"))  # intact: checksums and tensors verify
    monkeypatch.undo()
    assert train(toy_config(data, max_steps=9), run, progress=False)["step"] == 9
    assert losses(run) == reference[:9]


@pytest.mark.parametrize("out", ["/sys", "/sys/transduce-run"])
def test_unwritable_run_dir_is_a_clear_error(toy, tmp_path, capsys, out):
    """/sys refuses new files even to root (sysfs), so this really fails."""
    try:
        with open("/sys/.transduce-probe", "w"):
            pass
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    from transduce.cli import main

    data, _ = toy
    config = write_config(tmp_path / "c.yaml", toy_raw(data))
    assert main(["train", str(config), "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"transduce train: error: {out}: run directory is not writable" in err
