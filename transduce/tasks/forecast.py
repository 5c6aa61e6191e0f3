"""Forecasting (data.task: forecast): windows of a series' past in, its next `horizon` steps out.

- `ForecastTask` (family `forecaster`): a regression decoder; the loss is the
  Gaussian negative log-likelihood or the pinball loss of its quantiles, so every
  forecast comes with an interval (data.forecast.interval).
- `ForecastBinsTask` (families `series_transformer`, `series_rnn`): a token
  decoder over quantised values (`ValueBins`, fitted on the training windows),
  trained with cross-entropy like text; forecasts are `data.forecast.samples`
  paths drawn by `search.sample`, their median the point forecast and their
  quantiles the interval.

Both read CSV series (data/series.py), save the per-feature normalisation as
the run's source codec, and score forecasts in the series' own units: MAE, RMSE,
MASE (scaled by the training series' seasonal-naive error, data.forecast.season),
CRPS, quantile loss and the interval's coverage. Evaluation forecasts from
origins every `eval_stride` steps, the last one `horizon` steps before the end
of the file, each from the `context` steps before it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from transduce.config import Config, ForecastConfig
from transduce.data.readers import DataError, ReadReport
from transduce.data.series import (Series, SeriesScaler, ValueBins, check_length, make_window, read_series,
                                   value_columns, windows)
from transduce.metrics import FORECAST_METRICS, forecast_metrics
from transduce.models.series import gaussian_nll, pinball
from transduce.search import sample
from transduce.tasks.base import InitCodecs, Task, check_metrics


@dataclasses.dataclass
class Forecast:
    """Forecasts in the series' units: point (W, H, T), quantiles {level: (W, H, T)}, and where the
    distribution gives it, each value's CRPS against `actual` (filled by `score`)."""
    point: np.ndarray
    quantiles: dict
    mean: np.ndarray | None = None   # Gaussian: mean and standard deviation
    std: np.ndarray | None = None

    def crps(self, actual: np.ndarray) -> np.ndarray | None:
        if self.std is None:
            return None
        z = (actual - self.mean) / self.std
        cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
        pdf = np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
        return self.std * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def interval_levels(interval: float) -> tuple[float, float]:
    return round((1 - interval) / 2, 6), round((1 + interval) / 2, 6)


