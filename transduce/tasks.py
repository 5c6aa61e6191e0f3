"""What a family is trained on and how it is used: read data, fit codecs, batch, evaluate, predict.

The trainer and the CLI ask the run's task (`task_for(cfg)`, from
`model.family`, and for families with a decoder `data.objective` and
`data.dataset`) and never the family:

    splits = load_splits(cfg.data, task.read)          # task.read: file -> pairs (None: the default readers)
    source, target = task.fit_codecs(cfg, splits.train) # target: the label vocabulary for labelling tasks
    data = task.encode(splits.train, source, target, cfg)   # .collate(index, key) -> Batch
    source, target, data = task.fit_and_encode(cfg, splits.train)  # optional: both, in one pass
    result, rows = task.evaluate(run, pairs, metrics)   # metrics + (input, output, references) rows

Every task's batches keep the training contract: the loss is the
cross-entropy of `model(batch)` (B, T, C) against `batch.labels` (B, T), PAD
ignored, so the training loop has no task-specific code:

- seq2seq: labels = target + </s> (teacher forcing on `tgt_in`).
- mlm: `src` corrupted by BERT's 80/10/10 rule (data/masking.py); labels =
  the original symbol at the selected positions, PAD elsewhere.
- classify: labels (B, 1) = the text's label; logits (B, 1, C).
- tag: labels (B, S) = each word's tag at its first piece, PAD elsewhere
  (other pieces, <s>, </s>).
- denoise (`data.objective: denoise`): labels = the clean line + </s>;
  `src` = the line corrupted afresh per batch (data/noise.py), seeded by
  the batch's key; no noise: an autoencoder (`score`: per-line loss).
- multitask (`data.dataset: multitask`): seq2seq batches; each epoch's
  examples are drawn by task weight (`EncodedPairs.epoch_pool`), and
  evaluation reports every task (source prefix "NAME: ") besides the total.

Data formats: classify reads `text<TAB>label` (.tsv; .jsonl
{"source", "target"} and `text_file|label_file` work too), tag reads
`tok tok tok<TAB>TAG TAG TAG` (as many tags as tokens), mlm reads plain text,
one example per line (blank lines are skipped). Labels are whole symbols
saved as the run's target codec (target_codec.json). Encoder families'
source vocabularies carry `<mask>`; with `train.init_from` they reuse the
init run's source codec, so the embeddings keep their meaning. So do the
tasks with a decoder, and the init run's target codec too when it had a
decoder (a denoising run fine-tuned on pairs reads and writes its symbols).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transduce.config import METRIC_CHOICES, Config, NoiseConfig, TokenizerConfig
from transduce.data.masking import Masking, mask_tokens
from transduce.data.multitask import mixture, task_of
from transduce.data.noise import corrupt
from transduce.data.pipeline import (Batch, EncodedPairs, TokenArray, encode_pairs, fit_codecs, fit_encode_pairs,
                                     group_references, pad, source_batches)
from transduce.data.readers import DataError, Pair, ReadReport, _lines, read_pairs, read_text
from transduce.data.vocab import BOS, EOS, MASK_SYMBOL, PAD, SPECIALS, TextCodec, Vocab, WhitespaceTokenizer

log = logging.getLogger("transduce")


class Seq2SeqTask:
    """Source text -> target text, decoded by search (every family with a decoder)."""

    name = "seq2seq"
    command = "translate"
    default_metrics = ("wer", "per")
    read = None  # the default readers (data.format)

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRIC_CHOICES

    def check(self, cfg: Config) -> None:
        _check_metrics(self, cfg)
        if cfg.data.target_tokenizer.wrap:
            raise ValueError("data.target_tokenizer.wrap: the decoder adds <s> and </s> itself; wrap is "
                             "for sources")

    def fit_codecs(self, cfg: Config, train: list[Pair]) -> tuple[TextCodec, TextCodec]:
        if cfg.train.init_from:
            source, target = init_run_codecs(cfg)
            if target is None:  # an encoder-only run: its source vocabulary, a new target one
                target = TextCodec.fit(cfg.data.target_tokenizer, [p.target for p in train])
            if getattr(cfg.model, "share_embeddings", False) and source.vocab.itos != target.vocab.itos:
                raise ValueError(f"model.share_embeddings: train.init_from {cfg.train.init_from} gives different "
                                 "source and target vocabularies; set share_embeddings: false")
            return source, target
        return fit_codecs(cfg.data, train, bool(getattr(cfg.model, "share_embeddings", False)))

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> EncodedPairs:
        return encode_pairs(pairs, source, target, cfg.data, what)

    def fit_and_encode(self, cfg: Config, train: list[Pair]) -> tuple[TextCodec, TextCodec, EncodedPairs]:
        """`fit_codecs`, then `encode` of the training pairs: in one pass over each column where this
        task fits and encodes as plain seq2seq does (no shared vocabulary, no train.init_from)."""
        plain = type(self).fit_codecs is Seq2SeqTask.fit_codecs and type(self).encode is Seq2SeqTask.encode
        if plain and not cfg.train.init_from and not getattr(cfg.model, "share_embeddings", False):
            return fit_encode_pairs(cfg.data, train, "train")
        source, target = self.fit_codecs(cfg, train)
        return source, target, self.encode(train, source, target, cfg, "train")

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
        from transduce.inference import sequence_nll

        ids = [self.score_ids(run, line) for line in lines]
        todo = [i for i, x in enumerate(ids) if x is not None and x[1]]
        nll = sequence_nll(model or run.model, [ids[i][0] for i in todo], [ids[i][1] for i in todo],
                           batch_size or run.config.decode.batch_size)
        out: list[float | None] = [None] * len(lines)
        for i, v in zip(todo, nll):
            out[i] = v
        return out

    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        from transduce.inference import evaluate_pairs

        result, sources, hyps = evaluate_pairs(run, pairs, metrics, beam, batch_size, model)
        _, refs = group_references(pairs)
        return result, list(zip(sources, hyps, refs))


def init_run_codecs(cfg: Config) -> tuple[TextCodec, TextCodec | None]:
    """The codecs of `train.init_from`'s run, so that embedding rows keep their meaning: source and
    target of a run with a decoder (seq2seq, denoise: a fine-tuned run reads and writes its symbols);
    of an encoder-only run the source alone (its target is labels), None for the target."""
    from transduce.config import load_config
    from transduce.inference import load_codecs

    run = Path(cfg.train.init_from)
    source, target = load_codecs(run)
    if isinstance(task_for(load_config(run / "config.yaml")), EncoderTask):
        log.info("source vocabulary from train.init_from %s (data.source_tokenizer is not used)", run)
        return source, None
    log.info("vocabularies from train.init_from %s (data.source_tokenizer and data.target_tokenizer are "
             "not used)", run)
    return source, target


def _check_metrics(task, cfg: Config) -> None:
    for m in cfg.eval.metrics:
        if m not in task.metrics:
            raise ValueError(f"eval.metrics: invalid choice {m!r} for model.family {cfg.model.family!r} "
                             f"({task.name}); valid choices: " + ", ".join(task.metrics))


# ---------------------------------------------------------------------------
# Batches of the encoder-only tasks
# ---------------------------------------------------------------------------

@dataclass
class LabelledData(EncodedPairs):
    """tgt: one label id per text (classify), or one per source position, PAD where none (tag)."""

    def collate(self, index: list[int], key=None) -> Batch:
        src = pad([self.src[i] for i in index])
        labels = pad([self.tgt[i] for i in index])  # (B, 1) or (B, S)
        return Batch(src, src != PAD, src.new_zeros(len(index), 0), labels)


@dataclass
class MaskedData(EncodedPairs):
    """Texts masked afresh for every batch, seeded by the batch's key (exact resume)."""

    masking: Masking = None

    def collate(self, index: list[int], key=None) -> Batch:
        ids = pad([self.src[i] for i in index])
        seed = zlib.crc32(repr(key if key is not None else (len(index), index[:16])).encode())
        inputs, labels = mask_tokens(ids, self.masking, torch.Generator().manual_seed(seed))
        return Batch(inputs, ids != PAD, ids.new_zeros(len(index), 0), labels)


