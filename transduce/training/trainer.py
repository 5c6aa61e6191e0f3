"""The training loop: read top to bottom.

    prepare data and codecs -> build model and optimizer -> resume if a
    checkpoint exists -> loop over token-budget batches: forward, loss,
    backward, clip, step, log -> evaluate on dev, keep best, stop early ->
    final checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from transduce.checkpoint import (CheckpointError, checkpoint_dir, load_model_tensors, load_tensors,
                                  optimizer_join, read_checkpoint, read_json, save_checkpoint)
from transduce.config import Config, load_config, save_config
from transduce.data.pipeline import epoch_batches, group_references, load_splits, shuffled
from transduce.data.vocab import PAD
from transduce.inference import LoadedRun, load_codecs
from transduce.io import atomic_write_text
from transduce.metrics import is_better
from transduce.models import build_model
from transduce.tasks import task_for
from transduce.training.warmstart import initial_weights
from transduce.training.schedule import lr_at

log = logging.getLogger("transduce")

# Config fields that may change when a run is resumed (budgets and reporting).
RESUMABLE_CHANGES = {"train.max_steps", "train.max_epochs", "train.max_minutes", "train.log_every",
                     "train.eval_every", "train.patience", "train.keep_checkpoints", "train.save_every",
                     "train.threads", "decode", "eval.dev_beam", "train.eval_max_items"}


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _allowed(diff: str) -> bool:
    key = diff.split(":", 1)[0]
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings' padding rows (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Summed label-smoothed cross-entropy over non-PAD labels. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=PAD, label_smoothing=smoothing, reduction="sum")


class MetricsLog:
    """Append-only metrics.jsonl, truncated back to the checkpoint on resume."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def prepare(cfg: Config, run_dir: Path, resuming: bool):
    """Read data and fit (or, when resuming, reload) the codecs."""
    task = task_for(cfg)  # seq2seq, or an encoder-only family's labelling/MLM task
    splits = load_splits(cfg.data, task.read)
    if not splits.train:
        raise ValueError("no training pairs")
    if resuming:
        src, tgt = load_codecs(run_dir)
    else:
        src, tgt = task.fit_codecs(cfg, splits.train)
        atomic_write_text(run_dir / "source_codec.json", src.dumps())
        atomic_write_text(run_dir / "target_codec.json", tgt.dumps())
    data = task.encode(splits.train, src, tgt, cfg, "train")
    return splits, src, tgt, data


