"""Learning-rate schedules as a pure function of the update number."""
from __future__ import annotations

import math

from transduce.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None, progress: float | None = None) -> float:
    """Learning rate for update `step` (0-based): linear warmup, then decay.

    inverse_sqrt: lr * sqrt(warmup / step) after warmup.
    cosine, linear: from lr down to lr * min_lr_ratio at `total_steps` (needs max_steps), or along
    `progress` (0..1, e.g. the share of a time budget used since warmup) when given: along half a
    cosine wave, or in a straight line.
    """
    warm = max(1, cfg.warmup_steps)
    s = step + 1
    if s <= warm:
        return cfg.lr * s / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(warm / s)
    if progress is None:
        total = max(total_steps or cfg.max_steps, warm + 1)
        progress = (s - warm) / (total - warm)
    progress = min(1.0, max(0.0, progress))
    floor = cfg.lr * cfg.min_lr_ratio
    left = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (cfg.lr - floor) * left