def _encode_each(pairs: list[Pair], encode_one, cfg: Config, what: str) -> tuple[list, list]:
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


def _warn_unknown(what: str, side: str, unknown: Counter) -> None:
    if unknown:
        common = ", ".join(f"{s!r}x{c}" for s, c in unknown.most_common(5))
        log.warning("%s %s: %d unknown symbols mapped to <unk> (%s)", what, side, sum(unknown.values()), common)


def _keep(pairs: list[Pair], report: ReadReport, skip_invalid: bool, problem_of) -> tuple[list[Pair], ReadReport]:
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


@torch.no_grad()
def _scores(model, seqs: list[list[int]], batch_size: int):
    """(indices into seqs, head logits with the specials' classes ruled out) per length-sorted batch."""
    for idx, src in source_batches(seqs, batch_size):
        logits = model.scores(src, src != PAD).float()
        logits[..., : len(SPECIALS)] = float("-inf")
        yield idx, logits


class EncoderTask:
    """Shared by the encoder-only tasks: source codec (with <mask>) and checks."""

    name = command = ""
    metrics: tuple[str, ...] = ()
    default_metrics: tuple[str, ...] = ()

    def check(self, cfg: Config) -> None:
        _check_metrics(self, cfg)
        if cfg.data.objective != "seq2seq":
            raise ValueError(f"data.objective: {cfg.data.objective!r} needs a family with a decoder, not "
                             f"{cfg.model.family!r}; remove it")
        if cfg.data.target_tokenizer != TokenizerConfig():
            raise ValueError(f"data.target_tokenizer: does not apply to model.family {cfg.model.family!r} "
                             "(its targets are labels, read as whole symbols); remove it")
        if cfg.data.source_tokenizer.reverse:
            raise ValueError(f"data.source_tokenizer.reverse: applies to families with a decoder, not "
                             f"{cfg.model.family!r}; remove it")
        if cfg.data.dataset is not None and self.name != "mlm":
            raise ValueError(f"data.dataset: {cfg.data.dataset!r} is not {self.name} data; give data.train "
                             "(see transduce/tasks.py for the format)")

    def source_codec(self, cfg: Config, train: list[Pair]) -> TextCodec:
        if cfg.train.init_from:
            from transduce.inference import load_codecs

            log.info("source vocabulary from train.init_from %s (data.source_tokenizer is not used)",
                     cfg.train.init_from)
            return load_codecs(Path(cfg.train.init_from))[0]
        return TextCodec.fit(cfg.data.source_tokenizer, [p.source for p in train]).with_symbol(MASK_SYMBOL)

    def batch_size(self, run, batch_size: int | None) -> int:
        return batch_size or run.config.decode.batch_size