def train(cfg: Config, run_dir: str | Path, progress: bool | None = None) -> dict:
    """Train (or resume) a model into `run_dir`; returns the final training state."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise PermissionError(f"{run_dir}: run directory is not writable")
    tc = cfg.train
    torch.set_num_threads(tc.threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(tc.deterministic)

    # -- resume or start ------------------------------------------------------
    last = checkpoint_dir(run_dir, "last")
    if last is not None:
        old = load_config(run_dir / "config.yaml")
        diffs = [d for d in config_differences(old.to_dict(), cfg.to_dict()) if not _allowed(d)]
        if diffs:
            raise CheckpointError(f"{run_dir}: cannot resume with a different config; differences: "
                                  + "; ".join(diffs) + ". Use a new --out (or train.init_from to fine-tune).")
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(tc.seed)
    splits, src_codec, tgt_codec, data = prepare(cfg, run_dir, resuming=last is not None)
    dev_sources, dev_refs = group_references(splits.dev)
    dev_pairs = splits.dev
    if tc.eval_max_items and len(dev_sources) > tc.eval_max_items:
        chosen = set(shuffled(dev_sources, tc.seed)[: tc.eval_max_items])
        dev_pairs = [p for p in splits.dev if p.source in chosen]

    model = build_model(cfg.model, len(src_codec.vocab), len(tgt_codec.vocab))
    if last is None:  # train.init_from or model.init_encoder (training/warmstart.py)
        for line in initial_weights(model, cfg, src_codec, tgt_codec):
            log.info("%s", line)
    optimizer = make_optimizer(model, tc)
    state = {"step": 0, "epoch": 0, "position": 0, "elapsed_s": 0.0, "best": None,
             "best_step": None, "evals_without_gain": 0, "tokens": 0}
    if last is not None:
        saved, tensors = read_checkpoint(last)
        load_model_tensors(model, tensors, last / "model.safetensors")
        optimizer.load_state_dict(optimizer_join(load_tensors(last / "optimizer.safetensors"),
                                                 saved.pop("optimizer")))
        torch.set_rng_state(load_tensors(last / "rng.safetensors")["torch"])
        saved.pop("files", None)
        state.update(saved)
        log.info("resuming %s from step %d (epoch %d, batch %d)", run_dir, state["step"], state["epoch"],
                 state["position"])
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", state["step"] if last is not None else None)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters; %d training pairs; vocab %d/%d", cfg.model.family, n_params / 1e6,
             len(data.src), len(src_codec.vocab), len(tgt_codec.vocab))

    metric = cfg.eval.metrics[0]
    view = LoadedRun(cfg, model, src_codec, tgt_codec, state, run_dir)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if tc.bf16 else nullcontext

    def evaluate() -> dict:
        model.eval()
        result, _ = task_for(cfg).evaluate(view, dev_pairs, cfg.eval.metrics, beam=cfg.eval.dev_beam)
        model.train()
        return result

    def checkpoint(best: bool) -> None:
        save_checkpoint(run_dir, f"step-{state['step']:07d}", model, optimizer, state, best,
                        tc.keep_checkpoints)

    # -- loop -----------------------------------------------------------------
    show = sys.stderr.isatty() if progress is None else progress
    from tqdm import tqdm

    bar = tqdm(total=tc.max_steps or None, initial=state["step"], disable=not show, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    start_time = time.monotonic() - state["elapsed_s"]
    window_tokens, window_start, window_loss, window_n = 0, time.monotonic(), 0.0, 0
    bad_steps, stop_reason = 0, None
    model.train()

    def out_of_budget() -> str | None:
        if tc.max_steps and state["step"] >= tc.max_steps:
            return "max_steps"
        if tc.max_minutes and time.monotonic() - start_time >= tc.max_minutes * 60:
            return "max_minutes"
        if tc.max_epochs and state["epoch"] >= tc.max_epochs:
            return "max_epochs"
        return None

    stop_reason = out_of_budget()
    while stop_reason is None:
        batches = epoch_batches(data, tc.batch_tokens, tc.max_batch_pairs, tc.seed, state["epoch"],
                                start=state["position"])
        group = []
        for pos, batch in batches:
            group.append(batch)
            if len(group) < tc.accum_steps:
                continue
            n_tokens = sum(b.n_tgt_tokens for b in group)
            lr = lr_at(state["step"], tc)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for b in group:
                with autocast():
                    logits = model(b)
                loss = sequence_loss(logits, b.labels, tc.label_smoothing) / n_tokens
                loss.backward()
                loss_sum += float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm or float("inf"))
            step_tokens = sum(b.n_src_tokens + b.n_tgt_tokens for b in group)
            group = []
            state["position"] = pos + 1
            if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                log.warning("step %d: non-finite loss %.4g or gradient norm %.4g; update skipped "
                            "(epoch %d, batch %d)", state["step"], loss_sum, float(grad_norm),
                            state["epoch"], pos)
                metrics_log.write({"step": state["step"], "skipped": True, "loss": str(loss_sum),
                                   "grad_norm": str(float(grad_norm)), "epoch": state["epoch"], "batch": pos})
                if bad_steps >= tc.max_bad_steps:
                    stop_reason = "non_finite"
                    break
                continue
            bad_steps = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += step_tokens
            window_tokens += step_tokens
            window_loss += loss_sum
            window_n += 1
            bar.update(1)
            if state["step"] % tc.log_every == 0:
                now = time.monotonic()
                rec = {"step": state["step"], "epoch": state["epoch"], "loss": round(window_loss / window_n, 5),
                       "lr": lr, "grad_norm": round(float(grad_norm), 4),
                       "tokens_per_s": round(window_tokens / max(1e-9, now - window_start), 1),
                       "elapsed_s": round(now - start_time, 1)}
                metrics_log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                lr=f"{lr:.2e}", left=_left(tc, now - start_time))
                if not show:
                    log.info("step %d loss %.4f lr %.2e %.0f tok/s", rec["step"], rec["loss"], lr,
                             rec["tokens_per_s"])
                window_tokens, window_start, window_loss, window_n = 0, now, 0.0, 0
            stop_reason = out_of_budget()
            if tc.eval_every and state["step"] % tc.eval_every == 0 and stop_reason is None:
                state["elapsed_s"] = time.monotonic() - start_time
                if _evaluate_and_save(state, evaluate, checkpoint, metrics_log, metric, tc.patience):
                    stop_reason = "patience"
                window_tokens, window_start = 0, time.monotonic()  # tokens/s counts training only
            elif tc.save_every and state["step"] % tc.save_every == 0:
                state["elapsed_s"] = time.monotonic() - start_time
                checkpoint(best=False)
                window_tokens, window_start = 0, time.monotonic()
            if stop_reason:
                break
        else:
            state["epoch"] += 1
            state["position"] = 0
            stop_reason = out_of_budget()
    bar.close()
    state["elapsed_s"] = time.monotonic() - start_time
    if stop_reason == "non_finite":
        raise FloatingPointError(
            f"{tc.max_bad_steps} consecutive updates had a non-finite loss or gradient; stopped. "
            "The last good checkpoint is kept. Try a lower train.lr, a longer train.warmup_steps, "
            "train.clip_norm, or bf16: false.")
    if state["step"] > 0 and _latest_step(run_dir) != state["step"]:
        _evaluate_and_save(state, evaluate, checkpoint, metrics_log, metric, tc.patience)
    state["stop_reason"] = stop_reason
    log.info("stopped (%s) at step %d after %.1f min; best dev %s %s at step %s", stop_reason, state["step"],
             state["elapsed_s"] / 60, metric, state["best"], state["best_step"])
    return state


def _left(tc, elapsed: float) -> str:
    if not tc.max_minutes:
        return "-"
    s = max(0, int(tc.max_minutes * 60 - elapsed))
    return f"{s // 60}:{s % 60:02d}"


def _latest_step(run_dir: Path) -> int | None:
    index = run_dir / "checkpoints" / "index.json"
    if not index.exists():
        return None
    return int(read_json(index)["last"].split("-")[1])


def _evaluate_and_save(state, evaluate, checkpoint, metrics_log, metric, patience: int) -> bool:
    """Evaluate on dev, write metrics and a checkpoint; True if patience ran out."""
    t = time.monotonic()
    result = evaluate()
    best = is_better(metric, result[metric], state["best"])
    if best:
        state["best"], state["best_step"], state["evals_without_gain"] = result[metric], state["step"], 0
    else:
        state["evals_without_gain"] += 1
    metrics_log.write({"step": state["step"], "dev": result, "eval_s": round(time.monotonic() - t, 2)})
    log.info("step %d dev %s", state["step"], json.dumps(result))
    checkpoint(best=best)
    return bool(patience) and state["evals_without_gain"] >= patience
