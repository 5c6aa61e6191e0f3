"""The interface every task implements, and what the tasks share.

A task is what a family is trained on and how it is used: it reads data,
fits codecs, encodes batches, evaluates and predicts. The trainer and the
CLI ask the run's task (`registry.task_for(cfg)`) and never the family:

    splits = load_splits(cfg.data, task.read)                  # task.read: file -> pairs (None: the default readers)
    source, target, data = task.fit_and_encode(cfg, splits.train, init)  # data.collate(index, key) -> Batch
    result, rows = task.evaluate(run, pairs, metrics)          # metrics + (input, output, references) rows

`init` is the codecs of `train.init_from`'s run (`InitCodecs`), which the
trainer reads, so that a fine-tuned model's embedding rows keep their
meaning.

The training loop's loss is `task.loss(model(batch), batch, cfg)`, summed over
the batch's `n_tgt_tokens`: for every token task the cross-entropy of
`model(batch)` (B, T, C) against `batch.labels` (B, T), PAD ignored; a
regression task (tasks/forecast.py) scores its distribution's parameters.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transduce.config import Config
from transduce.data.pipeline import EncodedPairs
from transduce.data.readers import DataError, Pair, ReadReport
from transduce.data.vocab import PAD, TextCodec

log = logging.getLogger("transduce")


@dataclass
class InitCodecs:
    """The codecs of `train.init_from`'s run: target None where that run is encoder-only (its target
    vocabulary is labels)."""
    source: TextCodec
    target: TextCodec | None


class Task:
    """What every task answers. `name` appears in errors and logs; `command` is the CLI command that
    uses a trained run of this task; `metrics` the valid `eval.metrics`, `default_metrics` the
    ones used when the config names none."""

    name: str = ""
    command: str = ""
    metrics: tuple[str, ...] = ()
    default_metrics: tuple[str, ...] = ()
    read = None  # file -> (pairs, report); None: the default readers of data.format

    def check(self, cfg: Config) -> None:
        """Raise ValueError("key: problem") for a config this task cannot train on."""
        check_metrics(self, cfg)

    def loss(self, out: torch.Tensor, batch, cfg: Config) -> torch.Tensor:
        """The summed training loss of the model's output on `batch`."""
        return sequence_loss(out, batch.labels, cfg.train.label_smoothing)

    def fit_codecs(self, cfg: Config, train: list[Pair], init: InitCodecs | None = None
                   ) -> tuple[TextCodec, TextCodec]:
        raise NotImplementedError

    def encode(self, pairs: list[Pair], source: TextCodec, target: TextCodec, cfg: Config,
               what: str = "train") -> EncodedPairs:
        raise NotImplementedError

    def fit_and_encode(self, cfg: Config, train: list[Pair], init: InitCodecs | None = None
                       ) -> tuple[TextCodec, TextCodec, EncodedPairs]:
        """`fit_codecs`, then `encode` of the training pairs."""
        source, target = self.fit_codecs(cfg, train, init)
        return source, target, self.encode(train, source, target, cfg, "train")

    def evaluate(self, run, pairs: list[Pair], metrics: list[str], beam: int | None = None,
                 batch_size: int | None = None, model=None) -> tuple[dict, list[tuple]]:
        """(metrics, rows of (input, output, references)) of `run` on `pairs`."""
        raise NotImplementedError


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Summed label-smoothed cross-entropy over non-PAD labels. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=PAD, label_smoothing=smoothing, reduction="sum")


def check_metrics(task, cfg: Config) -> None:
    for m in cfg.eval.metrics:
        if m not in task.metrics:
            raise ValueError(f"eval.metrics: invalid choice {m!r} for model.family {cfg.model.family!r} "
                             f"({task.name}); valid choices: " + ", ".join(task.metrics))


def encode_each(pairs: list[Pair], encode_one, cfg: Config, what: str) -> tuple[list, list]:
    """(source ids, target ids) of each pair; over-long or empty sources stop the run unless skip_invalid."""
    srcs, tgts, bad = [], [], []
    for p in pairs:
        s, t = encode_one(p)
        problem = None
        if not s:
            problem = f"{p.origin}: the source encodes to no symbols"
        elif len(s) > cfg.data.max_source_len:
            problem = f"{p.origin}: {len(s)} source symbols, over data.max_source_len={cfg.data.max_source_len}"
        if problem:
            if not cfg.data.skip_invalid:
                raise DataError(problem + " (set data.skip_invalid: true to skip such lines)")
            bad.append(problem)
            continue
        srcs.append(s)
        tgts.append(t)
    if bad:
        log.warning("%s: skipped %d examples; first: %s", what, len(bad), bad[0])
    return srcs, tgts


def warn_unknown(what: str, side: str, unknown: Counter) -> None:
    if unknown:
        common = ", ".join(f"{s!r}x{c}" for s, c in unknown.most_common(5))
        log.warning("%s %s: %d unknown symbols mapped to <unk> (%s)", what, side, sum(unknown.values()), common)


def keep_valid(pairs: list[Pair], report: ReadReport, skip_invalid: bool, problem_of) -> tuple[list[Pair], ReadReport]:
    """Pairs without a task-specific problem; others stop the run unless skip_invalid (then counted)."""
    kept = []
    for p in pairs:
        problem = problem_of(p)
        if problem is None:
            kept.append(p)
        elif skip_invalid:
            report.read -= 1
            report.skip(problem)
        else:
            raise DataError(problem + " (set data.skip_invalid: true to skip such lines)")
    return kept, report
