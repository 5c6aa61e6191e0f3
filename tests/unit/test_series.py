"""Series data (CSV reading, normalisation, bins, windows), the vector front-end and the shared
model checks on the families that read vectors: save/load, padding invariance, cache = full pass."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import stepwise_logits
from transduce.checkpoint import load_model_tensors, read_checkpoint, save_checkpoint
from transduce.config import ConfigError, ForecastConfig
from transduce.data.readers import DataError
from transduce.data.series import (SeriesBatch, SeriesScaler, ValueBins, read_series, series_codec, windows)
from transduce.data.vocab import BOS
from transduce.metrics import forecast_metrics
from transduce.models.series import (ForecasterConfig, FrontendFields, SeriesRNNConfig, SeriesTransformerConfig,
                                     VectorFrontend, pinball)
from transduce.registry import build_model, config_from_dict
from transduce.tasks.forecast import ForecastTask, next_times

F_IN, TGT_V = 3, 12


def write_csv(path, rows, header="timestamp,y,x"):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return path


def series_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(i, round(float(np.sin(i / 2) + 0.1 * rng.standard_normal()), 4), round(float(i % 5), 1)) for i in range(n)]


# -- reading: bad input is an error naming the file, the row and the problem ---------------------

def test_read_series_reads_columns_in_order(tmp_path):
    p = write_csv(tmp_path / "s.csv", series_rows(10))
    s = read_series(p, ForecastConfig(targets=["y"], inputs=["x"]))
    assert s.columns == ["y", "x"] and s.values.shape == (10, 2)
    assert s.times[:2] == ["0", "1"] and s.values[3, 1] == 3.0


@pytest.mark.parametrize("cell, problem", [("nan", "missing value"), ("", "missing value"),
                                           ("abc", "'abc' is not a finite number"),
                                           ("inf", "'inf' is not a finite number")])
def test_bad_value_names_file_row_and_column(tmp_path, cell, problem):
    rows = series_rows(6)
    rows[3] = (3, cell, 1.0)
    p = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as e:
        read_series(p, ForecastConfig(targets=["y"]))
    msg = str(e.value)
    assert f"{p}:5:" in msg and "column 'y'" in msg and problem in msg  # header is line 1, row 3 is line 5


def test_missing_column_names_file_and_columns(tmp_path):
    p = write_csv(tmp_path / "s.csv", series_rows(5))
    with pytest.raises(DataError, match=r"s\.csv:1: no column 'load' in the header \(columns: timestamp, y, x\)"):
        read_series(p, ForecastConfig(targets=["load"]))
    with pytest.raises(DataError, match="no column 'time'"):
        read_series(p, ForecastConfig(timestamp="time"))


def test_ragged_row_and_empty_file(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("timestamp,y\n0,1\n1,2,3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"r\.csv:3: 3 fields, the header has 2"):
        read_series(p, ForecastConfig())
    (tmp_path / "e.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        read_series(tmp_path / "e.csv", ForecastConfig())


def test_series_shorter_than_one_window(tmp_path):
    p = write_csv(tmp_path / "short.csv", series_rows(9))
    cfg = ForecastConfig(targets=["y"], context=6, horizon=4)
    s = read_series(p, cfg)
    with pytest.raises(DataError, match=r"short\.csv: 9 rows, shorter than one window \(.*6 \+ 4 = 10 rows\)"):
        windows([s], [s.values.astype(np.float32)], cfg, 1)


def test_forecast_config_is_checked():
    base = {"model": {"family": "forecaster", "d_model": 16, "heads": 2}, "data": {"task": "forecast", "train": "x.csv"}}
    config_from_dict(base)
    with pytest.raises(ConfigError, match="lacks \\[0.5\\]"):
        config_from_dict({**base, "model": {**base["model"], "quantiles": [0.1, 0.9]}})
    with pytest.raises(ConfigError, match="forecast applies to task 'forecast' only"):
        config_from_dict({"model": {"family": "transformer"}, "data": {"train": "x.tsv", "forecast": {"horizon": 3}}})
    with pytest.raises(ConfigError, match="metrics: invalid choice 'wer'"):
        config_from_dict({**base, "eval": {"metrics": ["wer"]}})


# -- codecs --------------------------------------------------------------------------------------

def test_scaler_normalises_and_round_trips_json(tmp_path):
    s = read_series(write_csv(tmp_path / "s.csv", series_rows(40)), ForecastConfig(targets=["y"], inputs=["x"]))
    sc = SeriesScaler.fit([s], ["y", "x"], season=5)
    z = sc.normalise(s.values)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-9)
    # the seasonal-naive scale of MASE: mean |x_t - x_{t-5}| = 0 for x (period 5) -> 1.0 (no scale)
    assert sc.mase_scale[1] == 1.0 and sc.mase_scale[0] > 0
    back = series_codec(json.loads(sc.dumps()))
    np.testing.assert_allclose(back.restore(z), s.values)
    assert back.vocab == ("y", "x") and back.season == 5


def test_value_bins_encode_decode_and_json():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(5000)
    bins = ValueBins.fit(SeriesScaler(["y"], [0.0], [1.0]), values, 16)
    ids = bins.encode(values)
    assert ids.min() == 4 and ids.max() == 4 + 15 and len(bins.vocab) == 4 + 16
    counts = np.bincount(ids - 4)
    assert counts.min() > 0.8 * len(values) / 16  # quantile edges: bins about equally frequent
    assert np.abs(bins.decode(ids) - values).mean() < 0.15
    assert np.isnan(bins.decode([BOS]))[0]
    back = series_codec(json.loads(bins.dumps()))
    np.testing.assert_array_equal(back.encode(values), ids)


def test_windows_are_relative_to_their_context_mean(tmp_path):
    cfg = ForecastConfig(targets=["y"], context=4, horizon=2, stride=3)
    x = np.arange(20, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    s = read_series(write_csv(tmp_path / "s.csv", series_rows(20)), cfg)
    data = windows([s], [x], cfg, 1)
    assert len(data.src) == 5  # starts 0, 3, 6, 9, 12 (a window is 6 steps)
    b = data.collate([1])
    assert isinstance(b, SeriesBatch) and b.src.shape == (1, 4, 2) and b.labels.shape == (1, 2, 1)
    # context 3..6 has mean 4.5; targets 7, 8 -> 2.5, 3.5
    torch.testing.assert_close(b.src[0, :, 0], torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    torch.testing.assert_close(b.labels[0, :, 0], torch.tensor([2.5, 3.5]))
    assert b.n_tgt_tokens == 2


# -- the front-end ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, s, k, lengths", [("linear", 1, 3, [7, 7]), ("linear", 3, 3, [3, 3]),
                                                 ("conv", 2, 3, [4, 4]), ("conv", 2, 5, [4, 4])])
def test_frontend_lengths(kind, s, k, lengths):
    fe = VectorFrontend(F_IN, 8, FrontendFields(kind, s, k))
    y, mask = fe(torch.randn(2, 7, F_IN), torch.ones(2, 7, dtype=torch.bool))
    assert y.shape == (2, lengths[0], 8) and mask.sum(1).tolist() == lengths


def test_frames_of_the_wrong_width_are_an_error():
    fe = VectorFrontend(F_IN, 8, FrontendFields())
    with pytest.raises(ValueError, match="vectors of width 5; the model reads 3 features"):
        fe(torch.randn(2, 4, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected vectors"):
        fe(torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool))


# -- shared model checks on the vector families ---------------------------------------------------

def tiny(name):
    front = {"linear": dict(frontend="linear"), "lags": dict(frontend="linear"), "conv": dict(frontend="conv", subsample=2, kernel_size=3),
             "stack2": dict(frontend="linear", subsample=2)}[name.split("-")[1]]
    if name.startswith("series_transformer"):
        return SeriesTransformerConfig(d_model=32, heads=4, encoder_layers=2, decoder_layers=2, ff_dim=64, dropout=0.0,
                                       max_positions=64, **front)
    if name.startswith("series_rnn"):
        return SeriesRNNConfig(embedding_dim=16, encoder_hidden=16, hidden_size=24, dropout=0.0, attention_dim=20,
                               **front)
    lags = 3 if name.endswith("-lags") else 0
    return ForecasterConfig(d_model=32, heads=4, encoder_layers=2, decoder_layers=2, ff_dim=64, dropout=0.0,
                            max_positions=64, lags=lags, **front)


VECTOR_MODELS = ["series_transformer-linear", "series_transformer-conv", "series_rnn-linear", "series_rnn-stack2",
                 "forecaster-linear", "forecaster-conv", "forecaster-lags"]


def make(name, seed=0):
    torch.manual_seed(seed)
    c = tiny(name)
    model = build_model(c, F_IN, 2 if c.family == "forecaster" else TGT_V)
    with torch.no_grad():  # non-trivial weights everywhere (a fresh init zeroes biases and the lags)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def vector_batch(name, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 6, 8, 3][:b])
    s = int(lengths.max())
    src = torch.randn(b, s, F_IN, generator=g)
    mask = torch.arange(s)[None, :] < lengths[:, None]
    src[~mask] = 7.0  # whatever padding holds must not matter
    if name.startswith("forecaster"):
        return SeriesBatch(src, mask, torch.zeros(b, 0, dtype=torch.long), torch.randn(b, 5, 2, generator=g))
    t = 5
    tgt = torch.randint(4, TGT_V, (b, t), generator=g)
    return SeriesBatch(src, mask, torch.cat([torch.full((b, 1), BOS), tgt[:, :-1]], 1), tgt)


@pytest.mark.parametrize("name", VECTOR_MODELS)
def test_vector_padding_does_not_change_real_positions(name):
    model = make(name)
    batch = vector_batch(name)
    with torch.no_grad():
        full = model(batch)
        for i in range(len(batch.src)):
            n = int(batch.src_mask[i].sum())
            one = SeriesBatch(batch.src[i: i + 1, :n], batch.src_mask[i: i + 1, :n], batch.tgt_in[i: i + 1],
                              batch.labels[i: i + 1])
            torch.testing.assert_close(model(one)[0], full[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in VECTOR_MODELS if not n.startswith("forecaster")])
def test_vector_incremental_decoding_equals_full_forward(name):
    model = make(name, seed=1)
    batch = vector_batch(name, seed=1)
    with torch.no_grad():
        full = model(batch)
        inc = stepwise_logits(model, batch)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["forecaster-linear", "forecaster-lags"])
def test_forecaster_shorter_horizon_is_the_prefix_of_a_longer_one(name):
    model = make(name, seed=2)
    b = vector_batch(name, seed=2)
    with torch.no_grad():
        long, short = model.predict(b.src, b.src_mask, 8), model.predict(b.src, b.src_mask, 3)
    assert long.shape == (4, 8, 2, 3)
    torch.testing.assert_close(long[:, :3], short, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", VECTOR_MODELS)
def test_vector_save_load_round_trip(name, tmp_path):
    model = make(name, seed=3)
    batch = vector_batch(name, seed=3)
    save_checkpoint(tmp_path, "step-0000001", model, None, {"step": 1}, best=True, keep=1)
    _, tensors = read_checkpoint(tmp_path / "checkpoints" / "step-0000001")
    fresh = make(name, seed=99)
    with torch.no_grad():
        assert not torch.equal(fresh(batch), model(batch))
        load_model_tensors(fresh, tensors, tmp_path)
        torch.testing.assert_close(fresh(batch), model(batch), atol=0, rtol=0)


def test_kernels_engine_leaves_vector_models_to_torch():
    from transduce.engine.kernels import runs_on_kernels

    assert "vectors" in runs_on_kernels(make("series_transformer-linear"))


# -- scores -------------------------------------------------------------------------------------

def test_forecast_metrics_known_values():
    actual = np.array([[[1.0], [2.0], [3.0], [4.0]]])
    point = np.array([[[1.0], [3.0], [3.0], [2.0]]])
    q = {0.1: point - 1.0, 0.5: point, 0.9: point + 1.0}
    m = forecast_metrics(["mae", "rmse", "mase", "coverage", "quantile_loss"], actual, point, q, [2.0])
    assert m["mae"] == 0.75 and m["rmse"] == round(np.sqrt(5 / 4), 4) and m["mase"] == 0.375
    assert m["coverage"] == 75.0  # the 4 - 2 = 2 miss lies outside [1, 3]
    # pinball per level, by hand: 0.1 -> [.1, 0, .1, .3], 0.5 -> [0, .5, 0, 1], 0.9 -> [.1, .2, .1, .9]
    assert m["quantile_loss"] == round((0.125 + 0.375 + 0.325) / 3, 4)


def test_pinball_loss_is_minimised_at_the_quantile():
    y = torch.randn(4000, 1, 1, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(-2, 2, 81)
    losses = [float(pinball(torch.full((4000, 1, 1, 1), float(g)), y, [0.9])) for g in grid]
    best = float(grid[int(np.argmin(losses))])
    assert abs(best - float(torch.quantile(y, 0.9))) < 0.06


def test_next_times():
    assert next_times(["10", "12"], 3) == ["14", "16", "18"]
    assert next_times(["2001-11-01", "2001-12-01"], 2) == ["2002-01-01", "2002-02-01"]
    assert next_times(["2020-01-01", "2020-01-08"], 1) == ["2020-01-15"]
    assert next_times(["a", "b"], 2) == ["", ""]


def test_forecast_task_origins_end_at_the_last_step():
    task = ForecastTask(ForecastConfig(context=5, horizon=3))
    assert task.origins(20, task.cfg) == [5, 8, 11, 14, 17]


# -- feature frames (data.task: frames) ----------------------------------------------------------

def test_load_frames_checks_each_file(tmp_path):
    from transduce.data.readers import Pair
    from transduce.tasks.frames import load_frames

    def pair(name, array=None, raw=None):
        path = tmp_path / name
        if array is not None:
            np.save(path, array, allow_pickle=True)
        elif raw is not None:
            path.write_bytes(raw)
        return Pair(str(path), "one two", "list.tsv:3")

    ok = load_frames(pair("ok.npy", np.zeros((5, 4))), width=4)
    assert ok.shape == (5, 4) and ok.dtype == np.float32
    with pytest.raises(DataError, match=r"list\.tsv:3: .*wide\.npy: frames of width 6, expected 4"):
        load_frames(pair("wide.npy", np.zeros((5, 6))), width=4)
    nan = np.zeros((5, 4))
    nan[2, 1] = np.nan
    with pytest.raises(DataError, match=r"nan\.npy: frame 2, feature 1: nan is not a finite number"):
        load_frames(pair("nan.npy", nan))
    with pytest.raises(DataError, match=r"obj\.npy: not a NumPy array of frames"):  # a pickle is never loaded
        load_frames(pair("obj.npy", np.array([{"a": 1}], dtype=object)))
    with pytest.raises(DataError, match=r"ints\.npy: expected float frames"):
        load_frames(pair("ints.npy", np.zeros((5, 4), dtype=np.int64)))
    with pytest.raises(DataError, match=r"gone\.npy: no such file"):
        load_frames(Pair(str(tmp_path / "gone.npy"), "x", "list.tsv:4"))
    with pytest.raises(DataError, match=r"text\.npy: not a NumPy array"):
        load_frames(pair("text.npy", raw=b"hello"))


def test_vector_families_need_a_vector_task():
    with pytest.raises(ConfigError, match="reads vectors, not text; set data.task"):
        config_from_dict({"model": {"family": "series_transformer"}, "data": {"train": "x.tsv"}})
    with pytest.raises(ConfigError, match="data.task 'frames' needs series_transformer or series_rnn"):
        config_from_dict({"model": {"family": "transformer"}, "data": {"task": "frames", "train": "x.tsv"},
                          "eval": {"metrics": ["cer"]}})
    with pytest.raises(ConfigError, match="needs data.task: forecast"):
        config_from_dict({"model": {"family": "forecaster"}, "data": {"task": "frames", "train": "x.tsv"},
                          "eval": {"metrics": ["mase"]}})