class ClassifyTask(EncoderTask):
    name = command = "classify"
    metrics = ("accuracy", "macro_f1")
    default_metrics = ("accuracy",)

    @staticmethod
    def _problem(p: Pair) -> str | None:
        if len(p.target.split()) != 1:
            return f"{p.origin}: label {p.target!r} is not one symbol; expected text<TAB>label"
        return None

    def read(self, spec: str, skip_invalid: bool = False) -> tuple[list[Pair], ReadReport]:
        pairs, report = read_pairs(spec, skip_invalid)
        return _keep(pairs, report, skip_invalid, self._problem)

    def fit_codecs(self, cfg: Config, train: list[Pair]) -> tuple[TextCodec, TextCodec]:
        labels = Vocab.build([[p.target.strip()] for p in train])
        return self.source_codec(cfg, train), TextCodec(WhitespaceTokenizer(), labels)

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> LabelledData:
        unk_src, unk_lab = Counter(), Counter()
        srcs, tgts = _encode_each(pairs, lambda p: (source.encode(p.source, unk_src),
                                                    target.vocab.encode([p.target.strip()], unk_lab)), cfg, what)
        _warn_unknown(what, "source", unk_src)
        _warn_unknown(what, "labels", unk_lab)
        return LabelledData(TokenArray(srcs), TokenArray(tgts))

    def predict(self, run, texts: list[str], batch_size: int | None = None, model=None) -> list[str]:
        """One label per text, in order; empty texts get an empty label."""
        ids = [run.source.encode(t) for t in texts]
        todo = [i for i, x in enumerate(ids) if x]
        out = [""] * len(texts)
        for idx, logits in _scores(model or run.model, [ids[i] for i in todo], self.batch_size(run, batch_size)):
            for j, best in zip(idx, logits[:, 0].argmax(-1).tolist()):
                out[todo[j]] = run.target.vocab.itos[best]
        return out

    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        from transduce.metrics import classification_metrics

        gold = [p.target.strip() for p in pairs]
        pred = self.predict(run, [p.source for p in pairs], batch_size, model)
        return classification_metrics(metrics, gold, pred), [(p.source, h, [g]) for p, h, g in zip(pairs, pred, gold)]


