"""What a family is trained on and how it is used: read data, fit codecs, batch, evaluate, predict.

The trainer and the CLI ask the run's task (`task_for(cfg)`, from
`model.family`) and never the family:

    splits = load_splits(cfg.data, task.read)          # task.read: file -> pairs (None: the default readers)
    source, target = task.fit_codecs(cfg, splits.train) # target: the label vocabulary for labelling tasks
    data = task.encode(splits.train, source, target, cfg)   # .collate(index, key) -> Batch
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

Data formats: classify reads `text<TAB>label` (.tsv; .jsonl
{"source", "target"} and `text_file|label_file` work too), tag reads
`tok tok tok<TAB>TAG TAG TAG` (as many tags as tokens), mlm reads plain text,
one example per line (blank lines are skipped). Labels are whole symbols
saved as the run's target codec (target_codec.json). Encoder families'
source vocabularies carry `<mask>`; with `train.init_from` they reuse the
init run's source codec, so the embeddings keep their meaning.
"""
from __future__ import annotations

import dataclasses
import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from transduce.config import METRIC_CHOICES, Config, TokenizerConfig
from transduce.data.masking import Masking, mask_tokens
from transduce.data.pipeline import (Batch, EncodedPairs, TokenArray, encode_pairs, fit_codecs, group_references,
                                     pad, source_batches)
from transduce.data.readers import DataError, Pair, ReadReport, _lines, read_pairs
from transduce.data.vocab import MASK_SYMBOL, PAD, SPECIALS, TextCodec, Vocab, WhitespaceTokenizer

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
        return fit_codecs(cfg.data, train, bool(getattr(cfg.model, "share_embeddings", False)))

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> EncodedPairs:
        return encode_pairs(pairs, source, target, cfg.data, what)

    def evaluate(self, run, pairs, metrics, beam=None, batch_size=None, model=None):
        from transduce.inference import evaluate_pairs

        result, sources, hyps = evaluate_pairs(run, pairs, metrics, beam, batch_size, model)
        _, refs = group_references(pairs)
        return result, list(zip(sources, hyps, refs))


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
        if cfg.data.target_tokenizer != TokenizerConfig():
            raise ValueError(f"data.target_tokenizer: does not apply to model.family {cfg.model.family!r} "
                             "(its targets are labels, read as whole symbols); remove it")
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


TASKS = {"encoder_mlm": MLMTask(), "encoder_classifier": ClassifyTask(), "encoder_tagger": TagTask()}


def task_for(cfg: Config):
    """The task of `cfg`'s model family; families with a decoder are seq2seq."""
    return TASKS.get(cfg.model.family, Seq2SeqTask())
