"""The training loop, read top to bottom in `_train`:

    prepare data and codecs -> build model and optimizer -> resume if a checkpoint exists
    (refusing a changed config or vocabulary) -> loop over token-budget batches: learning rate,
    `forward_backward`, clip, step, log -> evaluate on dev, keep best, stop early -> last
    checkpoint, average of the last ones.

Where training stands is a `TrainState` (saved in every checkpoint); when it stops, a `Budget`
(steps, epochs, minutes by the clock). Under torchrun every process runs this same loop on its
shard of each update's batches (`transduce.training.distributed`); rank 0 alone writes. A killed
run restarted with the same command resumes from its last complete checkpoint and, with
`train.deterministic` and the same thread count, repeats the uninterrupted run's losses bit for bit.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from transduce import engine as engines, hoststeal
from transduce.checkpoint import (CheckpointError, RunDirWriteError, average_checkpoints, checkpoint_dir,
                                  load_model_tensors, load_tensors, optimizer_join, read_checkpoint, read_json,
                                  rng_state, save_checkpoint, set_rng_state, step_checkpoints)
from transduce.config import DECAYS, Config
from transduce.data.pipeline import (Batch, collate, epoch_plan, group_references,
                                     load_splits, paused_gc, shuffled)
from transduce.data.vocab import PAD
from transduce.inference import LoadedRun
from transduce.io import atomic_write_text
from transduce.metrics import is_better
from transduce.registry import build_model, task_for
from transduce.runs import check_resumable, codec_texts as read_codec_texts, fingerprint, init_codecs, load_codecs, save_config
from transduce.tasks.base import sequence_loss  # noqa: F401  (the token tasks' loss; bench/ imports it here)
from transduce.training.warmstart import initial_weights
from transduce.training import distributed
from transduce.precision import use_bf16
from transduce.training.schedule import lr_at

log = logging.getLogger("transduce")

def clip_gradients(params, max_norm: float) -> float:
    """The gradients' global L2 norm (before clipping), scaling them to `max_norm` where it is larger
    (0: no clipping), as `clip_grad_norm_` does; but only then. `clip_grad_norm_` multiplies every
    gradient by its coefficient clamped to 1 even when nothing is clipped (so as never to wait on
    a GPU), a pass over all gradients that most updates do not need: past the first hundreds of
    updates the G2P recipes' norms stay well under their 1.0."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = float(total)
    if max_norm and norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return norm


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings' padding rows (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters; the per-tensor loop costs ~10x more on CPU.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


class MetricsLog:
    """Append-only metrics.jsonl, truncated back to the checkpoint on resume."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # the torn last line of a killed run
                    log.warning("%s: dropping an incomplete line", path)
                    continue
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise RunDirWriteError(f"{self.path}: cannot write ({e.strerror}); training stopped. The last "
                                   "checkpoint is intact: free space or fix permissions, then run the same "
                                   "command to resume.") from None


class _NoLog:
    """Metrics sink of ranks other than 0."""

    def write(self, record: dict) -> None:
        pass


def _check_writable(run_dir: Path) -> CheckpointError | None:
    """Create the run directory and a file in it; an error that says so if that fails."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return RunDirWriteError(f"{run_dir}: run directory is not writable ({e.strerror}); choose another --out")
    return None


def prepare(cfg: Config, run_dir: Path, resuming: bool, ctx: distributed.Dist | None = None):
    """Read data and fit (or, when resuming, reload) the codecs; rank 0 fits and writes them."""
    ctx = ctx or distributed.Dist()
    with paused_gc():
        return _prepare(cfg, run_dir, resuming, ctx)


