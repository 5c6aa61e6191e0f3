"""Training throughput: transduce vs Hugging Face BART of the same sizes, same batches, same threads.

    python bench/train_throughput.py [--steps 30] [--threads 2] [--pairs 256] [--repeat 3] [--set model.d_model=256 ...]

The model is recipes/g2p_cmudict.yaml's (`--config`), with `--set` overrides.

Prints one table: tokens/s (source + target non-pad tokens) for each, the
ratio, and estimated model FLOP/s as a fraction of the fp32 matmul peak
measured in the same run. The systems run in turns, `--repeat` rounds,
each keeping its fastest round (the host's speed drifts by the minute).
Needs the `bench` extra (transformers).
"""
from __future__ import annotations

import argparse
import time

import torch

from transduce.config import load_config
from transduce.data.pipeline import encode_pairs, epoch_batches, fit_codecs, load_splits
from transduce.hoststeal import Steal
from transduce.models import build_model
from transduce.training.trainer import make_optimizer, sequence_loss


def matmul_peak(threads: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
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


def run_transduce(cfg, batches, steps, warm):
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg._src_v, cfg._tgt_v).train()
    opt = make_optimizer(model, cfg.train)
    tokens, t0, flops = 0, None, 0.0
    for i, b in enumerate(batches[: warm + steps]):
        if i == warm:
            t0, tokens, flops = time.perf_counter(), 0, 0.0
        loss = sequence_loss(model(b), b.labels, 0.1) / b.n_tgt_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += b.n_src_tokens + b.n_tgt_tokens
        flops += linear_flops(model, b)
    dt = time.perf_counter() - t0
    return tokens / dt, flops / dt


def run_hf(cfg, batches, steps, warm, vocab):
    from hf_bart import bart

    torch.manual_seed(0)
    model = bart(cfg.model, vocab).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    tokens, t0, flops = 0, None, 0.0
    for i, b in enumerate(batches[: warm + steps]):
        if i == warm:
            t0, tokens, flops = time.perf_counter(), 0, 0.0
        labels = b.labels.masked_fill(b.labels == 0, -100)
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
    with Steal() as steal:
        peak = matmul_peak(args.threads)
        (ours, ours_f), (hf, hf_f) = (0.0, 0.0), (0.0, 0.0)
        for _ in range(args.repeat):
            ours, ours_f = max((ours, ours_f), run_transduce(cfg, batches, args.steps, args.warmup))
            hf, hf_f = max((hf, hf_f), run_hf(cfg, batches, args.steps, args.warmup,
                                               vocab=max(cfg._src_v, cfg._tgt_v)))
            peak = max(peak, matmul_peak(args.threads))
    print(steal.report())
    print(f"fp32 matmul peak (2048^3, {args.threads} threads, fastest of {args.repeat + 1}): {peak / 1e9:.0f} GFLOP/s")
    print(f"fastest of {args.repeat} rounds per system, run in turns")
    print(f"| system | tokens/s | model GFLOP/s | of peak |")
    print(f"|---|---:|---:|---:|")
    print(f"| transduce | {ours:,.0f} | {ours_f / 1e9:.0f} | {ours_f / peak:.0%} |")
    print(f"| HF BART | {hf:,.0f} | {hf_f / 1e9:.0f} | {hf_f / peak:.0%} |")
    print(f"ratio transduce / HF: {ours / hf:.2f}x")


if __name__ == "__main__":
    main()
