"""Quality per CPU-minute: test scores of transduce vs Hugging Face BART trained the same way.

    python bench/quality.py --minutes 10 --ours runs/g2p10 [--out runs/quality_hf10] [--threads 2]
    python bench/quality.py --minutes 60 --ours runs/multi30k60          # translation: BLEU, chrF

`--ours` is a transduce run trained for the same minutes (`transduce train
recipes/g2p_cmudict.yaml --out runs/g2p10 --set train.max_minutes=10`, or
recipes/translate_multi30k.yaml); the scores are its config's `eval.metrics`
on its test split (G2P: WER/PER with and without stress; translation:
sacreBLEU and chrF on detokenised output). The HF model is a `BartForConditionalGeneration`
of the recipe's sizes (its feed-forward blocks plain GELU of the same parameters
as the recipe's gated ones: bench/hf_bart.py), random init, fp32, trained on the same data, the same
token-budget batches, the same schedule (warmup, then inverse square root or a
cosine decay over the rest of the time budget, as the run's config says), label
smoothing and clipping, for the same wall-clock budget (evaluation excluded;
the transduce run evaluates on dev every `eval_every` steps, HF does not, in
HF's favour). Then both decode the test set greedy and with beam 5 (HF
`generate`; max length as the recipe's) and one table prints the scores.
Needs the `bench` extra (transformers).

For long budgets both can train at once, each on one core with one thread:

    OMP_NUM_THREADS=1 taskset -c 0 transduce train recipes/g2p_cmudict.yaml --out runs/g2p60 \\
        --set train.max_minutes=60 &
    taskset -c 1 python bench/quality.py --minutes 60 --ours runs/g2p60 --threads 1 --phase train
    python bench/quality.py --minutes 60 --ours runs/g2p60 --phase eval    # when both are done
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from hf_bart import bart, describe
from transduce import metrics as M
from transduce.data.pipeline import epoch_batches, group_references, load_splits
from transduce.data.vocab import PAD
from transduce.config import DECAYS
from transduce.registry import load_config
from transduce.inference import decode
from transduce.runs import load_codecs, load_run
from transduce.training.schedule import lr_at
from transduce.training.trainer import sequence_loss

class ClockSchedule:
    """The learning rate as transduce's trainer sets it: warmup, then the config's schedule; a decaying
    one (cosine, linear) without train.max_steps decays with the clock from the end of warmup to the
    end of the time budget, whatever the speed."""

    def __init__(self, tc, minutes: float):
        self.tc, self.budget = tc, minutes * 60
        self.by_clock = tc.schedule in DECAYS and not tc.max_steps
        self.decay_start = None  # seconds into the run when warmup ended

    def lr(self, step: int, clock: float) -> float:
        progress = None
        if self.by_clock:
            start = clock if self.decay_start is None else self.decay_start  # still warming up: not used
            progress = (clock - start) / max(1e-9, self.budget - start)
        return lr_at(step, self.tc, progress=progress)

    def stepped(self, steps_done: int, clock: float):
        if self.decay_start is None and steps_done >= max(1, self.tc.warmup_steps):
            self.decay_start = clock


def train_hf(run, minutes: float, out: Path):
    """BART on the run's own encoded training data, batches and schedule, for `minutes`."""
    from transduce.registry import task_for

    cfg, tc = run.config, run.config.train
    task = task_for(cfg)
    data = task.encode(load_splits(cfg.data, task.read).train, run.source, run.target, cfg, "train")
    torch.manual_seed(tc.seed)
    model = bart(cfg.model, max(len(run.source.vocab), len(run.target.vocab))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    step, epoch, tokens, t0 = 0, 0, 0, time.monotonic()
    schedule = ClockSchedule(tc, minutes)
    while time.monotonic() - t0 < minutes * 60:
        for _, b in epoch_batches(data, tc.batch_tokens, tc.max_batch_pairs, tc.seed, epoch):
            lr = schedule.lr(step, time.monotonic() - t0)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(input_ids=b.src, attention_mask=b.src_mask.long(), decoder_input_ids=b.tgt_in,
                           decoder_attention_mask=(b.tgt_in != PAD).long()).logits
            loss = sequence_loss(logits, b.labels, tc.label_smoothing) / b.n_tgt_tokens
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += b.n_src_tokens + b.n_tgt_tokens
            schedule.stepped(step, time.monotonic() - t0)
            if step % 50 == 0:
                s = time.monotonic() - t0
                print(f"HF step {step} loss {loss.item():.4f} {tokens / s:.0f} tok/s {s / 60:.1f} min", flush=True)
            if time.monotonic() - t0 >= minutes * 60:
                break
        epoch += 1
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    return model.eval(), step, tokens / (time.monotonic() - t0)


@torch.inference_mode()
def hf_decode(model, run, sources: list[str], beam: int, batch: int = 200) -> list[str]:
    d = run.config.decode
    out = []
    for k in range(0, len(sources), batch):
        ids = [run.source.encode(w) for w in sources[k: k + batch]]
        width = max(map(len, ids))
        src = torch.tensor([x + [PAD] * (width - len(x)) for x in ids])
        gen = model.generate(input_ids=src, attention_mask=(src != PAD).long(), num_beams=beam, do_sample=False,
                             max_new_tokens=int(d.max_len_a * width + d.max_len_b) + 1,
                             length_penalty=d.length_penalty, early_stopping=True)
        out += [run.target.decode(g[1:].tolist()) for g in gen]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--ours", required=True, help="transduce run trained for the same minutes")
    ap.add_argument("--out", help="where the HF model is saved (default runs/quality_hfMINUTES)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="train the HF model with this config field changed (repeatable); ours is as trained")
    ap.add_argument("--phase", choices=["all", "train", "eval"], default="all",
                    help="train: only train and save the HF model (needs only the config and vocabularies "
                         "of --ours, so it can run beside ours); eval: decode with the saved one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/quality_hf{args.minutes:g}")
    if args.phase == "eval":
        from transformers import BartForConditionalGeneration

        model = BartForConditionalGeneration.from_pretrained(out).eval()
        trained = json.loads((out / "training.json").read_text())
    else:
        src, tgt = load_codecs(Path(args.ours))
        spec = SimpleNamespace(config=load_config(Path(args.ours) / "config.yaml", args.set), source=src, target=tgt)
        model, steps, tps = train_hf(spec, args.minutes, out)
        trained = {"minutes": args.minutes, "threads": args.threads, "steps": steps, "tokens_per_s": tps,
                   "set": args.set}
        (out / "training.json").write_text(json.dumps(trained))
        print(json.dumps(trained))
        if args.phase == "train":
            return
    run = load_run(args.ours)
    metrics = run.config.eval.metrics
    sources, refs = group_references(load_splits(run.config.data).test)
    steps, tps = trained["steps"], trained["tokens_per_s"]
    rows = []
    for beam in (1, 5):
        hyps = [h[0].tokens for h in decode(run, sources, beam=beam, nbest=1, batch_size=200)]
        rows.append(("transduce", beam, M.compute(metrics, [run.target.decode(h) for h in hyps], refs)))
        rows.append(("HF BART", beam, M.compute(metrics, hf_decode(model, run, sources, beam), refs)))
    print(f"test ({len(sources)} items), {args.minutes:g} minutes of training, HF on {trained['threads']} "
          f"threads{', with ' + ' '.join(trained['set']) if trained.get('set') else ''}; "
          f"transduce {run.state.get('step')} steps, HF {steps} steps ({tps:,.0f} tok/s)")
    print(describe(run.config.model))
    print("| system | beam | " + " | ".join(metrics) + " |")
    print("|---|---:|" + "---:|" * len(metrics))
    for name, beam, r in rows:
        print(f"| {name} | {beam} | " + " | ".join(f"{r[m]:.2f}" for m in metrics) + " |")
    for name, sig in M.sacrebleu_scores(metrics, [r[0] for r in refs], refs).items():
        print(f"{name}: sacreBLEU signature {sig[1]}")
    print(json.dumps({"minutes": args.minutes, "rows": [[n, b, r] for n, b, r in rows]}))


if __name__ == "__main__":
    main()