class ForecastTask(Task):
    name = command = "forecast"
    metrics = FORECAST_METRICS
    default_metrics = ("mase", "mae", "rmse", "crps", "coverage")

    def __init__(self, cfg: ForecastConfig | None = None):
        self.cfg = cfg or ForecastConfig()

    # -- data -----------------------------------------------------------------
    def check(self, cfg: Config) -> None:
        check_metrics(self, cfg)
        if cfg.data.task != "forecast":
            raise ValueError(f"data.task: {cfg.data.task!r}; model.family 'forecaster' needs data.task: forecast")
        m = cfg.model
        if getattr(m, "loss", None) == "quantile":
            need = {0.5, *interval_levels(cfg.data.forecast.interval)}
            missing = sorted(q for q in need if not any(abs(q - x) < 1e-6 for x in m.quantiles))
            if missing:
                raise ValueError(f"model.quantiles: {m.quantiles} lacks {missing} (the median and the bounds of "
                                 f"data.forecast.interval={cfg.data.forecast.interval})")

    def read(self, spec: str, skip_invalid: bool = False) -> tuple[list[Series], ReadReport]:
        """One series per CSV file (a bad value stops the run whatever data.skip_invalid says: a gap
        would join steps that are not adjacent)."""
        return [read_series(spec, self.cfg)], ReadReport(read=1)

    def columns(self, train: list[Series]) -> tuple[list[str], list[str]]:
        targets, inputs = value_columns(self.cfg, [self.cfg.timestamp] + train[0].columns)
        return targets, inputs

    def fit_codecs(self, cfg: Config, train: list[Series], init: InitCodecs | None = None):
        if init is not None:
            raise ValueError("train.init_from: a forecasting run starts from fresh weights; remove it")
        targets, inputs = self.columns(train)
        source = SeriesScaler.fit(train, targets + inputs, cfg.data.forecast.season)
        target = SeriesScaler.fit(train, targets, cfg.data.forecast.season)
        return source, target

    def inputs(self, series: list[Series], source: SeriesScaler) -> list[np.ndarray]:
        """Each series' columns in the source codec's order, normalised (float32)."""
        out = []
        for s in series:
            missing = [c for c in source.columns if c not in s.columns]
            if missing:
                raise DataError(f"{s.path}:1: no column {missing[0]!r} (the run reads {', '.join(source.columns)})")
            out.append(source.normalise(s.select(source.columns)).astype(np.float32))
        return out

    def encode(self, series, source, target, cfg: Config, what: str = "train"):
        return windows(series, self.inputs(series, source), cfg.data.forecast, len(target.columns))

    def loss(self, out: torch.Tensor, batch, cfg: Config) -> torch.Tensor:
        if cfg.model.loss == "gaussian":
            return gaussian_nll(out, batch.labels)
        return pinball(out, batch.labels, cfg.model.quantiles)

    # -- forecasting ----------------------------------------------------------
    def origins(self, n: int, cfg: ForecastConfig) -> list[int]:
        """Forecast origins of a file of n steps: every eval_stride steps back from n - horizon."""
        stride = cfg.eval_stride or cfg.horizon
        return list(range(n - cfg.horizon, cfg.context - 1, -stride))[::-1]

    @torch.no_grad()
    def forecast(self, run, contexts: list[np.ndarray], horizon: int, model=None,
                 batch_size: int | None = None) -> Forecast:
        """Forecasts of `horizon` steps after each context (S, F) (normalised, the source codec's
        columns), in the series' units. Beyond the trained horizon the median is fed back as the
        next steps' context (targets only), so intervals there are too narrow."""
        fc = run.config.data.forecast
        trained = fc.horizon
        if horizon > trained:
            if len(run.source.columns) != len(run.target.columns):
                raise ValueError(f"horizon {horizon} > the trained data.forecast.horizon={trained}: rolling "
                                 "forward needs future values of the input-only columns; ask for at most "
                                 f"{trained} steps")
            parts, ctx = [], [c.copy() for c in contexts]
            left = horizon
            while left > 0:
                f = self.forecast(run, ctx, min(trained, left), model, batch_size)
                parts.append(f)
                step = run.target.normalise(f.point)  # (W, h, T)
                ctx = [np.concatenate([c, s.astype(np.float32)])[-fc.context:] for c, s in zip(ctx, step)]
                left -= f.point.shape[1]
            cat = lambda xs: np.concatenate(xs, axis=1)  # noqa: E731
            return Forecast(cat([p.point for p in parts]),
                            {q: cat([p.quantiles[q] for p in parts]) for q in parts[0].quantiles},
                            cat([p.mean for p in parts]) if parts[0].mean is not None else None,
                            cat([p.std for p in parts]) if parts[0].std is not None else None)
        return self._forecast(run, contexts, horizon, model or run.model, batch_size or run.config.decode.batch_size)

    def _windows(self, run, contexts):
        for c in contexts:
            if c.ndim != 2 or c.shape[1] != len(run.source.columns):
                raise ValueError(f"a context of shape {c.shape}; the run reads {len(run.source.columns)} columns")
        ws = [make_window(c, len(run.target.columns), run.config.data.forecast.scale) for c in contexts]
        return ws

    def _forecast(self, run, contexts, horizon, model, batch_size) -> Forecast:
        ws = self._windows(run, contexts)
        c = run.config.model
        outs = []
        for k in range(0, len(ws), batch_size):
            src = torch.from_numpy(np.stack([w.src for w in ws[k: k + batch_size]]))
            outs.append(model.predict(src, torch.ones(src.shape[:2], dtype=torch.bool), horizon).numpy())
        out = np.concatenate(outs).astype(np.float64)                       # (W, H, T, P)
        level = np.stack([w.level for w in ws])[:, None, :]                # (W, 1, T)
        tgt = run.target
        lo, hi = interval_levels(run.config.data.forecast.interval)
        if c.loss == "gaussian":
            mean = tgt.restore(out[..., 0] + level)
            std = out[..., 1] * tgt.std
            normal = torch.distributions.Normal(0.0, 1.0)
            quantiles = {q: mean + std * float(normal.icdf(torch.tensor(q))) for q in (lo, 0.5, hi)}
            return Forecast(mean, quantiles, mean, std)
        qs = np.sort(out, axis=-1)  # crossing quantiles put back in order
        quantiles = {round(q, 6): tgt.restore(qs[..., i] + level) for i, q in enumerate(c.quantiles)}
        return Forecast(quantiles[0.5], quantiles)

    def evaluate(self, run, series, metrics, beam=None, batch_size=None, model=None):
        """Metrics over every forecast origin of every file; rows (file@time, forecast, [actual])."""
        fc = run.config.data.forecast
        actual, contexts, names = [], [], []
        for s, x in zip(series, self.inputs(series, run.source)):
            check_length(s, fc.context + fc.horizon, f"data.forecast.context + horizon = {fc.context} + {fc.horizon}")
            y = s.select(run.target.columns)
            for t in self.origins(len(x), fc):
                contexts.append(x[t - fc.context: t])
                actual.append(y[t: t + fc.horizon])
                names.append(f"{s.path}@{s.times[t]}")
        f = self.forecast(run, contexts, fc.horizon, model, batch_size)
        actual = np.stack(actual)
        lo, hi = interval_levels(fc.interval)
        shown = {q: v for q, v in f.quantiles.items() if q in (lo, 0.5, hi)} or f.quantiles
        result = forecast_metrics(metrics, actual, f.point, shown, run.target.mase_scale, f.crps(actual))
        fmt = lambda a: " ".join(f"{v:.4g}" for v in a.reshape(-1))  # noqa: E731
        rows = [(n, fmt(p), [fmt(a)]) for n, p, a in zip(names, f.point, actual)]
        return result, rows


