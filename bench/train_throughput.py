"""Training throughput: transduce vs Hugging Face BART of the same sizes, same batches, same threads
(for a gated model, BART of the same parameters: bench/hf_bart.py).

    python bench/train_throughput.py [--steps 30] [--threads 2] [--pairs 256] [--repeat 3] [--set model.d_model=256 ...]

The model is recipes/g2p_cmudict.yaml's (`--config`), with `--set` overrides.

Prints one table: tokens/s (source + target non-pad tokens) for each, the
ratios, and estimated model FLOP/s as a fraction of the matmul peak of its
precision measured in the same run. transduce runs as the config resolves
`train.bf16` (the recipe's `auto`: bf16 autocast on a CPU with AMX or AVX512-BF16) and, if
that is bf16, in fp32 too; HF BART in fp32 (as its users train it) and with
bf16 autocast. The systems run in turns, `--repeat` rounds,
each keeping its fastest round (the host's speed drifts by the minute).
Needs the `bench` extra (transformers).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from transduce.registry import load_config
from transduce.data.pipeline import encode_pairs, epoch_batches, fit_codecs, load_splits
from transduce.hoststeal import Steal
from transduce.registry import build_model
from transduce.precision import native_bf16, use_bf16
from transduce.training.trainer import make_optimizer, sequence_loss


def matmul_peak(threads: int, dtype=torch.float32) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 2048 ** 3 / (time.perf_counter() - t)


def reads_source(name: str) -> bool:
    """Linear layers applied to source positions: the encoder and cross-attention keys/values."""
    return name.startswith("encoder") or name.endswith("cross_attn.kv") or (
        "encoder_attn" in name and name.endswith(("k_proj", "v_proj")))


def linear_flops(model: torch.nn.Module, batch) -> float:
    """6 * weights * padded tokens they apply to (forward + backward), over all linear layers."""
    s_tok, t_tok = batch.src.numel(), batch.tgt_in.numel()
    return 6.0 * sum(m.weight.numel() * (s_tok if reads_source(name) else t_tok)
                     for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def precision(bf16: bool):
    """bf16 autocast for the matmuls (fp32 master weights), as `train.bf16` does, or fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def run_transduce(cfg, batches, steps, warm, bf16=False):
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg._src_v, cfg._tgt_v).train()
    opt = make_optimizer(model, cfg.train)
    tokens, t0, flops = 0, None, 0.0
    for i, b in enumerate(batches[: warm + steps]):
        if i == warm:
            t0, tokens, flops = time.perf_counter(), 0, 0.0
        with precision(bf16):
            logits = model(b)
        loss = sequence_loss(logits, b.labels, 0.1) / b.n_tgt_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += b.n_src_tokens + b.n_tgt_tokens
        flops += linear_flops(model, b)
    dt = time.perf_counter() - t0
    return tokens / dt, flops / dt


def run_hf(cfg, batches, steps, warm, vocab, bf16=False):
    from hf_bart import bart

    torch.manual_seed(0)
    model = bart(cfg.model, vocab).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    tokens, t0, flops = 0, None, 0.0
    for i, b in enumerate(batches[: warm + steps]):
        if i == warm:
            t0, tokens, flops = time.perf_counter(), 0, 0.0
        labels = b.labels.masked_fill(b.labels == 0, -100)
        with precision(bf16):
            out = model(input_ids=b.src, attention_mask=b.src_mask.long(), decoder_input_ids=b.tgt_in,
                        decoder_attention_mask=(b.tgt_in != 0).long(), labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += b.n_src_tokens + b.n_tgt_tokens
        flops += linear_flops(model.model, b) + 6 * model.lm_head.weight.numel() * b.tgt_in.numel()
    dt = time.perf_counter() - t0
    return tokens / dt, flops / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="recipes/g2p_cmudict.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, as in transduce train (repeatable)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per system")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=256, help="pairs per batch")
    ap.add_argument("--emulated-bf16", action="store_true",
                    help="run HF BART with bf16 autocast even where the CPU has no native bf16 (slow)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of both systems in turn; the fastest of each counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    splits = load_splits(cfg.data)
    src, tgt = fit_codecs(cfg.data, splits.train, False)
    data = encode_pairs(splits.train, src, tgt, cfg.data)
    cfg._src_v, cfg._tgt_v = len(src.vocab), len(tgt.vocab)
    # Exactly `pairs` pairs per batch (token budget high enough never to bind).
    batches = [b for _, b in epoch_batches(data, 10 ** 9, args.pairs, seed=0, epoch=0)]
    batches = [b for b in batches if b.src.shape[0] == args.pairs][: args.warmup + args.steps]
    # transduce as the config resolves train.bf16 (the recipe: auto, bf16 where the CPU has native bf16) and in
    # fp32; HF BART as its users train it (fp32) and with bf16 autocast.
    bf16 = use_bf16(cfg.train.bf16, torch.device("cpu"))
    systems = {"transduce" + (" bf16" if bf16 else " fp32"): lambda: run_transduce(cfg, batches, args.steps, args.warmup, bf16)}
    if bf16:
        systems["transduce fp32"] = lambda: run_transduce(cfg, batches, args.steps, args.warmup, False)
    vocab = max(cfg._src_v, cfg._tgt_v)
    systems["HF BART fp32"] = lambda: run_hf(cfg, batches, args.steps, args.warmup, vocab, False)
    if native_bf16(torch.device("cpu")) or args.emulated_bf16:  # emulated, HF bf16 is ~4x slower than fp32
        systems["HF BART bf16"] = lambda: run_hf(cfg, batches, args.steps, args.warmup, vocab, True)
    else:
        print("HF BART bf16: not run (this CPU has no native bf16; --emulated-bf16 runs it)")
    best = {name: (0.0, 0.0) for name in systems}
    with Steal() as steal:
        # bf16's peak only where a system runs in bf16: emulated (AVX2) it ran at ~1 GFLOP/s, minutes per measure
        peak = {torch.float32: matmul_peak(args.threads)}
        if any(name.endswith("bf16") for name in systems):
            peak[torch.bfloat16] = matmul_peak(args.threads, torch.bfloat16)
        for _ in range(args.repeat):
            for name, run in systems.items():
                best[name] = max(best[name], run())
            for dtype in peak:
                peak[dtype] = max(peak[dtype], matmul_peak(args.threads, dtype))
    print(steal.report())
    from hf_bart import describe
    print(describe(cfg.model))
    print(f"matmul peak (2048^3, {args.threads} threads, fastest of {args.repeat + 1}): "
          + ", ".join(f"{str(d).removeprefix('torch.')} {v / 1e9:.0f} GFLOP/s" for d, v in peak.items()))
    print(f"fastest of {args.repeat} rounds per system, run in turns")
    print("| system | tokens/s | model GFLOP/s | of its precision's peak |")
    print("|---|---:|---:|---:|")
    for name, (tok, flops) in best.items():
        p = peak[torch.bfloat16 if name.endswith("bf16") else torch.float32]
        print(f"| {name} | {tok:,.0f} | {flops / 1e9:.0f} | {flops / p:.0%} |")
    ours = next(iter(best))
    for hf in [h for h in ("HF BART fp32", "HF BART bf16") if h in best]:
        print(f"ratio {ours} / {hf}: {best[ours][0] / best[hf][0]:.2f}x")


if __name__ == "__main__":
    main()
