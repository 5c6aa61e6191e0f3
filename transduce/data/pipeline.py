"""From config to batches: read splits, fit codecs, encode, bucket, pad.

Encoded sequences are stored flat (one int32 array plus offsets), so a large
corpus costs a few bytes per token, not a Python object per token.
"""
from __future__ import annotations

import gc
import itertools
import logging
import random
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from transduce.config import DataConfig
from transduce.data.readers import DataError, Pair, PairList, read_pairs
from transduce.data.vocab import BOS, EOS, PAD, TextCodec, share_vocab

log = logging.getLogger("transduce")


@dataclass
class Splits:
    train: list[Pair]
    dev: list[Pair]
    test: list[Pair]


@contextmanager
def paused_gc():
    """Python's cyclic garbage collector rescans every live container again and again while
    millions are allocated (docs/benchmarks.md, "Data scale"); reading and encoding make no
    reference cycles, so it is paused meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_splits(cfg: DataConfig, read=None) -> Splits:
    """Read train/dev/test as configured; report skipped lines.

    `read(spec, skip_invalid) -> (pairs, report)` reads one file; default: as
    data.format says (a task with its own file format passes its reader).
    """
    with paused_gc():
        return _load_splits(cfg, read)


def _load_splits(cfg: DataConfig, read=None) -> Splits:
    if cfg.dataset == "cmudict":
        from transduce.data.cmudict import load_cmudict

        s = load_cmudict(cfg.cmudict)
        return Splits(s["train"], s["dev"], s["test"])
    if cfg.dataset == "multitask":
        from transduce.data.multitask import load_multitask

        s = load_multitask(cfg)
        return Splits(s["train"], s["dev"], s["test"])
    if not cfg.train:
        raise DataError("config key data.train: no training data (set data.train or data.dataset)")
    out = {}
    for name in ("train", "dev", "test"):
        spec = getattr(cfg, name)
        if not spec:
            out[name] = []
            continue
        if read is not None:
            pairs, report = read(spec, cfg.skip_invalid)
        else:
            pairs, report = read_pairs(spec, cfg.skip_invalid, cfg.format)
        if report.skipped:
            log.warning("%s: skipped %d invalid lines of %d (data.skip_invalid); first: %s",
                        spec, report.skipped, report.read + report.skipped, report.first_problems[0])
        if not pairs:
            raise DataError(f"{spec}: no usable pairs")
        out[name] = pairs
    return Splits(**out)


def columns(pairs) -> tuple[list[str], list[str]]:
    """Sources and targets of pairs (a `PairList` has them as they are, with no copy)."""
    if isinstance(pairs, PairList):
        return pairs.sources, pairs.targets
    return [p.source for p in pairs], [p.target for p in pairs]


def fit_codecs(cfg: DataConfig, train: list[Pair], shared: bool) -> tuple[TextCodec, TextCodec]:
    """The source and target codecs fitted on the training pairs: one per side, over one vocabulary
    where `shared` (shared embeddings), or one tokenizer fitted on both sides (data.joint_tokenizer)."""
    sources, targets = columns(train)
    if cfg.joint_tokenizer:
        joint = TextCodec.fit(cfg.source_tokenizer, list(sources) + list(targets))
        t = cfg.target_tokenizer
        return joint, TextCodec(joint.tokenizer, joint.vocab, t.wrap, t.reverse)
    src = TextCodec.fit(cfg.source_tokenizer, sources)
    tgt = TextCodec.fit(cfg.target_tokenizer, targets)
    return share_vocab(src, tgt) if shared else (src, tgt)


class TokenArray:
    """Many int sequences in one flat int32 array with offsets."""

    def __init__(self, seqs: list[list[int]]):
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        self.offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(self.offsets[-1]))

    @classmethod
    def from_flat(cls, flat: np.ndarray, lengths: np.ndarray) -> "TokenArray":
        out = cls.__new__(cls)
        out.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out.offsets[1:])
        out.flat = np.ascontiguousarray(flat, dtype=np.int32)
        return out

    def select(self, keep: np.ndarray) -> "TokenArray":
        """The sequences where the boolean mask `keep` is true, in order."""
        lengths = self.lengths()
        return TokenArray.from_flat(self.flat[np.repeat(keep, lengths)], lengths[keep])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]: self.offsets[i + 1]]

    def padded(self, index: list[int], value: int = PAD, prefix: int | None = None,
               suffix: int | None = None) -> torch.Tensor:
        """(len(index), width) int64: sequences `index`, each with `prefix` before it and `suffix`
        after it if given, padded with `value` on the right; one vectorised gather per batch."""
        idx = np.asarray(index, dtype=np.int64)
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        first = int(prefix is not None)
        width = (int(lengths.max()) if len(idx) else 0) + first + int(suffix is not None)
        out = np.full((len(idx), width), value, dtype=np.int64)
        col = np.arange(width)[None, :] - first         # position within each sequence
        real = (col >= 0) & (col < lengths[:, None])
        out[real] = self.flat[(starts[:, None] + col)[real]]
        if prefix is not None:
            out[:, 0] = prefix
        if suffix is not None:
            out[np.arange(len(idx)), first + lengths] = suffix
        return torch.from_numpy(out)


@dataclass
class EncodedPairs:
    src: TokenArray
    tgt: TokenArray

    def collate(self, index: list[int], key=None) -> "Batch":
        """The padded batch of examples `index`; tasks with other batches subclass this
        (transduce/tasks.py). `key` seeds whatever a task draws at random per batch."""
        src = self.src.padded(index)
        return Batch(src, src != PAD, self.tgt.padded(index, prefix=BOS), self.tgt.padded(index, suffix=EOS))

    def epoch_pool(self, seed: int, epoch: int) -> np.ndarray | None:
        """Indices of the examples of one epoch (they may repeat); None: every example once.
        A mixture of tasks draws them by weight (tasks.py, MixedData)."""
        return None


def fit_encode_pairs(cfg: DataConfig, pairs: list[Pair], what: str = "train"
                     ) -> tuple[TextCodec, TextCodec, EncodedPairs]:
    """`fit_codecs` (no shared vocabulary) and `encode_pairs` in one pass over each column
    (`TextCodec.fit_encode`): what training on a large corpus does first."""
    sources, targets = columns(pairs)
    src_unk, tgt_unk = Counter(), Counter()
    src, *src_ids = TextCodec.fit_encode(cfg.source_tokenizer, sources, src_unk)
    tgt, *tgt_ids = TextCodec.fit_encode(cfg.target_tokenizer, targets, tgt_unk)
    return src, tgt, _checked_pairs(pairs, TokenArray.from_flat(*src_ids), TokenArray.from_flat(*tgt_ids),
                                    src_unk, tgt_unk, cfg, what)


def encode_pairs(pairs: list[Pair], src: TextCodec, tgt: TextCodec, cfg: DataConfig,
                 what: str = "train") -> EncodedPairs:
    """Encode pairs (in bulk, see `TextCodec.encode_many`); too-long pairs are an error unless
    data.skip_invalid."""
    sources, targets = columns(pairs)
    src_unk, tgt_unk = Counter(), Counter()
    src_ids = TokenArray.from_flat(*src.encode_many(sources, src_unk))
    tgt_ids = TokenArray.from_flat(*tgt.encode_many(targets, tgt_unk))
    return _checked_pairs(pairs, src_ids, tgt_ids, src_unk, tgt_unk, cfg, what)


def _checked_pairs(pairs, src_ids: TokenArray, tgt_ids: TokenArray, src_unk: Counter, tgt_unk: Counter,
                   cfg: DataConfig, what: str) -> EncodedPairs:
    """The encoded pairs after the length limits (an error, or skipped with data.skip_invalid), with
    a warning for unknown symbols."""
    too_long = (src_ids.lengths() > cfg.max_source_len) | (tgt_ids.lengths() + 1 > cfg.max_target_len)
    if too_long.any():
        first = int(np.flatnonzero(too_long)[0])
        origin = pairs.origin(first) if isinstance(pairs, PairList) else pairs[first].origin
        if not cfg.skip_invalid:
            raise DataError(f"{origin}: pair longer than data.max_source_len={cfg.max_source_len} "
                            f"/ max_target_len={cfg.max_target_len} ({len(src_ids[first])} / "
                            f"{len(tgt_ids[first]) + 1} tokens)")
        log.warning("%s: skipped %d pairs over the length limits; first: %s", what, int(too_long.sum()), origin)
        src_ids, tgt_ids = src_ids.select(~too_long), tgt_ids.select(~too_long)
    for side, unk in (("source", src_unk), ("target", tgt_unk)):
        if unk:
            common = ", ".join(f"{s!r}x{c}" for s, c in unk.most_common(5))
            log.warning("%s %s: %d unknown symbols mapped to <unk> (%s)", what, side, sum(unk.values()), common)
    return EncodedPairs(src_ids, tgt_ids)


def group_references(pairs: list[Pair]) -> tuple[list[str], list[list[str]]]:
    """Distinct sources in first-seen order, each with all its targets as references."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for p in pairs:
        groups.setdefault(p.source, []).append(p.target)
    return list(groups), list(groups.values())


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------