class TagTask(EncoderTask):
    name = command = "tag"
    metrics = ("entity_f1", "token_accuracy", "label_f1")
    default_metrics = ("entity_f1", "token_accuracy")

    @staticmethod
    def _problem(p: Pair) -> str | None:
        n, m = len(p.source.split()), len(p.target.split())
        if n != m:
            return f"{p.origin}: {n} tokens but {m} labels; expected tok tok<TAB>LAB LAB, one label per token"
        return None

    def read(self, spec: str, skip_invalid: bool = False) -> tuple[list[Pair], ReadReport]:
        pairs, report = read_pairs(spec, skip_invalid)
        return _keep(pairs, report, skip_invalid, self._problem)

    def fit_codecs(self, cfg: Config, train: list[Pair]) -> tuple[TextCodec, TextCodec]:
        labels = Vocab.build(p.target.split() for p in train)
        return self.source_codec(cfg, train), TextCodec(WhitespaceTokenizer(), labels)

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> LabelledData:
        unk_src, unk_lab = Counter(), Counter()

        def one(p: Pair):
            ids, firsts = source.encode_words(p.source.split(), unk_src)
            labels = [PAD] * len(ids)
            for f, lab in zip(firsts, target.vocab.encode(p.target.split(), unk_lab)):
                labels[f] = lab
            return ids, labels

        srcs, tgts = _encode_each(pairs, one, cfg, what)
        _warn_unknown(what, "source", unk_src)
        _warn_unknown(what, "labels", unk_lab)
        return LabelledData(TokenArray(srcs), TokenArray(tgts))

    def predict(self, run, lines: list[str], batch_size: int | None = None, model=None) -> list[list[str]]:
        """One label per whitespace-separated token of each line, in order."""
        words = [line.split() for line in lines]
        enc = [run.source.encode_words(w) if w else ([], []) for w in words]
        todo = [i for i, w in enumerate(words) if w]
        out: list[list[str]] = [[] for _ in lines]
        itos = run.target.vocab.itos
        for idx, logits in _scores(model or run.model, [enc[i][0] for i in todo], self.batch_size(run, batch_size)):
            best = logits.argmax(-1)  # (B, S)
            for j, row in zip(idx, best):
                i = todo[j]
                out[i] = [itos[int(row[f])] for f in enc[i][1]]
        return out

    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        from transduce.metrics import tagging_metrics

        gold = [p.target.split() for p in pairs]
        pred = self.predict(run, [p.source for p in pairs], batch_size, model)
        rows = [(p.source, " ".join(h), [" ".join(g)]) for p, h, g in zip(pairs, pred, gold)]
        return tagging_metrics(metrics, gold, pred), rows


class MLMTask(EncoderTask):
    name = "mlm"
    command = "evaluate"
    metrics = ("mlm_loss", "mlm_accuracy")
    default_metrics = ("mlm_loss", "mlm_accuracy")

    def read(self, spec: str, skip_invalid: bool = False) -> tuple[list[Pair], ReadReport]:
        """Plain text, one example per line; blank lines are skipped (they separate documents)."""
        path = Path(spec)
        pairs, report = [], ReadReport()
        for number, text, error in _lines(path):
            if error:
                if not skip_invalid:
                    raise DataError(f"{path}:{number}: {error} (set data.skip_invalid: true to skip such lines)")
                report.skip(f"{path}:{number}: {error}")
            elif text.strip():
                pairs.append(Pair(text, "", f"{path}:{number}"))
                report.read += 1
        return pairs, report

    def fit_codecs(self, cfg: Config, train: list[Pair]) -> tuple[TextCodec, TextCodec]:
        source = self.source_codec(cfg, train)
        return source, source  # the MLM predicts source symbols

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> MaskedData:
        if MASK_SYMBOL not in source.vocab.stoi:
            raise DataError(f"the source vocabulary has no {MASK_SYMBOL} symbol (train.init_from a run "
                            "that is not an encoder family?)")
        unk = Counter()
        srcs, _ = _encode_each(pairs, lambda p: (source.encode(p.source, unk), []), cfg, what)
        _warn_unknown(what, "source", unk)
        c = cfg.model
        masking = Masking(c.mask_rate, c.mask_token, c.random_token, source.vocab.stoi[MASK_SYMBOL],
                          len(source.vocab))
        return MaskedData(TokenArray(srcs), TokenArray([[] for _ in srcs]), masking)

    @torch.no_grad()
    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        """Loss and accuracy on masked positions, the same masks at every evaluation."""
        model = model or run.model
        cfg = dataclasses.replace(run.config, data=dataclasses.replace(run.config.data, skip_invalid=True))
        data = self.encode(pairs, run.source, run.target, cfg, "eval")
        size = self.batch_size(run, batch_size)
        loss, correct, n, rows = 0.0, 0, 0, []
        for k in range(0, len(data.src), size):
            batch = data.collate(list(range(k, min(k + size, len(data.src)))), ("eval", k))
            logits = model(batch).float()
            selected = batch.labels != PAD
            loss += float(F.cross_entropy(logits[selected], batch.labels[selected], reduction="sum"))
            pred = logits.argmax(-1)
            correct += int((pred[selected] == batch.labels[selected]).sum())
            n += int(selected.sum())
            filled = torch.where(selected, pred, batch.src)
            original = torch.where(selected, batch.labels, batch.src)
            for i in range(len(batch.src)):
                rows.append((run.source.decode(batch.src[i].tolist()), run.source.decode(filled[i].tolist()),
                             [run.source.decode(original[i].tolist())]))
        out = {"mlm_loss": loss / max(1, n), "mlm_accuracy": 100.0 * correct / max(1, n)}
        return {m: round(out[m], 4) for m in metrics}, rows


