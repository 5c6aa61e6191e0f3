"""What decoding controls cost on the G2P test set: beam 5 unconstrained (the kernels' fast path) vs
beam 5 with one constraint per word (a phoneme of its reference, lexically constrained beam search),
vs beam 5 with the logit processors only (min length, no-repeat 3-grams, a banned phoneme).

    python bench/controls_speed.py --model runs/g2p [--threads 2] [--batch 200] [--limit 0] [--repeat 3]

Prints words/s, test WER and the ratios to unconstrained decoding (wall time and the process's CPU
time); every constrained output is checked to contain its constraint.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from transduce import metrics as M
from transduce.allocator import keep_freed_memory
from transduce.data.pipeline import group_references, load_splits
from transduce.hoststeal import Steal
from transduce.inference import decode
from transduce.runs import load_run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained G2P run directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--limit", type=int, default=0, help="use only this many test words (0 = all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per setting (interleaved); the fastest counts")
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    run = load_run(args.model)
    words, refs = group_references(load_splits(run.config.data).test)
    if args.limit:
        words, refs = words[: args.limit], refs[: args.limit]
    # the constraint: the middle phoneme of the word's first reference
    cons = [[r[0].split()[len(r[0].split()) // 2]] for r in refs]
    plain_cfg = run.config.decode
    banned = "ZH" if "ZH" in run.target.vocab.stoi else run.target.vocab.itos[-1]  # a rare phoneme
    processors = dataclasses.replace(plain_cfg, min_length=2, no_repeat_ngram=3, banned=[banned])
    settings = [("unconstrained", plain_cfg, None), ("1 constraint per word", plain_cfg, cons),
                ("processors (min length, no-repeat 3-gram, a banned phoneme)", processors, None)]
    best, cpu_best = {}, {}
    with Steal() as steal:
        for _ in range(args.repeat):  # interleaved: a slow spell of a shared host hits every setting
            for name, cfg, c in settings:
                r = dataclasses.replace(run, config=dataclasses.replace(run.config, decode=cfg))
                t, cpu = time.perf_counter(), time.process_time()
                out = decode(r, words, beam=args.beam, nbest=1, batch_size=args.batch, constraints=c, workers=1)
                dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
                if name not in best or dt < best[name][0]:
                    best[name] = (dt, [run.target.decode(h[0].tokens) for h in out], dcpu)
                cpu_best[name] = min(cpu_best.get(name, float("inf")), dcpu)
    n = len(words)
    met = all(c[0] in h.split() for c, h in zip(cons, best["1 constraint per word"][1]))
    print(f"{n} test words, beam {args.beam}, batch {args.batch}, {args.threads} threads, 1 worker, "
          f"fastest of {args.repeat}")
    print(steal.report())
    # process CPU time too: on a host shared with other jobs, wall time swings more than the work done
    print("| decoding | words/s | test WER % | wall time vs unconstrained | CPU time vs unconstrained |")
    print("|---|---:|---:|---:|---:|")
    base, cpu_base = best["unconstrained"][0], cpu_best["unconstrained"]
    for name, _, _ in settings:
        dt, hyps, _ = best[name]
        wer = M.compute(["wer"], hyps, refs)["wer"]
        print(f"| {name} | {n / dt:,.0f} | {wer:.2f} | {dt / base:.2f}x | {cpu_best[name] / cpu_base:.2f}x |")
    print(f"every constrained output contains its constraint: {met}")


if __name__ == "__main__":
    main()