@dataclass
class Batch:
    src: torch.Tensor        # (B, S) source ids, PAD-padded
    src_mask: torch.Tensor   # (B, S) True at real tokens
    tgt_in: torch.Tensor     # (B, T) <s> y1 .. yn, PAD-padded
    labels: torch.Tensor     # (B, T) y1 .. yn </s>, PAD where ignored

    @property
    def n_src_tokens(self) -> int:
        return int(self.src_mask.sum())

    @property
    def n_tgt_tokens(self) -> int:
        return int((self.labels != PAD).sum())


def pad(seqs: list, value: int = PAD) -> torch.Tensor:
    """(len(seqs), longest) int64 with each sequence (list or array of ids) left-aligned, `value` after."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max())
    if seqs and isinstance(seqs[0], np.ndarray):
        flat = np.concatenate(seqs).astype(np.int64, copy=False)
    else:  # one pass over Python ints, not a tensor per sequence
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    out = np.full((len(seqs), width), value, dtype=np.int64)
    out[np.arange(width) < lengths[:, None]] = flat
    return torch.from_numpy(out)


def collate(data: EncodedPairs, index: list[int], key=None) -> Batch:
    """The batch of examples `index`, as the data's task makes it (see EncodedPairs.collate)."""
    return data.collate(index, key)


