"""How well an autoencoder's reconstruction loss separates unusual lines from usual ones.

    python recipes/score_ood.py --model runs/ae_words --usual runs/denoise/words_test.txt \
        runs/denoise/ood_random.txt runs/denoise/ood_words_de.txt ...

Scores every line (`transduce score`: mean loss per symbol) and prints, per
file, its mean and median score and the AUROC against the held-out usual
lines: the probability that a line of that file scores higher than a usual
one (0.5: no better than chance, 1.0: always higher).
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

from transduce.data.readers import read_lines
from transduce.runs import load_run
from transduce.registry import task_for


def auroc(usual: list[float], unusual: list[float]) -> float:
    """P(unusual > usual) + P(tie) / 2, by ranks."""
    both = np.concatenate([usual, unusual])
    order = both.argsort(kind="stable")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    for v in np.unique(both):  # average ranks of ties
        tie = both == v
        ranks[tie] = ranks[tie].mean()
    n0, n1 = len(usual), len(unusual)
    return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--usual", required=True, help="held-out lines like the training data")
    ap.add_argument("files", nargs="+", help="lines unlike it")
    args = ap.parse_args()
    run = load_run(args.model)
    task = task_for(run.config)

    def scores(path: str) -> list[float]:
        return [s for s in task.score(run, read_lines(path)) if s is not None]

    usual = scores(args.usual)
    print("| lines | count | mean | median | AUROC vs usual |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {args.usual} (usual) | {len(usual)} | {statistics.mean(usual):.3f} | "
          f"{statistics.median(usual):.3f} | - |")
    for path in args.files:
        s = scores(path)
        print(f"| {path} | {len(s)} | {statistics.mean(s):.3f} | {statistics.median(s):.3f} | "
              f"{auroc(usual, s):.3f} |")


if __name__ == "__main__":
    main()
