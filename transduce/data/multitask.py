"""Built-in dataset `multitask` (T5; Raffel et al. 2020): several tasks as one text-to-text corpus.

Each task of `data.multitask.tasks` gives train/dev/test pairs; every source
is prefixed with the task's name and ": " ("g2p: hello", "p2g: HH AH0 L OW1",
"num2words: fr 1234"), so one model learns them all and evaluation can tell
them apart (`task_of`). Tasks:

- `cmudict`: spelling -> ARPAbet phonemes from the CMU Pronouncing
  Dictionary, split and configured as `data.cmudict` says (by word, so a word
  is in one split only); `inverse: true` gives phonemes -> spelling.
- `num2words`: "LANG DIGITS" -> the number in words in that language,
  written locally by the `num2words` package (no download). `numbers`
  distinct numbers per language from 0..max_number (seeded by the language),
  split by a hash of "LANG DIGITS" with the fractions of `data.cmudict`.
- `files`: pairs read from the task's train/dev/test (.tsv, .jsonl, src|tgt).

Mixing (`mixture`): the weights apply per example. Each training epoch holds
`epoch_examples` examples (default: all tasks' training pairs together);
task i gets round(w_i / sum(w) * epoch_examples) of them (largest
remainders, so the shares are exact), drawn without replacement from its
pairs and cycling through them again when it needs more than it has (a
small task is upsampled, a large one sees a different subset each epoch).
The draw is seeded by (train.seed, epoch), so a resumed run repeats it.
Batches then group examples of similar length, so one batch may hold mostly
one task; over an epoch the shares are the weights'.
"""
from __future__ import annotations

import random
import zlib

import numpy as np

from transduce.config import DataConfig, MixTaskConfig
from transduce.data.readers import DataError, Pair, read_pairs

SEPARATOR = ": "


def task_of(source: str) -> str:
    """The task name a source starts with ("" if none)."""
    return source.split(SEPARATOR, 1)[0] if SEPARATOR in source else ""


def num2words_pairs(t: MixTaskConfig, dev_fraction: float, test_fraction: float) -> dict[str, list[Pair]]:
    from transduce.data.cmudict import split_of

    try:
        from num2words import CONVERTER_CLASSES, num2words
    except ImportError:
        raise RuntimeError("task dataset 'num2words' needs the package: pip install num2words") from None
    bad = [lang for lang in t.langs if lang not in CONVERTER_CLASSES]
    if bad:
        raise DataError(f"data.multitask.tasks {t.name}: langs: invalid choice {bad[0]!r}; valid choices: "
                        + ", ".join(sorted(CONVERTER_CLASSES)))
    out: dict[str, list[Pair]] = {"train": [], "dev": [], "test": []}
    for lang in t.langs:
        numbers = random.Random(zlib.crc32(lang.encode())).sample(range(t.max_number + 1), t.numbers)
        for n in sorted(numbers):
            source = f"{lang} {n}"
            out[split_of(source, dev_fraction, test_fraction)].append(
                Pair(source, num2words(n, lang=lang), f"num2words:{lang}:{n}"))
    return out


def task_pairs(t: MixTaskConfig, cfg: DataConfig, cache: dict) -> dict[str, list[Pair]]:
    """The task's train/dev/test pairs, before prefixing (`cache`: datasets already read)."""
    if t.dataset == "cmudict":
        from transduce.data.cmudict import load_cmudict

        if "cmudict" not in cache:
            cache["cmudict"] = load_cmudict(cfg.cmudict)
        return cache["cmudict"]
    if t.dataset == "num2words":
        return num2words_pairs(t, cfg.cmudict.dev_fraction, cfg.cmudict.test_fraction)
    out = {}
    for split in ("train", "dev", "test"):
        spec = getattr(t, split)
        out[split] = read_pairs(spec, cfg.skip_invalid)[0] if spec else []
    return out


def load_multitask(cfg: DataConfig) -> dict[str, list[Pair]]:
    """All tasks' pairs per split, sources prefixed with "NAME: "."""
    splits: dict[str, list[Pair]] = {"train": [], "dev": [], "test": []}
    cache: dict = {}
    for t in cfg.multitask.tasks:
        for split, pairs in task_pairs(t, cfg, cache).items():
            for p in pairs:
                source, target = (p.target, p.source) if t.inverse else (p.source, p.target)
                splits[split].append(Pair(t.name + SEPARATOR + source, target, p.origin))
    return splits


def quotas(weights: tuple[float, ...], total: int) -> list[int]:
    """`total` split in proportion to `weights`, rounded by largest remainder (sums to total)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def mixture(task_ids: np.ndarray, weights: tuple[float, ...], total: int, seed: int) -> np.ndarray:
    """Example indices of one epoch: each task's quota of `total` (0: all examples), drawn from its
    examples without replacement, cycling when the quota is larger than the task."""
    rng = np.random.default_rng(seed)
    picks = []
    for i, q in enumerate(quotas(weights, total or len(task_ids))):
        members = np.flatnonzero(task_ids == i)
        if q == 0 or len(members) == 0:
            continue
        rounds = -(-q // len(members))
        picks.append(np.concatenate([rng.permutation(members) for _ in range(rounds)])[:q])
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
