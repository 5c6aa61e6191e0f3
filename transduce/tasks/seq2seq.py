"""Tasks of the families with a decoder: source text -> target text (seq2seq), denoising
(BART), and multitask mixtures (T5).

- seq2seq: labels = target + </s> (teacher forcing on `tgt_in`).
- denoise (`data.objective: denoise`): labels = the clean line + </s>;
  `src` = the line corrupted afresh per batch (data/noise.py), seeded by
  the batch's key; no noise: an autoencoder (`score`: per-line loss).
- multitask (`data.dataset: multitask`): seq2seq batches; each epoch's
  examples are drawn by task weight (`MixedData.epoch_pool`), and
  evaluation reports every task (source prefix "NAME: ") besides the total.

With `train.init_from` they reuse the init run's codecs: source and target of
a run with a decoder (a denoising run fine-tuned on pairs reads and writes its
symbols), the source alone of an encoder-only run.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transduce import inference, metrics as M
from transduce.config import METRIC_CHOICES, Config, TokenizerConfig
from transduce.data.datasets import MixedData, NoisyData
from transduce.data.multitask import task_of
from transduce.data.pipeline import EncodedPairs, TokenArray, encode_pairs, fit_codecs, fit_encode_pairs, group_references
from transduce.data.readers import DataError, Pair, ReadReport, read_text
from transduce.data.vocab import MASK_SYMBOL, PAD, TextCodec
from transduce.search import search
from transduce.tasks.base import InitCodecs, Task, check_metrics, encode_each, warn_unknown

log = logging.getLogger("transduce")


class Seq2SeqTask(Task):
    """Source text -> target text, decoded by search (every family with a decoder)."""

    name = "seq2seq"
    command = "translate"
    default_metrics = ("wer", "per")
    @property
    def metrics(self) -> tuple[str, ...]:
        return METRIC_CHOICES

    def check(self, cfg: Config) -> None:
        check_metrics(self, cfg)
        if cfg.data.target_tokenizer.wrap:
            raise ValueError("data.target_tokenizer.wrap: the decoder adds <s> and </s> itself; wrap is "
                             "for sources")

    def fit_codecs(self, cfg: Config, train: list[Pair], init: InitCodecs | None = None
                   ) -> tuple[TextCodec, TextCodec]:
        if init is not None:
            source, target = init.source, init.target
            if target is None:  # an encoder-only run: its source vocabulary, a new target one
                target = TextCodec.fit(cfg.data.target_tokenizer, [p.target for p in train])
            if getattr(cfg.model, "share_embeddings", False) and source.vocab.itos != target.vocab.itos:
                raise ValueError(f"model.share_embeddings: train.init_from {cfg.train.init_from} gives different "
                                 "source and target vocabularies; set share_embeddings: false")
            return source, target
        return fit_codecs(cfg.data, train, bool(getattr(cfg.model, "share_embeddings", False)))

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> EncodedPairs:
        return encode_pairs(pairs, source, target, cfg.data, what)

    def fit_and_encode(self, cfg: Config, train: list[Pair], init: InitCodecs | None = None
                       ) -> tuple[TextCodec, TextCodec, EncodedPairs]:
        """`fit_codecs`, then `encode` of the training pairs: in one pass over each column where this
        task fits and encodes as plain seq2seq does (no shared vocabulary, no train.init_from)."""
        plain = type(self).fit_codecs is Seq2SeqTask.fit_codecs and type(self).encode is Seq2SeqTask.encode
        if plain and init is None and not getattr(cfg.model, "share_embeddings", False) \
                and not cfg.data.joint_tokenizer:
            return fit_encode_pairs(cfg.data, train, "train")
        return super().fit_and_encode(cfg, train, init)

    def score_ids(self, run, line: str) -> tuple[list[int], list[int]] | None:
        """(source ids, target ids) that `transduce score` scores for one input line (None: empty).
        Pairs runs read `source<TAB>target`; plain-text runs (language models) the target alone."""
        if not line.strip():
            return None
        if run.config.data.format == "text":
            return [], run.target.encode(line)
        if line.count("\t") != 1:
            raise DataError(f"score: {line!r}: expected source<TAB>target")
        src, tgt = line.split("\t")
        return run.source.encode(src), run.target.encode(tgt)

    def score(self, run, lines: list[str], batch_size: int | None = None, model=None) -> list[float | None]:
        """Mean negative log-likelihood per target token of each line (teacher-forced), in order."""
        ids = [self.score_ids(run, line) for line in lines]
        todo = [i for i, x in enumerate(ids) if x is not None and x[1]]
        nll = inference.sequence_nll(model or run.model, [ids[i][0] for i in todo], [ids[i][1] for i in todo],
                           batch_size or run.config.decode.batch_size)
        out: list[float | None] = [None] * len(lines)
        for i, v in zip(todo, nll):
            out[i] = v
        return out

    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        result, sources, hyps = inference.evaluate_pairs(run, pairs, metrics, beam, batch_size, model)
        _, refs = group_references(pairs)
        return result, list(zip(sources, hyps, refs))


class DenoiseTask(Seq2SeqTask):
    """Plain text (data.format: text), one example per line: target = the line, source = the line
    corrupted by data.noise (data/noise.py; BART). Without noise: a sequence autoencoder, whose
    per-line reconstruction loss (`transduce score`) is an anomaly score. One codec for both
    sides (data.source_tokenizer, with <mask>); `train.init_from` reuses the init run's."""

    name = "denoise"
    default_metrics = ("ppl", "cer")

    def check(self, cfg: Config) -> None:
        check_metrics(self, cfg)
        if cfg.data.target_tokenizer != TokenizerConfig():
            raise ValueError("data.target_tokenizer: does not apply to data.objective 'denoise' (the target is "
                             "the line in data.source_tokenizer's symbols); remove it")
        if cfg.data.source_tokenizer.wrap:
            raise ValueError("data.source_tokenizer.wrap: does not apply to data.objective 'denoise' (the "
                             "source is also the target)")

    def read(self, spec: str, skip_invalid: bool = False) -> tuple[list[Pair], ReadReport]:
        """Plain text, one example per line (blank lines skipped): source = target = the line."""
        pairs, report = read_text(Path(spec), skip_invalid)
        return [Pair(p.target, p.target, p.origin) for p in pairs], report

    def fit_codecs(self, cfg: Config, train: list[Pair], init: InitCodecs | None = None
                   ) -> tuple[TextCodec, TextCodec]:
        if init is not None:
            source = init.source
        else:
            source = TextCodec.fit(cfg.data.source_tokenizer, [p.source for p in train]).with_symbol(MASK_SYMBOL)
        return source, source

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> NoisyData:
        if cfg.data.noise.mask_rate > 0 and MASK_SYMBOL not in source.vocab.stoi:
            raise DataError(f"data.noise.mask_rate: the vocabulary has no {MASK_SYMBOL} symbol (train.init_from "
                            "a run that was not a denoising or encoder run?); set mask_rate: 0")
        unk = Counter()
        limit = min(cfg.data.max_source_len, cfg.data.max_target_len - 1)
        data_cfg = dataclasses.replace(cfg.data, max_source_len=limit)
        srcs, _ = encode_each(pairs, lambda p: (source.encode(p.source, unk), []), dataclasses.replace(
            cfg, data=data_cfg), what)
        warn_unknown(what, "text", unk)
        return NoisyData(TokenArray(srcs), TokenArray(srcs), cfg.data.noise,
                         source.vocab.stoi.get(MASK_SYMBOL, PAD))

    @torch.no_grad()
    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        """Reconstruct each line from its corrupted copy (the same noise at every evaluation):
        decoded metrics against the clean line; `ppl` teacher-forced."""
        model = model or run.model
        cfg = dataclasses.replace(run.config, data=dataclasses.replace(run.config.data, skip_invalid=True))
        data = self.encode(pairs, run.source, run.target, cfg, "eval")
        size = batch_size or run.config.decode.batch_size
        decoded = [m for m in metrics if m != "ppl"]
        nll, n, rows = 0.0, 0, []
        for k in range(0, len(data.src), size):
            batch = data.collate(list(range(k, min(k + size, len(data.src)))), ("eval", k))
            if "ppl" in metrics:
                logits = model(batch).float()
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                             ignore_index=PAD, reduction="sum"))
                n += batch.n_tgt_tokens
            hyps = (search(model, batch.src, batch.src_mask, run.config.decode, beam, 1) if decoded
                    else [[None]] * len(batch.src))
            for i, h in enumerate(hyps):
                rows.append((run.source.decode(batch.src[i].tolist()),
                             run.target.decode(h[0].tokens) if h[0] is not None else "",
                             [run.target.decode(data.tgt[k + i].tolist())]))
        result = M.compute(decoded, [r[1] for r in rows], [r[2] for r in rows]) if decoded else {}
        if "ppl" in metrics:
            result["ppl"] = round(math.exp(nll / max(1, n)), 4)
        return {m: result[m] for m in metrics}, rows

    def score_ids(self, run, line: str) -> tuple[list[int], list[int]] | None:
        """The line as source and target, without noise."""
        ids = run.source.encode(line) if line.strip() else []
        return (ids, ids) if ids else None


