"""Decoding speed on the G2P test set: transduce (PyTorch, float32 and int8) vs CTranslate2 (float32, int8)
vs HF generate.

    python bench/decode_speed.py --model runs/g2p [--threads 2] [--workers 1] [--batch 200] [--limit 0] [--repeat 3]

transduce and CTranslate2 run the same weights (exported with `transduce
export`), with the same maximum lengths; "transduce int8" is `--quantize
int8` (models/quantize.py). Hugging Face `generate` runs a BART
of the same sizes; it cannot load our pre-norm weights, so each of its
batches is made to produce exactly as many steps as our longest output in
that batch (min/max_new_tokens), the same work per batch. With `--workers N`,
transduce and CTranslate2 decode N batches at a time, each on threads / N
threads (`decode.workers`; CTranslate2's inter_threads); HF runs one batch at
a time on all threads. Prints words/s and ratios; needs the `bench` extra.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from transduce.data.pipeline import group_references, load_splits
from transduce.allocator import keep_freed_memory
from transduce.export.ctranslate2 import CT2Translator, export
from transduce.hoststeal import Steal
from transduce.inference import decode
from transduce.runs import load_run
from transduce import metrics as M


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def hf_generate(run, src_ids, our_lengths, beam, batch):
    from hf_bart import bart

    torch.manual_seed(0)
    model = bart(run.config.model, max(len(run.source.vocab), len(run.target.vocab))).eval()
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    t = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(order), batch):
            idx = order[k: k + batch]
            width = max(len(src_ids[i]) for i in idx)
            x = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : len(src_ids[i])] = torch.tensor(src_ids[i])
            steps = max(our_lengths[i] for i in idx) + 1
            model.generate(input_ids=x, attention_mask=(x != 0).long(), num_beams=beam, do_sample=False,
                           min_new_tokens=steps, max_new_tokens=steps, early_stopping=True)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained transformer run directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="batches decoded at a time (transduce, CTranslate2)")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--limit", type=int, default=0, help="use only this many test words (0 = all)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--int8", action="store_true", help="run transduce int8 even on a CPU without VNNI or AMX int8")
    ap.add_argument("--repeat", type=int, default=3, help="runs per system (interleaved); the fastest counts")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's malloc thresholds alone (the decoding commands set them: "
                         "transduce/allocator.py)")
    args = ap.parse_args()
    kept = False if args.system_malloc else keep_freed_memory()  # for every system in this process
    torch.set_num_threads(args.threads)
    run = load_run(args.model)
    from transduce.models.quantize import native_int8

    # without VNNI / AMX int8, torch._int_mm is ~30x slower than a float32 matmul: int8 would only be slow
    quantized = load_run(args.model, quantize="int8") if native_int8() or args.int8 else None
    if quantized is None:
        print("transduce int8: not run (this CPU has no VNNI or AMX int8; decode.quantize auto decodes in "
              "float32 here; --int8 runs it)")
    words, refs = group_references(load_splits(run.config.data).test)
    if args.limit:
        words, refs = words[: args.limit], refs[: args.limit]
    src_ids = [run.source.encode(w) for w in words]
    n = len(words)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Steal() as steal:
        ct2 = {q: CT2Translator(export(run, f"{tmp}/{q}", None if q == "float32" else q),
                                threads=args.threads, compute_type=q, workers=args.workers)
               for q in ("float32", "int8")}
        for beam in (1, 5):
            # Each system runs `repeat` times, interleaved, and keeps its fastest: on a shared host a
            # slow spell then hits one round of every system rather than one system's only run.
            systems = [(name, (lambda r=r: [h[0].tokens for h in decode(r, words, beam=beam, nbest=1,
                                                                        batch_size=args.batch,
                                                                        workers=args.workers)]))
                       for name, r in (("transduce float32", run), ("transduce int8", quantized)) if r is not None]
            systems += [(f"CTranslate2 {q}", (lambda tr=tr: [h[0] for h in tr.translate_ids(
                src_ids, beam=beam, batch_size=args.batch, per_source_limit=False)])) for q, tr in ct2.items()]
            best = {}
            for _ in range(args.repeat):
                for name, fn in systems:
                    tokens, dt = timed(fn)
                    if name not in best or dt < best[name][0]:
                        best[name] = (dt, tokens)
            for name, _ in systems:
                dt, tokens = best[name]
                wer = M.compute(["wer"], [run.target.decode(t) for t in tokens], refs)["wer"]
                rows.append((name, beam, n / dt, wer))
            ours = best["transduce float32"][1]
            if not args.skip_hf:
                dt = min(hf_generate(run, src_ids, [len(t) for t in ours], beam, args.batch)
                         for _ in range(args.repeat))
                rows.append(("HF generate (BART, matched steps)", beam, n / dt, float("nan")))
    print(f"{n} test words, batch {args.batch}, {args.threads} threads, {args.workers} worker(s), "
          f"fastest of {args.repeat} runs, malloc {'keeping freed memory' if kept else 'as the system set it'}")
    print(steal.report())
    if not args.skip_hf:
        from hf_bart import describe
        print(describe(run.config.model))
    print("| system | beam | words/s | test WER % |")
    print("|---|---:|---:|---:|")
    for name, beam, wps, wer in rows:
        print(f"| {name} | {beam} | {wps:,.0f} | {'-' if wer != wer else f'{wer:.2f}'} |")
    for beam in (1, 5):
        for mine, b0, speed, _ in rows:
            if b0 != beam or not mine.startswith("transduce"):
                continue
            for name, b, wps, _ in rows:
                if b == beam and not name.startswith("transduce"):
                    print(f"beam {beam}: {mine} / {name} = {speed / wps:.2f}x")


if __name__ == "__main__":
    main()
