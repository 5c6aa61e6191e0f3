"""Tasks of the encoder-only families (no decoder, a head): masked-LM, classification, tagging.

- mlm: `src` corrupted by BERT's 80/10/10 rule (data/masking.py); labels =
  the original symbol at the selected positions, PAD elsewhere.
- classify: labels (B, 1) = the text's label; logits (B, 1, C).
- tag: labels (B, S) = each word's tag at its first piece, PAD elsewhere
  (other pieces, <s>, </s>).

Data formats: classify reads `text<TAB>label` (.tsv; .jsonl
{"source", "target"} and `text_file|label_file` work too), tag reads
`tok tok tok<TAB>TAG TAG TAG` (as many tags as tokens), mlm reads plain text,
one example per line (blank lines are skipped). Labels are whole symbols
saved as the run's target codec (target_codec.json). The source vocabularies
carry `<mask>`; with `train.init_from` they reuse the init run's source codec,
so the embeddings keep their meaning.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from transduce.metrics import classification_metrics, tagging_metrics
from transduce.config import Config, TokenizerConfig
from transduce.data.datasets import LabelledData, MaskedData
from transduce.data.masking import Masking
from transduce.data.pipeline import TokenArray, source_batches
from transduce.data.readers import DataError, Pair, ReadReport, _lines, read_pairs
from transduce.data.vocab import MASK_SYMBOL, PAD, SPECIALS, TextCodec, Vocab, WhitespaceTokenizer
from transduce.tasks.base import InitCodecs, Task, check_metrics, encode_each, keep_valid, warn_unknown

log = logging.getLogger("transduce")


@torch.no_grad()
def _scores(model, seqs: list[list[int]], batch_size: int):
    """(indices into seqs, head logits with the specials' classes ruled out) per length-sorted batch."""
    for idx, src in source_batches(seqs, batch_size):
        logits = model.scores(src, src != PAD).float()
        logits[..., : len(SPECIALS)] = float("-inf")
        yield idx, logits


class EncoderTask(Task):
    """Shared by the encoder-only tasks: source codec (with <mask>) and checks."""

    def check(self, cfg: Config) -> None:
        check_metrics(self, cfg)
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
                             "(see transduce/tasks/encoder.py for the format)")

    def source_codec(self, cfg: Config, train: list[Pair], init: InitCodecs | None) -> TextCodec:
        if init is not None:
            return init.source
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
        return keep_valid(pairs, report, skip_invalid, self._problem)

    def fit_codecs(self, cfg: Config, train: list[Pair], init: InitCodecs | None = None
                   ) -> tuple[TextCodec, TextCodec]:
        labels = Vocab.build([[p.target.strip()] for p in train])
        return self.source_codec(cfg, train, init), TextCodec(WhitespaceTokenizer(), labels)

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> LabelledData:
        unk_src, unk_lab = Counter(), Counter()
        srcs, tgts = encode_each(pairs, lambda p: (source.encode(p.source, unk_src),
                                                    target.vocab.encode([p.target.strip()], unk_lab)), cfg, what)
        warn_unknown(what, "source", unk_src)
        warn_unknown(what, "labels", unk_lab)
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
        return keep_valid(pairs, report, skip_invalid, self._problem)

    def fit_codecs(self, cfg: Config, train: list[Pair], init: InitCodecs | None = None
                   ) -> tuple[TextCodec, TextCodec]:
        labels = Vocab.build(p.target.split() for p in train)
        return self.source_codec(cfg, train, init), TextCodec(WhitespaceTokenizer(), labels)

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> LabelledData:
        unk_src, unk_lab = Counter(), Counter()

        def one(p: Pair):
            ids, firsts = source.encode_words(p.source.split(), unk_src)
            labels = [PAD] * len(ids)
            for f, lab in zip(firsts, target.vocab.encode(p.target.split(), unk_lab)):
                labels[f] = lab
            return ids, labels

        srcs, tgts = encode_each(pairs, one, cfg, what)
        warn_unknown(what, "source", unk_src)
        warn_unknown(what, "labels", unk_lab)
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

    def fit_codecs(self, cfg: Config, train: list[Pair], init: InitCodecs | None = None
                   ) -> tuple[TextCodec, TextCodec]:
        source = self.source_codec(cfg, train, init)
        return source, source  # the MLM predicts source symbols

    def encode(self, pairs, source, target, cfg: Config, what: str = "train") -> MaskedData:
        if MASK_SYMBOL not in source.vocab.stoi:
            raise DataError(f"the source vocabulary has no {MASK_SYMBOL} symbol (train.init_from a run "
                            "that is not an encoder family?)")
        unk = Counter()
        srcs, _ = encode_each(pairs, lambda p: (source.encode(p.source, unk), []), cfg, what)
        warn_unknown(what, "source", unk)
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