# ---------------------------------------------------------------------------
# Denoising and multitask: families with a decoder, other data
# ---------------------------------------------------------------------------

@dataclass
class NoisyData(EncodedPairs):
    """Clean lines (src = tgt); each batch's sources corrupted afresh, seeded by the batch's key."""

    noise: NoiseConfig = None
    mask_id: int = PAD

    def collate(self, index: list[int], key=None) -> Batch:
        seed = zlib.crc32(repr(key if key is not None else (len(index), index[:16])).encode())
        rng = np.random.default_rng(seed)
        srcs = [corrupt(self.src[i], self.noise, self.mask_id, rng) for i in index]
        tgts = [self.tgt[i] for i in index]
        src = pad(srcs)
        tgt_in = pad([np.concatenate(([BOS], t)) for t in tgts])
        labels = pad([np.concatenate((t, [EOS])) for t in tgts])
        return Batch(src, src != PAD, tgt_in, labels)


class DenoiseTask(Seq2SeqTask):
    """Plain text (data.format: text), one example per line: target = the line, source = the line
    corrupted by data.noise (data/noise.py; BART). Without noise: a sequence autoencoder, whose
    per-line reconstruction loss (`transduce score`) is an anomaly score. One codec for both
    sides (data.source_tokenizer, with <mask>); `train.init_from` reuses the init run's."""

    name = "denoise"
    default_metrics = ("ppl", "cer")

    def check(self, cfg: Config) -> None:
        _check_metrics(self, cfg)
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

    def fit_codecs(self, cfg: Config, train: list[Pair]) -> tuple[TextCodec, TextCodec]:
        if cfg.train.init_from:
            source = init_run_codecs(cfg)[0]
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
        srcs, _ = _encode_each(pairs, lambda p: (source.encode(p.source, unk), []), dataclasses.replace(
            cfg, data=data_cfg), what)
        _warn_unknown(what, "text", unk)
        return NoisyData(TokenArray(srcs), TokenArray(srcs), cfg.data.noise,
                         source.vocab.stoi.get(MASK_SYMBOL, PAD))

    @torch.no_grad()
    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        """Reconstruct each line from its corrupted copy (the same noise at every evaluation):
        decoded metrics against the clean line; `ppl` teacher-forced."""
        from transduce import metrics as M
        from transduce.search import search

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


@dataclass
class MixedData(EncodedPairs):
    """Pairs of several tasks; each epoch draws its examples by task weight (data/multitask.py)."""

    task_ids: np.ndarray = None   # (N,) index into weights of each example's task
    weights: tuple = ()
    epoch_examples: int = 0

    def epoch_pool(self, seed: int, epoch: int) -> np.ndarray:
        return mixture(self.task_ids, self.weights, self.epoch_examples, seed * 100_003 + epoch)


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
        from transduce import metrics as M
        from transduce.inference import evaluate_pairs, perplexity

        result, sources, hyps = evaluate_pairs(run, pairs, metrics, beam, batch_size, model)
        _, refs = group_references(pairs)
        decoded = [m for m in metrics if m != "ppl"]
        per_task = {}
        for name in sorted({task_of(s) for s in sources}):
            idx = [i for i, s in enumerate(sources) if task_of(s) == name]
            part = M.compute(decoded, [hyps[i] for i in idx], [refs[i] for i in idx]) if decoded else {}
            if "ppl" in metrics:
                part["ppl"] = round(perplexity(run, [p for p in pairs if task_of(p.source) == name], model), 4)
            per_task[name] = {"items": len(idx), **{m: part[m] for m in metrics}}
        return {**result, "tasks": per_task}, list(zip(sources, hyps, refs))


TASKS = {"encoder_mlm": MLMTask(), "encoder_classifier": ClassifyTask(), "encoder_tagger": TagTask()}


def task_for(cfg: Config):
    """The task of `cfg`'s model family; families with a decoder are seq2seq unless the data says
    otherwise (data.objective 'denoise', data.dataset 'multitask')."""
    if cfg.model.family in TASKS:
        return TASKS[cfg.model.family]
    if cfg.data.objective == "denoise":
        return DenoiseTask()
    if cfg.data.dataset == "multitask":
        return MultitaskTask()
    return Seq2SeqTask()