def _prepare(cfg: Config, run_dir: Path, resuming: bool, ctx: distributed.Dist):
    task = task_for(cfg)  # seq2seq, or an encoder-only family's labelling/MLM task
    splits = load_splits(cfg.data, task.read)
    if not splits.train:
        raise ValueError("no training pairs")
    fitted, data, error = None, None, None
    if not resuming and ctx.is_main:
        try:
            *fitted, data = task.fit_and_encode(cfg, splits.train, init_codecs(cfg))
            atomic_write_text(run_dir / "source_codec.json", fitted[0].dumps())
            atomic_write_text(run_dir / "target_codec.json", fitted[1].dumps())
        except Exception as e:
            error = e
    ctx.raise_if_any(error)
    src, tgt = fitted or load_codecs(run_dir)
    if data is None:
        data = task.encode(splits.train, src, tgt, cfg, "train")
    splits.train = []  # encoded: the texts are not needed any more (a large corpus frees its memory)
    return splits, src, tgt, data


def _to(b: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return b
    return type(b)(*(t.to(device, non_blocking=True) for t in (b.src, b.src_mask, b.tgt_in, b.labels)))


def train(cfg: Config, run_dir: str | Path, progress: bool | None = None) -> dict:
    """Train (or resume) a model into `run_dir`; returns the final training state.

    Under torchrun, each process calls this; see `transduce.training.distributed`.
    """
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda', but no CUDA device is available; valid choices: 'cpu', 'cuda'")
    ctx = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, Path(run_dir), progress, ctx)
    finally:
        ctx.close()


@dataclass
class TrainState:
    """Where training stands: saved in every checkpoint's state.json, restored on resume."""
    step: int = 0                       # optimizer updates made
    epoch: int = 0
    position: int = 0                   # batches of this epoch's plan already used
    elapsed_s: float = 0.0              # the run's clock, evaluations included
    tokens: int = 0                     # source + target tokens trained on
    best: float | None = None           # best dev value of the first metric, and its step
    best_step: int | None = None
    evals_without_gain: int = 0
    bad_steps: int = 0                  # consecutive non-finite updates
    decay_start_s: float | None = None  # a decay over train.max_minutes starts here (end of warmup)

    @classmethod
    def restore(cls, saved: dict) -> "TrainState":
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Budget:
    """When training stops (train.max_steps, max_epochs, max_minutes) and the clock the time budget
    and a decay over it follow."""
    max_steps: int
    max_epochs: int
    max_minutes: float
    origin: float  # time.monotonic() at elapsed 0

    @classmethod
    def start(cls, tc, elapsed_s: float) -> "Budget":
        return cls(tc.max_steps, tc.max_epochs, tc.max_minutes, time.monotonic() - elapsed_s)

    def clock(self) -> float:
        return time.monotonic() - self.origin

    def late(self, clock: float | None = None) -> bool:
        return bool(self.max_minutes) and (self.clock() if clock is None else clock) >= self.max_minutes * 60

    def spent(self, state: TrainState, late: bool) -> str | None:
        """Why training stops now, or None; `late` is the time budget as every rank sees it."""
        if self.max_steps and state.step >= self.max_steps:
            return "max_steps"
        if late:
            return "max_minutes"
        if self.max_epochs and state.epoch >= self.max_epochs:
            return "max_epochs"
        return None

    def decay_share(self, state: TrainState, clock: float) -> float | None:
        """The share of the time budget after warmup used by `clock` (the mean over ranks), so a
        decaying schedule ends with the budget even when the speed changes; None before warmup ends."""
        if state.decay_start_s is None:
            return None
        return (clock - state.decay_start_s) / max(1e-9, self.max_minutes * 60 - state.decay_start_s)

    def left(self) -> str:
        if not self.max_minutes:
            return "-"
        s = max(0, int(self.max_minutes * 60 - self.clock()))
        return f"{s // 60}:{s % 60:02d}"