class ForecastBinsTask(ForecastTask):
    """Forecasting with a token decoder over quantised values: cross-entropy on bin ids, forecasts
    sampled (search.sample) `data.forecast.samples` times per window."""

    def check(self, cfg: Config) -> None:
        check_metrics(self, cfg)
        if cfg.model.family not in ("series_transformer", "series_rnn"):
            raise ValueError(f"model.family: data.task 'forecast' needs forecaster, series_transformer or "
                             f"series_rnn, not {cfg.model.family!r}")

    def fit_codecs(self, cfg: Config, train: list[Series], init: InitCodecs | None = None):
        source, scaler = super().fit_codecs(cfg, train, init)
        data = windows(train, self.inputs(train, source), cfg.data.forecast, len(scaler.columns))
        labels = np.concatenate([data.collate(list(range(k, min(k + 512, len(data.src))))).labels.numpy()
                                 .reshape(-1) for k in range(0, len(data.src), 512)])
        return source, ValueBins.fit(scaler, labels, cfg.data.forecast.bins)

    def encode(self, series, source, target, cfg: Config, what: str = "train"):
        return windows(series, self.inputs(series, source), cfg.data.forecast, len(target.scaler.columns), target)

    def loss(self, out, batch, cfg):
        return Task.loss(self, out, batch, cfg)

    def forecast(self, run, contexts, horizon, model=None, batch_size=None) -> Forecast:
        fc = run.config.data.forecast
        if horizon > fc.horizon:
            raise ValueError(f"horizon {horizon} > the trained data.forecast.horizon={fc.horizon}")
        model = model or run.model
        bins: ValueBins = run.target
        ws = self._windows(run, contexts)
        n_t = len(bins.scaler.columns)
        n, size = fc.samples, batch_size or run.config.decode.batch_size
        gen = torch.Generator().manual_seed(run.config.train.seed)
        paths = np.empty((len(ws), n, fc.horizon * n_t))
        per = max(1, size // n)
        for k in range(0, len(ws), per):
            part = ws[k: k + per]
            src = torch.from_numpy(np.stack([w.src for w in part])).repeat_interleave(n, 0)
            hyps = sample(model, src, torch.ones(src.shape[:2], dtype=torch.bool), 0.0, fc.horizon * n_t,
                          generator=gen)
            for i, h in enumerate(hyps):
                v = bins.decode(h[0].tokens[: fc.horizon * n_t])
                v = np.concatenate([v, np.full(fc.horizon * n_t - len(v), np.nan)])
                for j in range(1, len(v)):  # a path cut short by </s> stays at its last value
                    if np.isnan(v[j]):
                        v[j] = v[j - 1]
                paths[k + i // n, i % n] = np.nan_to_num(v)
        level = np.stack([w.level for w in ws])[:, None, None, :]          # (W, 1, 1, T)
        values = bins.scaler.restore(paths.reshape(len(ws), n, fc.horizon, n_t) + level)[:, :, :horizon]
        lo, hi = interval_levels(fc.interval)
        quantiles = {q: np.quantile(values, q, axis=1) for q in (lo, 0.5, hi)}
        return Forecast(quantiles[0.5], quantiles)


def next_times(times: list[str], horizon: int) -> list[str]:
    """Timestamps of the `horizon` steps after `times`, where they step regularly: numbers by their
    last difference, ISO dates by whole months (monthly data) or by their last difference; else
    empty strings."""
    from datetime import date, datetime

    if len(times) < 2:
        return [""] * horizon
    try:
        a, b = float(times[-2]), float(times[-1])
        step = b - a
        fmt = (lambda v: str(int(round(v)))) if all(t.lstrip("-").isdigit() for t in times[-2:]) else repr
        return [fmt(b + step * (k + 1)) for k in range(horizon)]
    except ValueError:
        pass
    parse = date.fromisoformat if all(len(t) == 10 for t in times[-2:]) else datetime.fromisoformat
    try:
        a, b = parse(times[-2]), parse(times[-1])
    except ValueError:
        return [""] * horizon
    months = (b.year - a.year) * 12 + b.month - a.month
    if a.day == b.day and months > 0 and (b - a).days >= 28:
        out = []
        for k in range(1, horizon + 1):
            m = b.month - 1 + months * k
            out.append(b.replace(year=b.year + m // 12, month=m % 12 + 1).isoformat())
        return out
    return [(b + (b - a) * k).isoformat() for k in range(1, horizon + 1)]


def forecast_rows(run, series: Series, horizon: int | None = None, model=None) -> list[dict]:
    """The forecast of the `horizon` steps (default: the trained one) after the end of `series`: per
    step and target column the point forecast and the bounds of data.forecast.interval."""
    task = run.task
    fc = run.config.data.forecast
    horizon = horizon or fc.horizon
    if horizon < 1:
        raise ValueError(f"--horizon must be at least 1 (got {horizon})")
    check_length(series, fc.context, "data.forecast.context")
    x = task.inputs([series], run.source)[0]
    f = task.forecast(run, [x[-fc.context:]], horizon, model)
    lo, hi = interval_levels(fc.interval)
    times = next_times(series.times, horizon)
    rows = []
    for h in range(horizon):
        for j, col in enumerate(run.target.columns):
            rows.append({"step": h + 1, "timestamp": times[h], "column": col, "forecast": f.point[0, h, j],
                         f"lower_{lo:g}": f.quantiles[lo][0, h, j], f"upper_{hi:g}": f.quantiles[hi][0, h, j]})
    return rows
