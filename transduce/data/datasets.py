"""Encoded datasets of the tasks other than plain seq2seq: each `collate(index, key)` makes a `Batch`
whose loss is the cross-entropy of `model(batch)` against `batch.labels` (see transduce/tasks).
Whatever a dataset draws at random per batch (masks, noise) is seeded by the batch's key, so a
resumed run sees the same batches."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from transduce.config import NoiseConfig
from transduce.data.masking import Masking, mask_tokens
from transduce.data.multitask import mixture
from transduce.data.noise import corrupt
from transduce.data.pipeline import Batch, EncodedPairs, pad
from transduce.data.vocab import BOS, EOS, PAD


def batch_seed(index: list[int], key) -> int:
    return zlib.crc32(repr(key if key is not None else (len(index), index[:16])).encode())


@dataclass
class LabelledData(EncodedPairs):
    """tgt: one label id per text (classify), or one per source position, PAD where none (tag)."""

    def collate(self, index: list[int], key=None) -> Batch:
        src = pad([self.src[i] for i in index])
        labels = pad([self.tgt[i] for i in index])  # (B, 1) or (B, S)
        return Batch(src, src != PAD, src.new_zeros(len(index), 0), labels)


@dataclass
class MaskedData(EncodedPairs):
    """Texts masked afresh for every batch, seeded by the batch's key (exact resume)."""

    masking: Masking = None

    def collate(self, index: list[int], key=None) -> Batch:
        ids = pad([self.src[i] for i in index])
        seed = batch_seed(index, key)
        inputs, labels = mask_tokens(ids, self.masking, torch.Generator().manual_seed(seed))
        return Batch(inputs, ids != PAD, ids.new_zeros(len(index), 0), labels)


@dataclass
class MixedData(EncodedPairs):
    """Pairs of several tasks; each epoch draws its examples by task weight (data/multitask.py)."""

    task_ids: np.ndarray = None   # (N,) index into weights of each example's task
    weights: tuple = ()
    epoch_examples: int = 0

    def epoch_pool(self, seed: int, epoch: int) -> np.ndarray:
        return mixture(self.task_ids, self.weights, self.epoch_examples, seed * 100_003 + epoch)



@dataclass
class NoisyData(EncodedPairs):
    """Clean lines (src = tgt); each batch's sources corrupted afresh, seeded by the batch's key."""

    noise: NoiseConfig = None
    mask_id: int = PAD

    def collate(self, index: list[int], key=None) -> Batch:
        seed = batch_seed(index, key)
        rng = np.random.default_rng(seed)
        srcs = [corrupt(self.src[i], self.noise, self.mask_id, rng) for i in index]
        tgts = [self.tgt[i] for i in index]
        src = pad(srcs)
        tgt_in = pad([np.concatenate(([BOS], t)) for t in tgts])
        labels = pad([np.concatenate((t, [EOS])) for t in tgts])
        return Batch(src, src != PAD, tgt_in, labels)
