"""Compare model families on G2P at the same training-time budget.

    python bench/families.py --minutes 10 [--recipes recipes/g2p_cmudict.yaml ...] [--out runs/families]

Trains each recipe for the same wall-clock budget (or reuses a finished run
in OUT/NAME), then reports test WER/PER (beam 5), parameters, mean training
tokens/s (from metrics.jsonl) and decoding words/s (beam 5) as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT = ["recipes/g2p_cmudict.yaml", "recipes/g2p_cmudict_lstm.yaml", "recipes/g2p_cmudict_gru_noattn.yaml"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--out", default="runs/families")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from transduce.data.pipeline import group_references, load_splits
    from transduce.inference import decode
    from transduce.runs import load_run
    from transduce import metrics as M

    rows = []
    for recipe in args.recipes:
        name = Path(recipe).stem
        run_dir = Path(args.out) / name
        if not (run_dir / "checkpoints" / "index.json").exists():
            subprocess.run([sys.executable, "-m", "transduce", "train", recipe, "--out", str(run_dir),
                            "--set", f"train.max_minutes={args.minutes}", "--set", f"train.threads={args.threads}"],
                           check=True)
        torch.set_num_threads(args.threads)
        run = load_run(run_dir)
        words, refs = group_references(load_splits(run.config.data).test)
        t = time.perf_counter()
        hyps = decode(run, words, beam=5, nbest=1, batch_size=200)
        dt = time.perf_counter() - t
        result = M.compute(["wer", "per", "wer_nostress", "per_nostress"],
                           [run.target.decode(h[0].tokens) for h in hyps], refs)
        logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["tokens_per_s"] for r in logs if "tokens_per_s" in r]
        desc = run.model.describe()
        label = desc["family"] + (f" {desc.get('cell', '')} {desc.get('attention', '')}" if "cell" in desc else "")
        rows.append((label, result, desc["parameters"], sum(speeds) / max(1, len(speeds)), len(words) / dt,
                     run.state.get("step")))
    print(f"G2P (CMUdict test, {len(words)} words), {args.minutes:g} minutes of training each, "
          f"{args.threads} threads, beam 5")
    print("| family | WER % | PER % | WER % no stress | PER % no stress | parameters | train tokens/s | decode words/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r, n, tps, wps, _ in rows:
        print(f"| {label} | {r['wer']:.1f} | {r['per']:.1f} | {r['wer_nostress']:.1f} | {r['per_nostress']:.1f} "
              f"| {n / 1e6:.2f}M | {tps:,.0f} | {wps:,.0f} |")


if __name__ == "__main__":
    main()
