"""Time series for encoder-decoders: CSV files in, windows of normalised values out.

A series file is a CSV with a header: a timestamp column (data.forecast.timestamp)
and value columns, one row per step in time order. Every value a run reads must be
a finite number: a missing value, NaN or text is an error naming the file, the row
(the file's line number) and the column.

    SeriesScaler   per-feature mean and standard deviation fitted on the training
                   series, saved with the run (source_codec.json / target_codec.json)
    ValueBins      bins of the (normalised, window-relative) target values fitted on
                   the training windows: a decoder over quantised values writes bin ids
    SeriesWindows  the training windows: `context` steps in, `horizon` steps out

With `scale: window` every window is shifted by the mean of its context (in
normalised units, per feature) so that a trending level stays in the range the
model saw; forecasts are shifted back (`Window.level`).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transduce.config import ForecastConfig
from transduce.data.pipeline import Batch, EncodedPairs
from transduce.data.readers import DataError
from transduce.data.vocab import BOS, EOS, SPECIALS, Vocab


@dataclass(eq=False)
class Series:
    """One series file: `values` (N, C) float64 of `columns`, `times` the timestamp column as read.
    It stands where the text tasks have a pair (`source`, `target`, `origin`)."""
    path: str
    columns: list[str]
    times: list[str]
    values: np.ndarray
    first_line: int = 2  # line number of the first data row (the header is line 1)

    @property
    def source(self) -> "Series":
        return self

    @property
    def target(self) -> str:
        return ""

    @property
    def origin(self) -> str:
        return self.path

    def select(self, names: list[str]) -> np.ndarray:
        """(N, len(names)) the values of columns `names`."""
        return self.values[:, [self.columns.index(n) for n in names]]


def value_columns(cfg: ForecastConfig, header: list[str]) -> tuple[list[str], list[str]]:
    """(targets, inputs-only) columns of a file with `header` (targets default: every value column)."""
    targets = list(cfg.targets) or [h for h in header if h != cfg.timestamp and h not in cfg.inputs]
    return targets, list(cfg.inputs)


def read_series(path: str | Path, cfg: ForecastConfig, columns: list[str] | None = None) -> Series:
    """The series in CSV file `path`: the timestamp column and `columns` (default: the targets and
    inputs of `cfg`), every value checked to be a finite number."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".txt"):
        raise DataError(f"{path}: a series is a CSV file (.csv) with a header row")
    try:
        f = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    with f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        if not header:
            raise DataError(f"{path}: empty file (expected a header row: {cfg.timestamp},COLUMN,...)")
        if columns is None:
            columns = sum(value_columns(cfg, header), [])
        for name in [cfg.timestamp] + columns:
            if name not in header:
                raise DataError(f"{path}:1: no column {name!r} in the header (columns: {', '.join(header)})")
        if not columns:
            raise DataError(f"{path}:1: no value columns besides the timestamp {cfg.timestamp!r}")
        t_col = header.index(cfg.timestamp)
        cols = [header.index(c) for c in columns]
        times, values = [], []
        for line, row in enumerate(rows, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            out = []
            for name, c in zip(columns, cols):
                cell = row[c].strip()
                try:
                    v = float(cell)
                except ValueError:
                    v = None
                if v is None or not math.isfinite(v):
                    what = "missing value" if cell.lower() in ("", "nan", "na", "null") else f"{cell!r} is not a finite number"
                    raise DataError(f"{path}:{line}: column {name!r}: {what} (fill or drop the row; "
                                    "forecasting needs every step)")
                out.append(v)
            times.append(row[t_col].strip())
            values.append(out)
    if not values:
        raise DataError(f"{path}: no data rows after the header")
    return Series(str(path), list(columns), times, np.asarray(values, dtype=np.float64))


def check_length(series: Series, need: int, what: str) -> None:
    if len(series.values) < need:
        raise DataError(f"{series.path}: {len(series.values)} rows, shorter than one window ({what} = {need} rows)")


# ---------------------------------------------------------------------------
# Codecs: what a run saves to turn values into model inputs and back
# ---------------------------------------------------------------------------

class SeriesScaler:
    """Per-feature normalisation (x - mean) / std, fitted on the training series. `vocab` is the
    columns (the model's input or output width is its length). `mase_scale`: per column, the mean
    absolute seasonal difference of the training series (the in-sample seasonal-naive error that
    MASE divides by)."""

    kind = "series_scaler"

    def __init__(self, columns: list[str], mean: list[float], std: list[float],
                 mase_scale: list[float] | None = None, season: int = 1):
        self.columns = list(columns)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.mase_scale = np.asarray(mase_scale if mase_scale is not None else [1.0] * len(columns), dtype=np.float64)
        self.season = season
        assert len(self.mean) == len(self.std) == len(self.columns) == len(self.mase_scale)

    @property
    def vocab(self) -> tuple[str, ...]:
        return tuple(self.columns)

    @classmethod
    def fit(cls, series: list[Series], columns: list[str], season: int = 1) -> "SeriesScaler":
        values = np.concatenate([s.select(columns) for s in series])
        std = values.std(0)
        std[std < 1e-8] = 1.0  # a constant column: shift only
        scale = []
        for j in range(len(columns)):
            diffs = [np.abs(s.select([columns[j]])[season:, 0] - s.select([columns[j]])[:-season, 0])
                     for s in series if len(s.values) > season]
            d = np.concatenate(diffs) if diffs else np.zeros(0)
            scale.append(float(d.mean()) if d.size and d.mean() > 0 else 1.0)
        return cls(columns, values.mean(0).tolist(), std.tolist(), scale, season)

    def normalise(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def restore(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean

    def to_dict(self) -> dict:
        return {"kind": self.kind, "columns": self.columns, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "mase_scale": self.mase_scale.tolist(), "season": self.season}

    @classmethod
    def from_dict(cls, d: dict) -> "SeriesScaler":
        return cls(d["columns"], d["mean"], d["std"], d.get("mase_scale"), int(d.get("season", 1)))

    def dumps(self) -> str:
        return json.dumps(self.to_dict())


class ValueBins:
    """Target values (normalised, window-relative) as tokens: `bins` bins with edges at quantiles of
    the training values, so each bin is about as frequent; a bin decodes to the mean of its training
    values. Token ids follow the specials (PAD, UNK, BOS, EOS), so search runs over them as over
    text. Wraps a `SeriesScaler` of the target columns (`scaler`)."""

    kind = "value_bins"

    def __init__(self, scaler: SeriesScaler, edges: list[float], centres: list[float]):
        self.scaler = scaler
        self.edges = np.asarray(edges, dtype=np.float64)      # (bins - 1,) inner edges
        self.centres = np.asarray(centres, dtype=np.float64)  # (bins,)
        self.vocab = Vocab(list(SPECIALS) + [f"<v{i}>" for i in range(len(self.centres))])

    # the target columns, their normalisation and MASE scale: the scaler's
    columns = property(lambda self: self.scaler.columns)
    mase_scale = property(lambda self: self.scaler.mase_scale)
    std = property(lambda self: self.scaler.std)

    def normalise(self, values: np.ndarray) -> np.ndarray:
        return self.scaler.normalise(values)

    def restore(self, values: np.ndarray) -> np.ndarray:
        return self.scaler.restore(values)

    @classmethod
    def fit(cls, scaler: SeriesScaler, values: np.ndarray, bins: int) -> "ValueBins":
        v = np.sort(values.reshape(-1))
        edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
        idx = np.searchsorted(edges, v, side="right")
        centres = [float(v[idx == i].mean()) if (idx == i).any() else 0.0 for i in range(len(edges) + 1)]
        return cls(scaler, edges.tolist(), centres)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """values (...) -> token ids (...)."""
        return np.searchsorted(self.edges, values, side="right") + len(SPECIALS)

    def decode(self, ids) -> np.ndarray:
        """Token ids -> bin centres; specials (a hypothesis cut short) decode to NaN."""
        ids = np.asarray(ids, dtype=np.int64) - len(SPECIALS)
        ok = (ids >= 0) & (ids < len(self.centres))
        return np.where(ok, self.centres[np.clip(ids, 0, len(self.centres) - 1)], np.nan)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scaler": self.scaler.to_dict(), "edges": self.edges.tolist(),
                "centres": self.centres.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ValueBins":
        return cls(SeriesScaler.from_dict(d["scaler"]), d["edges"], d["centres"])

    def dumps(self) -> str:
        return json.dumps(self.to_dict())


CODEC_KINDS = {SeriesScaler.kind: SeriesScaler, ValueBins.kind: ValueBins}


def series_codec(d: dict):
    """The series codec saved as `d` (see CODEC_KINDS), or None for a text codec."""
    cls = CODEC_KINDS.get(d.get("kind")) if isinstance(d, dict) else None
    return cls.from_dict(d) if cls is not None else None


# ---------------------------------------------------------------------------
# Windows and batches
# ---------------------------------------------------------------------------

@dataclass
class Window:
    """One forecast's input: src (S, F) normalised (and window-relative) inputs; level (T,) what was
    subtracted from the targets' columns (add it back to the forecast, then `restore`)."""
    src: np.ndarray
    level: np.ndarray


def make_window(context: np.ndarray, n_targets: int, scale: str) -> Window:
    """context (S, F) normalised values (targets first) -> the model's input."""
    level = context.mean(0) if scale == "window" else np.zeros(context.shape[1])
    return Window((context - level).astype(np.float32), level[:n_targets])


@dataclass
class SeriesBatch(Batch):
    """src (B, S, F) float; src_mask (B, S); labels (B, H, T) float targets (regression), or the
    Batch of a token decoder (tgt_in/labels (B, H*T) bin ids)."""

    @property
    def n_tgt_tokens(self) -> int:
        if self.labels.is_floating_point():
            return self.labels.numel()
        return super().n_tgt_tokens


class Lengths:
    """The lengths of a dataset's sequences (what batching by token budget reads)."""

    def __init__(self, lengths):
        self._lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._lengths)

    def lengths(self) -> np.ndarray:
        return self._lengths


@dataclass
class SeriesWindows(EncodedPairs):
    """Every window of `context` + `horizon` steps of the training series, starting every `stride`
    steps. inputs: per series (N, F) normalised; targets: the first T of those columns. With `bins`,
    batches hold bin ids for a token decoder (tgt_in <s> y1..; labels y1.. </s>)."""

    inputs: list = field(default_factory=list)
    starts: np.ndarray = None    # (W, 2) series index, first step
    context: int = 0
    horizon: int = 0
    n_targets: int = 1
    scale: str = "window"
    bins: ValueBins | None = None

    def collate(self, index: list[int], key=None) -> SeriesBatch:
        srcs, labels = [], []
        for i in index:
            s, t = self.starts[i]
            x = self.inputs[s]
            w = make_window(x[t: t + self.context], self.n_targets, self.scale)
            srcs.append(w.src)
            labels.append(x[t + self.context: t + self.context + self.horizon, : self.n_targets] - w.level)
        src = torch.from_numpy(np.stack(srcs))                               # (B, S, F)
        mask = torch.ones(src.shape[:2], dtype=torch.bool)
        y = np.stack(labels).astype(np.float32)                              # (B, H, T)
        if self.bins is None:
            return SeriesBatch(src, mask, src.new_zeros(len(index), 0, dtype=torch.long), torch.from_numpy(y))
        ids = torch.from_numpy(self.bins.encode(y.reshape(len(index), -1)).astype(np.int64))  # (B, H*T)
        bos = torch.full((len(index), 1), BOS, dtype=torch.long)
        eos = torch.full((len(index), 1), EOS, dtype=torch.long)
        return SeriesBatch(src, mask, torch.cat([bos, ids], 1), torch.cat([ids, eos], 1))


def windows(series: list[Series], inputs: list[np.ndarray], cfg: ForecastConfig, n_targets: int,
            bins: ValueBins | None = None) -> SeriesWindows:
    """The training windows of `series` (their normalised `inputs`); a series shorter than one
    window is an error."""
    need = cfg.context + cfg.horizon
    starts = []
    for k, (s, x) in enumerate(zip(series, inputs)):
        check_length(s, need, f"data.forecast.context + horizon = {cfg.context} + {cfg.horizon}")
        starts += [(k, t) for t in range(0, len(x) - need + 1, cfg.stride)]
    n = len(starts)
    return SeriesWindows(Lengths(np.full(n, cfg.context)), Lengths(np.full(n, cfg.horizon * n_targets)), inputs,
                         np.asarray(starts, dtype=np.int64).reshape(-1, 2), cfg.context, cfg.horizon,
                         n_targets, cfg.scale, bins)
