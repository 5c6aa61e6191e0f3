"""BART's noise for denoising autoencoders (Lewis et al. 2020, section 2.2), on one sequence of ids.

`corrupt` applies, in this order (each off at rate / distance 0):

1. local shuffle (`shuffle_distance` k): each symbol moves at most k places
   (the word shuffle of Lample et al. 2018: sort positions by i + U(0, k+1)).
   BART permutes sentences; a line here is one segment (a word, a
   sentence), so the shuffle is local, inside the line.
2. deletion (`delete_rate`): each symbol is dropped with that probability;
   one symbol always stays, so no source is empty.
3. span masking, BART's text infilling (`mask_rate`, `span_lambda`): span
   lengths are drawn from Poisson(lambda) until they cover
   mask_rate * n symbols (rounded at random, so the expected share is
   exact; the last span is cut to fit), placed at random without
   overlapping, and each span is replaced by one `<mask>`; a span of
   length 0 inserts a `<mask>`. Masking comes last so that a `<mask>` is
   never shuffled or deleted.

The generator is numpy's, seeded per batch by the caller (tasks.py) from
(seed, epoch, batch), so a resumed run draws the same noise.
"""
from __future__ import annotations

import numpy as np

from transduce.config import NoiseConfig


def local_shuffle(ids: np.ndarray, distance: int, rng: np.random.Generator) -> np.ndarray:
    """ids in a new order where every symbol is at most `distance` places from where it was."""
    if distance <= 0 or len(ids) < 2:
        return ids
    keys = np.arange(len(ids)) + rng.uniform(0, distance + 1, len(ids))
    return ids[np.argsort(keys, kind="stable")]


def delete_tokens(ids: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """ids with each symbol dropped with probability `rate`; at least one stays."""
    if rate <= 0 or len(ids) == 0:
        return ids
    keep = rng.random(len(ids)) >= rate
    if not keep.any():
        keep[rng.integers(len(ids))] = True
    return ids[keep]


def span_plan(n: int, rate: float, lam: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Non-overlapping masked spans (start, length) over n symbols, in order of start.

    The lengths add up to round_at_random(rate * n); spans of length 0 are
    insertion points. Two spans may touch (each becomes its own <mask>).
    """
    budget = int(rate * n + rng.random()) if rate > 0 else 0
    if budget == 0:
        return []
    lengths: list[int] = []
    total = 0
    while total < budget:
        for length in rng.poisson(lam, size=max(1, int(budget / lam) + 1)).tolist():
            length = min(length, budget - total)
            lengths.append(length)
            total += length
            if total >= budget:
                break
    # Place the k spans among the n - budget kept symbols: choose which of the
    # n - budget + k items of the new sequence are spans, uniformly at random.
    k = len(lengths)
    kept = n - budget
    slots = np.sort(rng.choice(kept + k, size=k, replace=False))
    plan, masked_before = [], 0
    for j, slot in enumerate(slots.tolist()):
        plan.append((slot - j + masked_before, lengths[j]))  # start: kept + masked symbols before it
        masked_before += lengths[j]
    for (s0, l0), (s1, _) in zip(plan, plan[1:]):
        assert s0 + l0 <= s1, plan
    return plan


def mask_spans(ids: np.ndarray, plan: list[tuple[int, int]], mask_id: int) -> np.ndarray:
    """ids with each span of `plan` replaced by one `mask_id`."""
    out, pos = [], 0
    for start, length in plan:
        out.extend(ids[pos:start].tolist())
        out.append(mask_id)
        pos = start + length
    out.extend(ids[pos:].tolist())
    return np.asarray(out, dtype=ids.dtype)


def corrupt(ids: np.ndarray, noise: NoiseConfig, mask_id: int, rng: np.random.Generator) -> np.ndarray:
    """The noisy source for clean `ids` (1-D): shuffle, delete, then mask spans."""
    ids = local_shuffle(np.asarray(ids), noise.shuffle_distance, rng)
    ids = delete_tokens(ids, noise.delete_rate, rng)
    if noise.mask_rate > 0:
        ids = mask_spans(ids, span_plan(len(ids), noise.mask_rate, noise.span_lambda, rng), mask_id)
    return ids
