"""Tokenizers (characters, whitespace tokens, trained subwords) and vocabularies.

A `TextCodec` pairs a tokenizer with its vocabulary: `encode(text) -> ids`,
`decode(ids) -> text`. Codecs are saved with the model as JSON and rebuilt
from it alone.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Iterable

from transduce.config import TokenizerConfig

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


class Vocab:
    """Symbol <-> id table; ids 0..3 are <pad>, <unk>, <s>, </s>."""

    def __init__(self, symbols: list[str]):
        if symbols[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.itos = list(symbols)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate symbols in vocabulary")

    @classmethod
    def build(cls, sequences: Iterable[list[str]], min_frequency: int = 1) -> "Vocab":
        counts = Counter(s for seq in sequences for s in seq)
        kept = sorted((s for s, c in counts.items() if c >= min_frequency and s not in SPECIALS),
                      key=lambda s: (-counts[s], s))
        return cls(SPECIALS + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, symbols: list[str], unknown: Counter | None = None) -> list[int]:
        ids = []
        for s in symbols:
            i = self.stoi.get(s, UNK)
            if i == UNK and unknown is not None:
                unknown[s] += 1
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Symbols for ids, stopping at </s> and leaving out <pad> and <s>."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else SPECIALS[UNK])
        return out


class CharTokenizer:
    kind = "char"

    def __init__(self, lowercase: bool = False):
        self.lowercase = lowercase

    def split(self, text: str) -> list[str]:
        return list(text.lower() if self.lowercase else text)

    def join(self, symbols: list[str]) -> str:
        return "".join(symbols)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase}


class WhitespaceTokenizer(CharTokenizer):
    kind = "whitespace"

    def split(self, text: str) -> list[str]:
        return (text.lower() if self.lowercase else text).split()

    def join(self, symbols: list[str]) -> str:
        return " ".join(symbols)


class SubwordTokenizer:
    """BPE or unigram pieces trained with Hugging Face `tokenizers`."""

    def __init__(self, kind: str, lowercase: bool, hf_json: str):
        from tokenizers import Tokenizer

        self.kind = kind
        self.lowercase = lowercase
        self.hf = Tokenizer.from_str(hf_json)

    @classmethod
    def train(cls, kind: str, lowercase: bool, texts: list[str], vocab_size: int) -> "SubwordTokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if kind == "bpe":
            tok = Tokenizer(models.BPE(unk_token=SPECIALS[UNK]))
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                          show_progress=False)
        else:
            tok = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                              unk_token=SPECIALS[UNK], show_progress=False)
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator((t.lower() if lowercase else t for t in texts), trainer)
        return cls(kind, lowercase, tok.to_str())

    def split(self, text: str) -> list[str]:
        return self.hf.encode(text.lower() if self.lowercase else text, add_special_tokens=False).tokens

    def join(self, symbols: list[str]) -> str:
        return self.hf.decoder.decode(symbols)

    def symbols(self) -> list[str]:
        vocab = self.hf.get_vocab()
        return [s for s, _ in sorted(vocab.items(), key=lambda kv: kv[1])]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase, "hf_json": self.hf.to_str()}


class TextCodec:
    """Text <-> ids through a tokenizer and a vocabulary."""

    def __init__(self, tokenizer, vocab: Vocab):
        self.tokenizer = tokenizer
        self.vocab = vocab

    @classmethod
    def fit(cls, cfg: TokenizerConfig, texts: list[str]) -> "TextCodec":
        if cfg.kind in ("bpe", "unigram"):
            tok = SubwordTokenizer.train(cfg.kind, cfg.lowercase, texts, cfg.vocab_size)
            return cls(tok, Vocab(tok.symbols()))
        tok = CharTokenizer(cfg.lowercase) if cfg.kind == "char" else WhitespaceTokenizer(cfg.lowercase)
        return cls(tok, Vocab.build((tok.split(t) for t in texts), cfg.min_frequency))

    def encode(self, text: str, unknown: Counter | None = None) -> list[int]:
        return self.vocab.encode(self.tokenizer.split(text), unknown)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.join(self.vocab.decode(ids))

    def symbols(self, ids: Iterable[int]) -> list[str]:
        return self.vocab.decode(ids)

    def to_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.to_dict(), "symbols": self.vocab.itos}

    @classmethod
    def from_dict(cls, d: dict) -> "TextCodec":
        t = d["tokenizer"]
        if t["kind"] == "char":
            tok = CharTokenizer(t["lowercase"])
        elif t["kind"] == "whitespace":
            tok = WhitespaceTokenizer(t["lowercase"])
        elif t["kind"] in ("bpe", "unigram"):
            tok = SubwordTokenizer(t["kind"], t["lowercase"], t["hf_json"])
        else:
            raise ValueError(f"unknown tokenizer kind {t['kind']!r}")
        return cls(tok, Vocab(d["symbols"]))

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


def share_vocab(a: TextCodec, b: TextCodec) -> tuple[TextCodec, TextCodec]:
    """Both codecs over one vocabulary covering both sides (for shared embeddings)."""
    extra = [s for s in b.vocab.itos[len(SPECIALS):] if s not in a.vocab.stoi]
    vocab = Vocab(a.vocab.itos + extra)
    return TextCodec(a.tokenizer, vocab), TextCodec(b.tokenizer, vocab)
