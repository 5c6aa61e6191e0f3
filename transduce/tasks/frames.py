"""Feature frames in, text out (data.task: frames; families `series_transformer`, `series_rnn`): speech
recognition's shape, with attention decoding and no CTC.

Data: a TSV of `FRAMES.npy<TAB>transcript` lines, each .npy (relative to the TSV's folder) one
utterance's float array (frames, features), read with `np.load(allow_pickle=False)`. The
per-feature normalisation is fitted on the training frames and saved as the run's source codec
(`SeriesScaler`, columns f0..fN-1); the transcript is text in `data.target_tokenizer`.
Evaluation decodes with search (decode.beam) and reports the text metrics (cer, wer, seq_acc).
A bad file (missing, not float frames, another width, NaN) is an error naming the TSV line and
the .npy file.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transduce import metrics as M
from transduce.config import Config
from transduce.data.pipeline import EncodedPairs, TokenArray
from transduce.data.readers import DataError, Pair, ReadReport, read_pairs
from transduce.data.series import Lengths, SeriesBatch, SeriesScaler
from transduce.data.vocab import BOS, EOS, TextCodec
from transduce.search import search
from transduce.tasks.base import InitCodecs, Task, check_metrics, warn_unknown

FRAME_METRICS = ("cer", "wer", "seq_acc")


def load_frames(p: Pair, width: int | None = None) -> np.ndarray:
    """The (frames, features) float32 array of pair `p` (source = the .npy path), checked."""
    where = f"{p.origin}: {p.source}"
    try:
        a = np.load(p.source, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except ValueError as e:  # object arrays (pickles) and files that are not .npy
        raise DataError(f"{where}: not a NumPy array of frames ({e})") from None
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{where}: expected float frames (frames, features), got {a.dtype} of shape {a.shape}")
    if width is not None and a.shape[1] != width:
        raise DataError(f"{where}: frames of width {a.shape[1]}, expected {width} (as the training frames)")
    if not len(a):
        raise DataError(f"{where}: no frames")
    bad = ~np.isfinite(a)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{where}: frame {row}, feature {col}: {a[row, col]} is not a finite number")
    return a.astype(np.float32, copy=False)


@dataclass
class FramesData(EncodedPairs):
    """Normalised frames per utterance and target ids; batches pad frames with zeros."""
    frames: list = field(default_factory=list)

    def collate(self, index: list[int], key=None) -> SeriesBatch:
        n = [len(self.frames[i]) for i in index]
        src = torch.zeros(len(index), max(n), self.frames[index[0]].shape[1])
        for j, i in enumerate(index):
            src[j, : n[j]] = torch.from_numpy(self.frames[i])
        mask = torch.arange(max(n))[None, :] < torch.tensor(n)[:, None]
        return SeriesBatch(src, mask, self.tgt.padded(index, prefix=BOS), self.tgt.padded(index, suffix=EOS))


class FramesTask(Task):
    name = "frames"
    command = "evaluate"
    metrics = FRAME_METRICS
    default_metrics = ("cer", "wer")

    def check(self, cfg: Config) -> None:
        check_metrics(self, cfg)
        if cfg.model.family not in ("series_transformer", "series_rnn"):
            raise ValueError(f"model.family: data.task 'frames' needs series_transformer or series_rnn, not "
                             f"{cfg.model.family!r}")

    def read(self, spec: str, skip_invalid: bool = False) -> tuple[list[Pair], ReadReport]:
        """`FRAMES.npy<TAB>transcript` lines; paths relative to the TSV's folder."""
        pairs, report = read_pairs(spec, skip_invalid)
        folder = Path(spec).parent
        return [Pair(str(folder / p.source.strip()), p.target, p.origin) for p in pairs], report

    def fit_codecs(self, cfg: Config, train: list[Pair], init: InitCodecs | None = None):
        if init is not None:
            raise ValueError("train.init_from: a frames run starts from fresh weights; remove it")
        frames = [load_frames(p) for p in train]
        width = {f.shape[1] for f in frames}
        if len(width) > 1:
            first = next(p for p, f in zip(train, frames) if f.shape[1] != frames[0].shape[1])
            raise DataError(f"{first.origin}: {first.source}: frames of width {load_frames(first).shape[1]}, the "
                            f"first file's are {frames[0].shape[1]}")
        cat = np.concatenate(frames).astype(np.float64)
        std = cat.std(0)
        std[std < 1e-8] = 1.0
        names = [f"f{i}" for i in range(cat.shape[1])]
        source = SeriesScaler(names, cat.mean(0).tolist(), std.tolist())
        return source, TextCodec.fit(cfg.data.target_tokenizer, [p.target for p in train])

    def encode(self, pairs, source: SeriesScaler, target: TextCodec, cfg: Config, what: str = "train") -> FramesData:
        unk = Counter()
        frames = [source.normalise(load_frames(p, len(source.columns))).astype(np.float32) for p in pairs]
        tgts = [target.encode(p.target, unk) for p in pairs]
        warn_unknown(what, "target", unk)
        too_long = [p for p, t in zip(pairs, tgts) if len(t) + 1 > cfg.data.max_target_len]
        if too_long:
            raise DataError(f"{too_long[0].origin}: transcript over data.max_target_len={cfg.data.max_target_len}")
        return FramesData(Lengths([len(f) for f in frames]), TokenArray(tgts), frames)

    @torch.no_grad()
    def transcribe(self, run, pairs: list[Pair], beam: int | None = None, batch_size: int | None = None,
                   model=None) -> list[str]:
        """The decoded text of each utterance, in order."""
        model = model or run.model
        size = batch_size or run.config.decode.batch_size
        frames = [run.source.normalise(load_frames(p, len(run.source.columns))).astype(np.float32) for p in pairs]
        order = sorted(range(len(frames)), key=lambda i: len(frames[i]))
        out = [""] * len(frames)
        data = FramesData(Lengths([len(f) for f in frames]), TokenArray([[] for _ in frames]), frames)
        for k in range(0, len(order), size):
            idx = order[k: k + size]
            b = data.collate(idx)
            for i, h in zip(idx, search(model, b.src, b.src_mask, run.config.decode, beam, 1)):
                out[i] = run.target.decode(h[0].tokens)
        return out

    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        hyps = self.transcribe(run, pairs, beam, batch_size, model)
        refs = [[p.target] for p in pairs]
        return M.compute(list(metrics), hyps, refs), [(p.source, h, r) for p, h, r in zip(pairs, hyps, refs)]