def forward_backward(net, batches: list[Batch], n_tokens: float, loss_of, ctx: distributed.Dist, autocast) -> float:
    """One update's gradients, accumulated over its batches; returns its loss per target token.
    `loss_of(output, batch)` is the summed loss of a batch (the task's: `Task.loss`).
    Losses are summed and divided by the target tokens of the whole update on all ranks; DDP
    averages gradients over ranks, so scaling by their number makes them those of the summed loss."""
    loss_sum = 0.0
    for i, b in enumerate(batches):
        sync = net.no_sync() if ctx.active and i < len(batches) - 1 else nullcontext()
        with sync:
            with autocast():
                logits = net(b)
            loss = loss_of(logits, b) * ctx.world / n_tokens
            loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def _train(cfg: Config, run_dir: Path, progress: bool | None, ctx: distributed.Dist) -> dict:
    tc = cfg.train
    ctx.raise_if_any(_check_writable(run_dir) if ctx.is_main else None)
    torch.set_num_threads(tc.threads or max(1, (os.cpu_count() or 1) // ctx.local_world))
    if tc.deterministic and ctx.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(tc.deterministic)

    # -- data, model, optimizer; the state of the last checkpoint if there is one ----------------
    last, saved, tensors = _resume_point(cfg, run_dir)
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(tc.seed)
    splits, src_codec, tgt_codec, data = prepare(cfg, run_dir, resuming=last is not None, ctx=ctx)
    codec_texts = read_codec_texts(run_dir) if ctx.is_main else {}
    dev_pairs = _dev_subset(splits.dev, tc)
    model = build_model(cfg.model, len(src_codec.vocab), len(tgt_codec.vocab))
    if last is None:  # train.init_from or model.init_encoder (training/warmstart.py)
        for line in initial_weights(model, cfg, src_codec, tgt_codec):
            log.info("%s", line)
    model.to(ctx.device)
    optimizer = make_optimizer(model, tc)
    state = TrainState()
    if last is not None:
        state = _restore(cfg, run_dir, last, saved, tensors, model, optimizer, ctx)
    elif ctx.rank > 0:  # same initial weights everywhere, but each rank its own dropout
        torch.manual_seed(tc.seed + 1_000_003 * ctx.rank)
    net = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", state.step if last is not None else None) \
        if ctx.is_main else _NoLog()
    log.info("model %s: %.2fM parameters; %d training pairs; vocab %d/%d", cfg.model.family,
             sum(p.numel() for p in model.parameters()) / 1e6, len(data.src), len(src_codec.vocab),
             len(tgt_codec.vocab))
    view = LoadedRun(cfg, model, src_codec, tgt_codec, {}, run_dir, task_for(cfg))
    loss_of = lambda out, b: view.task.loss(out, b, cfg)  # noqa: E731  (cross-entropy, or a regression's)
    evaluate = _dev_evaluator(cfg, view, dev_pairs, ctx)
    saver = Checkpointer(cfg, run_dir, model, optimizer, ctx, codec_texts, state.step if last is not None else None)
    autocast = ((lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16))
                if use_bf16(tc.bf16, ctx.device) else nullcontext)
    if ctx.device.type == "cpu" or (dev_pairs and ctx.is_main):
        # Attention trains on the CPU kernels, and dev evaluations decode on them: build (first
        # time on this machine) and load them before the clock starts, not inside the budget.
        from transduce import kernels

        kernels.ops()

    # -- the loop ----------------------------------------------------------------------------------
    show = (sys.stderr.isatty() if progress is None else progress) and ctx.is_main
    bar = _progress_bar(tc, state, show)
    budget = Budget.start(tc, state.elapsed_s)
    window = LogWindow(metrics_log, bar, show)
    # Each update takes `per_update` consecutive batches of the epoch's global plan;
    # rank r computes batches r, r + N, r + 2N, ... of them (N processes).
    per_update = tc.accum_steps * ctx.world
    time_planned = tc.schedule in DECAYS and not tc.max_steps
    late = budget.late(state.elapsed_s)
    stop = budget.spent(state, late)
    model.train()
    while stop is None:
        plan = epoch_plan(data, tc.batch_tokens, tc.max_batch_pairs, tc.seed, state.epoch)
        if len(plan) < per_update:
            raise ValueError(f"the training data makes {len(plan)} batches per epoch, fewer than the "
                             f"{per_update} one update needs (train.accum_steps x processes); lower "
                             "train.batch_tokens or train.accum_steps")
        # The same number of updates on every rank; the last < per_update batches wait for the next shuffle.
        for start in range(state.position, len(plan) - per_update + 1, per_update):
            picks = [start + ctx.rank + ctx.world * i for i in range(tc.accum_steps)]
            # The key seeds what a task draws per batch (MLM masks): the same again on resume.
            batches = [collate(data, plan[j], (tc.seed, state.epoch, j)) for j in picks]
            n_tokens, step_tokens, clock = ctx.all_sum([sum(b.n_tgt_tokens for b in batches),
                                                        sum(b.n_src_tokens + b.n_tgt_tokens for b in batches),
                                                        budget.clock()])
            clock /= ctx.world  # the run's clock, averaged: the same learning rate on every rank
            lr = lr_at(state.step, tc, tc.max_steps or None, budget.decay_share(state, clock) if time_planned else None)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss = forward_backward(net, [_to(b, ctx.device) for b in batches], n_tokens, loss_of, ctx, autocast)
            grad_norm = clip_gradients(model.parameters(), tc.clip_norm)
            loss, any_late = ctx.all_sum([loss / ctx.world, float(budget.late())])
            late = any_late > 0
            state.position = start + per_update
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                # Skip the update; the schedule does not advance. Every rank sees the same sums.
                optimizer.zero_grad(set_to_none=True)
                if _skipped(state, loss, grad_norm, start, per_update, metrics_log) >= tc.max_bad_steps:
                    stop = "non_finite"
                    break
                continue
            state.bad_steps = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if time_planned and state.step == max(1, tc.warmup_steps) and state.decay_start_s is None:
                state.decay_start_s = clock
                log.info("%s schedule: decays from %.0f s to the end of train.max_minutes=%g", tc.schedule,
                         clock, tc.max_minutes)
            state.tokens += int(step_tokens)
            window.add(int(step_tokens), loss)
            if state.step % tc.log_every == 0:
                window.write(state, lr, grad_norm, budget)
            stop = budget.spent(state, late)
            if tc.eval_every and state.step % tc.eval_every == 0 and stop is None:
                state.elapsed_s = budget.clock()
                if _evaluate_and_save(state, evaluate, saver, metrics_log, cfg.eval.metrics[0], tc.patience, ctx):
                    stop = "patience"
                window.restart()  # tokens/s counts training only
            elif tc.save_every and state.step % tc.save_every == 0:
                state.elapsed_s = budget.clock()
                saver.save(state, best=False)
                window.restart()
            if stop:
                break
        else:
            state.epoch += 1
            state.position = 0
            stop = budget.spent(state, late)
    bar.close()
    state.elapsed_s = budget.clock()

    # -- the end: a last checkpoint, scored on dev; an average of the last ones ---------------------
    if stop == "non_finite":
        kept = f"checkpoints/step-{saver.saved_step:07d} is kept" if saver.saved_step is not None \
            else "no checkpoint was saved"
        raise FloatingPointError(
            f"{tc.max_bad_steps} consecutive updates had a non-finite loss or gradient (the last at epoch "
            f"{state.epoch}, batch {state.position - per_update}); stopped, {kept}. Try a lower "
            "train.lr, a longer train.warmup_steps, train.clip_norm > 0, bf16: false, or check the data "
            "(see the skipped updates in metrics.jsonl).")
    if state.step > 0 and saver.saved_step != state.step:
        _evaluate_and_save(state, evaluate, saver, metrics_log, cfg.eval.metrics[0], tc.patience, ctx)
    averaged, error = None, None
    if tc.average_last and state.step > 0 and ctx.is_main:
        try:
            averaged = _average_last(cfg, run_dir, state, view, dev_pairs, metrics_log, saver.meta(), codec_texts)
        except Exception as e:
            error = e
    if tc.average_last and state.step > 0:
        ctx.raise_if_any(error)
    log.info("stopped (%s) at step %d after %.1f min; best dev %s %s at step %s", stop, state.step,
             state.elapsed_s / 60, cfg.eval.metrics[0], state.best, state.best_step)
    return dict(state.to_dict(), stop_reason=stop, **({"averaged": averaged} if averaged else {}))


def _resume_point(cfg: Config, run_dir: Path):
    """The run's last checkpoint, its saved state and tensors (None, None, None for a new run), after
    refusing a changed config or vocabulary and a checkpoint training cannot resume from."""
    last = checkpoint_dir(run_dir, "last")
    if last is None:
        return None, None, None
    saved, tensors = read_checkpoint(last)
    if saved.get("averaged_from"):
        raise CheckpointError(
            f"{last}: weights averaged over checkpoints (transduce average), not a point training can "
            f"resume from (no optimizer state); to train on from them, start a new run with --set "
            f"train.init_from={run_dir}")
    check_resumable(cfg, run_dir, last, saved)
    return last, saved, tensors


def _restore(cfg: Config, run_dir: Path, last: Path, saved: dict, tensors, model, optimizer,
             ctx: distributed.Dist) -> TrainState:
    """Model, optimizer, generators and training state as the checkpoint `last` left them."""
    load_model_tensors(model, tensors, last / "model.safetensors")
    optimizer.load_state_dict(optimizer_join(load_tensors(last / "optimizer.safetensors"), saved.pop("optimizer")))
    _restore_rng(last, saved.get("world_size", 1), ctx, cfg.train.seed)
    state = TrainState.restore(saved)
    best = checkpoint_dir(run_dir, "best")
    if best is not None and best != last:  # an average made best after `last` was saved
        best_state = read_json(best / "state.json")
        if best_state.get("averaged_from") and cfg.eval.metrics[0] in best_state.get("dev", {}):
            state.best, state.best_step = best_state["dev"][cfg.eval.metrics[0]], best_state["step"]
    log.info("resuming %s from step %d (epoch %d, batch %d)", run_dir, state.step, state.epoch, state.position)
    return state


def _dev_subset(dev: list, tc) -> list:
    """The dev pairs evaluated during training: all, or those of train.eval_max_items sources."""
    sources, _ = group_references(dev)
    if tc.eval_max_items and len(sources) > tc.eval_max_items:
        chosen = set(shuffled(sources, tc.seed)[: tc.eval_max_items])
        return [p for p in dev if p.source in chosen]
    return dev


def _dev_engine(cfg: Config) -> str:
    return "torch" if cfg.decode.engine == "torch" else "auto"


def _dev_evaluator(cfg: Config, view: LoadedRun, dev_pairs: list, ctx: distributed.Dist):
    """A function returning dev metrics (rank 0 only); decoding runs on the CPU."""
    model = view.model

    def evaluate() -> dict:
        eval_model = model
        if ctx.device.type != "cpu":
            eval_model = build_model(cfg.model, len(view.source.vocab), len(view.target.vocab))
            eval_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        eval_model.eval()
        result, _ = view.task.evaluate(view, dev_pairs, cfg.eval.metrics, beam=cfg.eval.dev_beam,
                                       model=engines.build(eval_model, _dev_engine(cfg)))
        model.train()
        return result

    return evaluate


class Checkpointer:
    """Writes checkpoints (rank 0) with every rank's generator states; remembers the last step saved."""

    def __init__(self, cfg: Config, run_dir: Path, model, optimizer, ctx: distributed.Dist,
                 codec_texts: dict[str, str], saved_step: int | None):
        self.cfg, self.run_dir, self.model, self.optimizer, self.ctx = cfg, run_dir, model, optimizer, ctx
        self.codec_texts, self.saved_step = codec_texts, saved_step
        self.keep = max(cfg.train.keep_checkpoints, cfg.train.average_last)

    def meta(self) -> dict:
        return dict(config=self.cfg.to_dict(), fingerprint=fingerprint(self.cfg, self.codec_texts),
                    world_size=self.ctx.world)

    def save(self, state: TrainState, best: bool) -> None:
        rng = self.ctx.gather(rng_state(self.ctx.device))
        error = None
        if self.ctx.is_main:
            name = f"step-{state.step:07d}"
            try:
                save_checkpoint(self.run_dir, name, self.model, self.optimizer, dict(state.to_dict(), **self.meta()),
                                best, self.keep, rng={f"rank{r}.{k}": v for r, d in enumerate(rng) for k, v in d.items()},
                                texts=self.codec_texts)
            except OSError as e:
                previous = f"step-{self.saved_step:07d}" if self.saved_step is not None else None
                error = RunDirWriteError(
                    f"{self.run_dir}: could not write checkpoint {name} ({e.strerror}); training stopped. "
                    + (f"The previous checkpoint {previous} is intact: free space or fix permissions, then "
                       "run the same command to resume." if previous else "No checkpoint had been saved yet."))
        self.ctx.raise_if_any(error)
        self.saved_step = state.step


class LogWindow:
    """Loss and tokens/s over the updates since the last log line, written to metrics.jsonl and the
    progress bar (or the log when there is no bar)."""

    def __init__(self, metrics_log, bar, show: bool):
        self.metrics_log, self.bar, self.show = metrics_log, bar, show
        self.loss, self.n = 0.0, 0
        self.cpu = hoststeal.cpu_times()
        self.restart()

    def restart(self) -> None:
        self.tokens, self.start = 0, time.monotonic()

    def add(self, tokens: int, loss: float) -> None:
        self.tokens += tokens
        self.loss += loss
        self.n += 1
        self.bar.update(1)

    def write(self, state: TrainState, lr: float, grad_norm: float, budget: Budget) -> None:
        now = time.monotonic()
        rec = {"step": state.step, "epoch": state.epoch, "loss": round(self.loss / self.n, 5),
               "loss_exact": self.loss / self.n, "lr": lr, "grad_norm": round(grad_norm, 4),
               "tokens_per_s": round(self.tokens / max(1e-9, now - self.start), 1),
               "elapsed_s": round(now - budget.origin, 1)}
        # On a shared VM, the share of CPU time the host gave to others explains slow spells.
        cpu = hoststeal.cpu_times()
        steal = hoststeal.steal_share(self.cpu, cpu)
        self.cpu = cpu
        if steal is not None:
            rec["cpu_steal"] = round(steal, 3)
        self.metrics_log.write(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", lr=f"{lr:.2e}",
                             left=budget.left())
        if not self.show:
            log.info("step %d loss %.4f lr %.2e %.0f tok/s%s", rec["step"], rec["loss"], lr, rec["tokens_per_s"],
                     f" (host steal {steal:.0%})" if steal and steal >= 0.05 else "")
        self.loss, self.n = 0.0, 0
        self.restart()


def _progress_bar(tc, state: TrainState, show: bool):
    from tqdm import tqdm

    return tqdm(total=tc.max_steps or None, initial=state.step, disable=not show, unit="step",
                dynamic_ncols=True, file=sys.stderr)


def _skipped(state: TrainState, loss: float, grad_norm: float, start: int, per_update: int, metrics_log) -> int:
    """Log an update skipped for a non-finite loss or gradient; the number of such updates in a row."""
    state.bad_steps += 1
    log.warning("update %d: non-finite loss %.4g or gradient norm %.4g; skipped (epoch %d, batches %d-%d)",
                state.step + 1, loss, grad_norm, state.epoch, start, start + per_update - 1)
    metrics_log.write({"step": state.step + 1, "skipped": True, "loss": str(loss), "grad_norm": str(grad_norm),
                       "epoch": state.epoch, "batch": start, "batches": per_update})
    return state.bad_steps


def _average_last(cfg: Config, run_dir: Path, state: TrainState, view: LoadedRun, dev_pairs, metrics_log,
                  meta: dict, codec_texts: dict[str, str]) -> dict | None:
    """train.average_last: average the last N step checkpoints, score the mean on dev, save it (as
    "best" if it beats the best single checkpoint); what was averaged, or None if nothing was."""
    n = cfg.train.average_last
    paths = step_checkpoints(run_dir)[-n:]
    if len(paths) < 2:
        log.info("train.average_last=%d: only %d checkpoint saved, nothing to average", n, len(paths))
        return None
    names = [p.name for p in paths]
    tensors = average_checkpoints(paths)
    model = build_model(cfg.model, len(view.source.vocab), len(view.target.vocab))
    load_model_tensors(model, tensors, paths[-1] / "model.safetensors")
    model.eval()
    metric = cfg.eval.metrics[0]
    t = time.monotonic()
    result, _ = view.task.evaluate(view, dev_pairs, cfg.eval.metrics, beam=cfg.eval.dev_beam,
                                   model=engines.build(model, _dev_engine(cfg)))
    best = is_better(metric, result[metric], state.best)
    log.info("average of the last %d checkpoints (%s .. %s): dev %s%s", len(paths), names[0], names[-1],
             json.dumps(result), f"; better than {state.best} at step {state.best_step}, now best"
             if best else f"; not better than {state.best} at step {state.best_step}")
    metrics_log.write({"step": state.step, "dev_averaged": result, "averaged_from": names,
                       "eval_s": round(time.monotonic() - t, 2)})
    name = f"average-{names[0]}-{names[-1]}"
    save_checkpoint(run_dir, name, tensors, None, dict(state.to_dict(), averaged_from=names, dev=result, **meta),
                    best, cfg.train.keep_checkpoints, rng={}, texts=codec_texts, averaged=True)
    if best:
        state.best, state.best_step = result[metric], state.step
    return {"checkpoint": name, "from": names, metric: result[metric], "best": best}


def _restore_rng(path: Path, saved_world: int, ctx: distributed.Dist, seed: int) -> None:
    """This rank's generators as the checkpoint left them."""
    tensors = load_tensors(path / "rng.safetensors")
    prefix = f"rank{ctx.rank}."
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if saved_world != ctx.world:
        log.warning("resuming with %d processes a run saved by %d: updates take other batches, so the run "
                    "will not repeat the uninterrupted one exactly", ctx.world, saved_world)
    if mine:
        set_rng_state(mine, ctx.device)
    else:  # a rank the saving run did not have
        torch.manual_seed(seed + 1_000_003 * ctx.rank)


def _evaluate_and_save(state: TrainState, evaluate, saver: Checkpointer, metrics_log, metric: str, patience: int,
                       ctx: distributed.Dist) -> bool:
    """Evaluate on dev (rank 0), write metrics and a checkpoint; True if patience ran out."""
    best, stop, error = False, False, None
    if ctx.is_main:
        try:
            t = time.monotonic()
            result = evaluate()
            best = is_better(metric, result[metric], state.best)
            if best:
                state.best, state.best_step, state.evals_without_gain = result[metric], state.step, 0
            else:
                state.evals_without_gain += 1
            metrics_log.write({"step": state.step, "dev": result, "eval_s": round(time.monotonic() - t, 2)})
            log.info("step %d dev %s", state.step, json.dumps(result))
            stop = bool(patience) and state.evals_without_gain >= patience
        except Exception as e:
            error = e
    ctx.raise_if_any(error)
    best, stop = ctx.from_main([float(best), float(stop)])
    saver.save(state, best=bool(best))
    return bool(stop)
