"""Checkpoint averaging on a trained run: dev and test metrics of the last single checkpoints
and of the means of the last N, one table.

    python bench/averaging.py --model runs/r60_avg --last 1,3,5,10 [--beam 5] [--quantize int8]

The run must have kept its checkpoints (train.keep_checkpoints >= the largest N). "N = 1" is the
last step checkpoint alone; each row decodes dev and test with the same settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transduce.checkpoint import (average_checkpoints, load_model_tensors, read_checkpoint,  # noqa: E402
                                  step_checkpoints)
from transduce.data.pipeline import load_splits  # noqa: E402
from transduce.inference import evaluate_pairs
from transduce.runs import load_run  # noqa: E402
from transduce.registry import build_model  # noqa: E402
from transduce.models.quantize import quantize, resolve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run directory")
    ap.add_argument("--last", default="1,3,5,10", help="comma-separated counts of newest checkpoints to average")
    ap.add_argument("--beam", type=int, default=None, help="beam size (default: the run's decode.beam)")
    ap.add_argument("--quantize", default=None, help="int8, auto or none (default: the run's decode.quantize)")
    args = ap.parse_args()

    run = load_run(args.model)
    cfg = run.config
    kind = resolve(cfg.decode.quantize if args.quantize is None else args.quantize)
    splits = load_splits(cfg.data)
    metrics = cfg.eval.metrics
    steps = step_checkpoints(Path(args.model))
    print(f"{args.model}: {len(steps)} step checkpoints kept ({steps[0].name} .. {steps[-1].name}); "
          f"beam {args.beam or cfg.decode.beam}, {kind or 'float32'}")
    header = ["last N", "from", "dev " + metrics[0]] + [f"test {m}" for m in metrics] + ["s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in (int(x) for x in args.last.split(",")):
        if n > len(steps):
            print(f"| {n} | only {len(steps)} kept |")
            continue
        t = time.monotonic()
        chosen = steps[-n:]
        model = build_model(cfg.model, len(run.source.vocab), len(run.target.vocab))
        tensors = average_checkpoints(chosen) if n > 1 else read_checkpoint(chosen[0])[1]
        load_model_tensors(model, tensors, chosen[-1] / "model.safetensors")
        model.eval()
        if kind:
            model = quantize(model, kind)
        view = dataclasses.replace(run, model=model)
        dev, _, _ = evaluate_pairs(view, splits.dev, metrics[:1], args.beam)
        test, _, _ = evaluate_pairs(view, splits.test, metrics, args.beam)
        span = f"{chosen[0].name} .. {chosen[-1].name}" if n > 1 else chosen[0].name
        cells = [str(n), span, f"{dev[metrics[0]]:.2f}"] + [f"{test[m]:.2f}" for m in metrics]
        print("| " + " | ".join(cells + [f"{time.monotonic() - t:.0f}"]) + " |", flush=True)


if __name__ == "__main__":
    main()