def token_budget_batches(src_len: np.ndarray, tgt_len: np.ndarray, batch_tokens: int,
                         max_pairs: int, seed: int) -> list[list[int]]:
    """Group examples of similar length into batches of at most `batch_tokens` padded tokens.

    Sorting by length (ties broken at random) keeps padding small; the batch
    order is shuffled. The same seed gives the same batches.
    """
    rng = np.random.default_rng(seed)
    noise = rng.random(len(src_len))
    # The order of np.lexsort((noise, tgt_len, src_len)), 4x faster: shuffle by the noise, then a
    # stable sort by length (a radix sort when the lengths fit 16 bits).
    shuffle = np.argsort(noise)
    src_len, tgt_len = np.asarray(src_len, dtype=np.int64), np.asarray(tgt_len, dtype=np.int64)
    key = src_len[shuffle] * (int(tgt_len.max(initial=0)) + 1) + tgt_len[shuffle]
    if key.size and key.max() < 1 << 16:
        key = key.astype(np.uint16)
    order = shuffle[np.argsort(key, kind="stable")]
    s_sorted = np.asarray(src_len)[order]
    t_sorted = np.asarray(tgt_len)[order] + 1  # + </s>
    batches, start, n = [], 0, len(order)
    while start < n:
        # Padded size of the first k+1 examples from `start`: it only grows with k, so the batch
        # takes every example up to the first one over the budget (the first one always).
        end = min(n, start + max_pairs)
        size = np.arange(1, end - start + 1) * (np.maximum.accumulate(s_sorted[start:end])
                                                + np.maximum.accumulate(t_sorted[start:end]))
        take = max(1, int(np.searchsorted(size, batch_tokens, side="right")))
        batches.append(order[start: start + take].tolist())
        start += take
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def epoch_plan(data: EncodedPairs, batch_tokens: int, max_pairs: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each batch of one epoch: the same on every process, reshuffled each epoch."""
    pool = data.epoch_pool(seed, epoch)
    if pool is None:
        return token_budget_batches(data.src.lengths(), data.tgt.lengths(), batch_tokens, max_pairs,
                                    seed * 100_003 + epoch)
    plan = token_budget_batches(data.src.lengths()[pool], data.tgt.lengths()[pool], batch_tokens, max_pairs,
                                seed * 100_003 + epoch)
    return [[int(pool[i]) for i in batch] for batch in plan]


def epoch_batches(data: EncodedPairs, batch_tokens: int, max_pairs: int, seed: int, epoch: int,
                  start: int = 0) -> Iterator[tuple[int, Batch]]:
    """Batches of one epoch, from position `start` (for exact resume)."""
    plan = epoch_plan(data, batch_tokens, max_pairs, seed, epoch)
    for pos in range(start, len(plan)):
        yield pos, collate(data, plan[pos], (seed, epoch, pos))


def source_batches(sources: list[list[int]], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Sorted-by-length batches of sources for decoding: yields (original indices, padded ids)."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    for k in range(0, len(order), batch_size):
        idx = order[k: k + batch_size]
        yield idx, pad([sources[i] for i in idx])


def shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items
