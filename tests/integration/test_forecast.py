"""Forecasting end to end on a synthetic seasonal series made here: train a tiny forecaster
(quantile head) and a tiny decoder over quantised values, evaluate, forecast through the CLI,
and bad input stopping with the file, row and problem."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from transduce.data.series import read_series
from transduce.registry import config_from_dict
from transduce.runs import load_run
from transduce.tasks.forecast import forecast_rows
from transduce.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
SEASON = 8


def write_series(path: Path, n: int, start: int = 0, seed: int = 0, nan_row: int | None = None) -> Path:
    """A trend, a seasonal cycle of SEASON steps and a little noise; and a covariate column x."""
    rng = np.random.default_rng(seed)
    lines = ["time,load,x"]
    for i in range(start, start + n):
        y = 5 + 0.02 * i + 2 * np.sin(2 * np.pi * i / SEASON) + 0.1 * rng.standard_normal()
        lines.append(f"{i},{'nan' if nan_row == i - start else f'{y:.4f}'},{i % SEASON}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def raw_config(folder: Path, family: str = "forecaster", **model) -> dict:
    m = {"family": family, "d_model": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ff_dim": 64,
         "dropout": 0.0, "max_positions": 32}
    if family == "forecaster":
        m["quantiles"] = [0.1, 0.5, 0.9]
    m.update(model)
    return {"model": m,
            "data": {"task": "forecast", "train": str(folder / "train.csv"), "dev": str(folder / "dev.csv"),
                     "test": str(folder / "dev.csv"),
                     "forecast": {"timestamp": "time", "targets": ["load"], "context": 16, "horizon": 4,
                                  "season": SEASON, "samples": 20, "bins": 24}},
            "train": {"max_steps": 120, "batch_tokens": 1200, "lr": 3e-3, "warmup_steps": 10, "eval_every": 60,
                      "log_every": 20, "threads": 1, "seed": 1, "label_smoothing": 0.0},
            "eval": {"metrics": ["mase", "mae", "rmse", "crps", "coverage"]}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    write_series(folder / "train.csv", 240)
    write_series(folder / "dev.csv", 48, start=240, seed=1)
    return folder


@pytest.fixture(scope="module")
def run(data):
    out = data / "run"
    state = train(config_from_dict(raw_config(data)), out, progress=False)
    assert state["step"] == 120
    return out


def seasonal_naive_mase(data: Path, context: int = 16, horizon: int = 4) -> float:
    y = read_series(data / "dev.csv", load_run_cfg(data)).select(["load"])[:, 0]
    tr = read_series(data / "train.csv", load_run_cfg(data)).select(["load"])[:, 0]
    scale = np.abs(tr[SEASON:] - tr[:-SEASON]).mean()
    errs = [abs(y[o + h] - y[o + h - SEASON]) for o in range(len(y) - horizon, context - 1, -horizon) for h in range(horizon)]
    return float(np.mean(errs) / scale)


def load_run_cfg(data):
    return config_from_dict(raw_config(data)).data.forecast


def test_run_saves_normalisation_and_beats_seasonal_naive(run, data):
    codec = json.loads((run / "source_codec.json").read_text())
    assert codec["kind"] == "series_scaler" and codec["columns"] == ["load"] and len(codec["mean"]) == 1
    loaded = load_run(run)
    result, rows = loaded.task.evaluate(loaded, [read_series(data / "dev.csv", loaded.config.data.forecast)],
                                        ["mase", "mae", "coverage", "quantile_loss"])
    assert len(rows) == 8  # origins 16, 20, .., 44 of 48 steps
    assert result["mase"] < seasonal_naive_mase(data)
    assert 0 <= result["coverage"] <= 100 and result["quantile_loss"] > 0


def cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "transduce", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"transduce {args} failed:\n{p.stderr}")
    return p


def test_forecast_command_prints_intervals(run, data):
    out = cli("forecast", "--model", str(run), "--input", str(data / "dev.csv"), "--horizon", "6").stdout
    lines = out.strip().splitlines()
    assert lines[0] == "step,timestamp,column,forecast,lower_0.1,upper_0.9"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == [str(h) for h in range(1, 7)]  # 6 > the trained 4: rolled forward
    assert [r[1] for r in rows] == [str(t) for t in range(288, 294)]
    for r in rows:
        lo, point, hi = float(r[4]), float(r[3]), float(r[5])
        assert lo <= point <= hi
    # the first steps of a longer forecast are the trained horizon's forecast
    loaded = load_run(run)
    four = forecast_rows(loaded, read_series(data / "dev.csv", loaded.config.data.forecast), 4)
    assert [round(r["forecast"], 4) for r in four] == [round(float(r[3]), 4) for r in rows[:4]]


def test_evaluate_command_reports_forecast_metrics(run, data):
    p = cli("evaluate", "--model", str(run), "--data", str(data / "dev.csv"),
            "--metrics", "mase,mae,rmse,crps,quantile_loss,coverage", "--show", "1")
    lines = p.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["items"] == 8 and set(result) >= {"mase", "mae", "rmse", "crps", "quantile_loss", "coverage"}
    assert lines[0].startswith(f"{data / 'dev.csv'}@256\t")  # the time of origin 16
    bad = cli("evaluate", "--model", str(run), "--data", str(data / "dev.csv"), "--metrics", "bleu", check=False)
    assert bad.returncode == 2 and "valid choices: mase" in bad.stderr


def test_bad_input_is_a_clear_error(run, data, tmp_path):
    nan = write_series(tmp_path / "nan.csv", 30, nan_row=7)
    p = cli("forecast", "--model", str(run), "--input", str(nan), check=False)
    assert p.returncode == 2 and f"{nan}:9: column 'load': missing value" in p.stderr
    short = write_series(tmp_path / "short.csv", 10)
    p = cli("forecast", "--model", str(run), "--input", str(short), check=False)
    assert p.returncode == 2 and "10 rows, shorter than one window (data.forecast.context = 16 rows)" in p.stderr
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("time,other\n" + "".join(f"{i},1.0\n" for i in range(20)), encoding="utf-8")
    p = cli("forecast", "--model", str(run), "--input", str(nocol), check=False)
    assert p.returncode == 2 and "nocol.csv:1: no column 'load'" in p.stderr
    cfg = raw_config(data)
    cfg["data"]["train"] = str(nan)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = cli("train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 2 and f"{nan}:9: column 'load'" in p.stderr


def test_gaussian_head_with_covariate_and_conv_frontend(data, tmp_path):
    raw = raw_config(data, loss="gaussian", frontend="conv", subsample=2, lags=8)
    raw["data"]["forecast"]["inputs"] = ["x"]
    raw["train"]["max_steps"] = 60
    state = train(config_from_dict(raw), tmp_path / "g", progress=False)
    assert state["best"] is not None and np.isfinite(state["best"])
    run = load_run(tmp_path / "g")
    assert run.source.columns == ["load", "x"] and run.target.columns == ["load"]
    result, _ = run.task.evaluate(run, [read_series(data / "dev.csv", run.config.data.forecast)], ["crps", "coverage"])
    assert result["crps"] > 0
    with pytest.raises(ValueError, match="needs future values of the input-only columns"):
        forecast_rows(run, read_series(data / "dev.csv", run.config.data.forecast), 5)


@pytest.mark.parametrize("family", ["series_transformer", "series_rnn"])
def test_decoder_over_quantised_values_samples_forecasts(data, tmp_path, family):
    extra = {"embedding_dim": 16, "encoder_hidden": 16, "hidden_size": 24, "attention_dim": 16,
             "encoder_layers": 1, "decoder_layers": 1} if family == "series_rnn" else {}
    raw = raw_config(data, family, **extra)
    if family == "series_rnn":
        for k in ("d_model", "heads", "ff_dim", "max_positions"):
            raw["model"].pop(k)
    raw["train"]["max_steps"] = 200
    state = train(config_from_dict(raw), tmp_path / "b", progress=False)
    run = load_run(tmp_path / "b")
    bins = json.loads((tmp_path / "b" / "target_codec.json").read_text())
    assert bins["kind"] == "value_bins" and len(bins["centres"]) == 24
    series = read_series(data / "dev.csv", run.config.data.forecast)
    result, rows = run.task.evaluate(run, [series], ["mase", "coverage", "crps"])
    assert len(rows) == 8 and np.isfinite(result["mase"]) and state["step"] == 200
    if family == "series_transformer":  # near seasonal naive after 200 updates (the RNN learns slower)
        assert result["mase"] < 1.5 * seasonal_naive_mase(data)
    a = forecast_rows(run, series, 4)
    b = forecast_rows(run, series, 4)
    assert a == b  # sampled paths are seeded (train.seed): the same forecast twice
    assert all(r["lower_0.1"] <= r["forecast"] <= r["upper_0.9"] for r in a)


# -- frames in, text out ------------------------------------------------------------------------

def write_frames(folder: Path, split: str, n: int, seed: int) -> Path:
    """Utterances of 1-3 'words' a/b/c, each a few frames of its own noisy 6-dim pattern."""
    rng = np.random.default_rng(seed)
    pattern = {"a": np.array([2, 0, 0, 1, 0, 0.]), "b": np.array([0, 2, 0, 0, 1, 0.]), "c": np.array([0, 0, 2, 0, 0, 1.])}
    lines = []
    (folder / "frames").mkdir(exist_ok=True)
    for i in range(n):
        words = list(rng.choice(list(pattern), rng.integers(1, 4)))
        frames = np.concatenate([pattern[w] + 0.3 * rng.standard_normal((rng.integers(3, 6), 6)) for w in words])
        np.save(folder / "frames" / f"{split}{i}.npy", frames.astype(np.float32))
        lines.append(f"frames/{split}{i}.npy\t{' '.join(words)}\n")
    path = folder / f"{split}.tsv"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_frames_to_text_learns_and_evaluates(tmp_path):
    write_frames(tmp_path, "train", 300, 0)
    write_frames(tmp_path, "dev", 40, 1)
    raw = {"model": {"family": "series_transformer", "frontend": "conv", "subsample": 2, "kernel_size": 3,
                     "d_model": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ff_dim": 64,
                     "dropout": 0.0, "max_positions": 32},
           "data": {"task": "frames", "train": str(tmp_path / "train.tsv"), "dev": str(tmp_path / "dev.tsv"),
                    "target_tokenizer": {"kind": "whitespace"}},
           "train": {"max_steps": 150, "batch_tokens": 600, "lr": 3e-3, "warmup_steps": 10, "eval_every": 0,
                     "log_every": 50, "threads": 1},
           "eval": {"metrics": ["cer", "wer", "seq_acc"]}, "decode": {"beam": 2, "max_len_a": 0.5, "max_len_b": 2}}
    train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "source_codec.json").read_text())["columns"] == [f"f{i}" for i in range(6)]
    p = cli("evaluate", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "dev.tsv"), "--show", "2")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["items"] == 40 and result["cer"] < 20.0  # chance is far above (three words, random order)
    text = subprocess.run([sys.executable, "-m", "transduce", "translate", "--model", str(tmp_path / "run")],
                          input="a b\n", capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert text.returncode == 2 and "reads vectors, not text lines; use `transduce evaluate`" in text.stderr
    np.save(tmp_path / "frames" / "dev0.npy", np.zeros((4, 5), dtype=np.float32))
    bad = cli("evaluate", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "dev.tsv"), check=False)
    assert bad.returncode == 2 and "dev.tsv:1: " in bad.stderr and "frames of width 5, expected 6" in bad.stderr