class MultitaskTask(Seq2SeqTask):
    """data.dataset 'multitask' (T5): every source starts with its task's name ("g2p: hello"); training
    epochs mix the tasks by weight; evaluation reports each task's metrics besides the overall ones."""

    name = "multitask"

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> EncodedPairs:
        tasks = cfg.data.multitask.tasks
        index = {t.name: i for i, t in enumerate(tasks)}
        stray = [p for p in pairs if task_of(p.source) not in index]
        if stray:
            raise DataError(f"{stray[0].origin}: the source starts with no task name of data.multitask.tasks "
                            f"({', '.join(index)}), as in 'NAME: source'")
        srcs, tgts, task_ids = [], [], []
        for i, t in enumerate(tasks):  # task by task, so each kept pair knows its task
            part = encode_pairs([p for p in pairs if task_of(p.source) == t.name], source, target, cfg.data,
                                f"{what} ({t.name})")
            if what == "train" and not len(part.src):
                raise DataError(f"data.multitask: no training pairs for task {t.name!r}")
            srcs += [part.src[j] for j in range(len(part.src))]
            tgts += [part.tgt[j] for j in range(len(part.tgt))]
            task_ids += [i] * len(part.src)
        return MixedData(TokenArray(srcs), TokenArray(tgts), np.array(task_ids, dtype=np.int64),
                         tuple(t.weight for t in tasks), cfg.data.multitask.epoch_examples)

    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        """Overall metrics, and under "tasks" each task's (with its number of items), by source prefix."""
        result, sources, hyps = inference.evaluate_pairs(run, pairs, metrics, beam, batch_size, model)
        _, refs = group_references(pairs)
        decoded = [m for m in metrics if m != "ppl"]
        per_task = {}
        for name in sorted({task_of(s) for s in sources}):
            idx = [i for i, s in enumerate(sources) if task_of(s) == name]
            part = M.compute(decoded, [hyps[i] for i in idx], [refs[i] for i in idx]) if decoded else {}
            if "ppl" in metrics:
                part["ppl"] = round(inference.perplexity(run, [p for p in pairs if task_of(p.source) == name], model), 4)
            per_task[name] = {"items": len(idx), **{m: part[m] for m in metrics}}
        return {**result, "tasks": per_task}, list(zip(sources, hyps, refs))
