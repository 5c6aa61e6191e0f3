"""Tokenizers (characters, whitespace tokens, trained subwords, a pretrained
checkpoint's own tokenizer) and vocabularies.

A `TextCodec` pairs a tokenizer with its vocabulary: `encode(text) -> ids`,
`decode(ids) -> text`. Codecs are saved with the model as JSON and rebuilt
from it alone.

Pretrained tokenizers (kind `pretrained`, a Hugging Face checkpoint's
WordPiece/BPE tokenizer) keep their symbols, but the checkpoint's special
tokens are renamed to ours (`PRETRAINED_SPECIALS`: [PAD] -> <pad>, [UNK] ->
<unk>, [CLS] -> <s>, [SEP] -> </s>, [MASK] -> <mask>), so ids 0..3 mean the
same in every vocabulary. Our ids therefore differ from the checkpoint's;
`PretrainedTokenizer.checkpoint_id` maps a symbol back when weights load.
"""
from __future__ import annotations

import json
from collections import Counter
from itertools import chain, repeat
from typing import Iterable

import numpy as np

from transduce.config import TokenizerConfig

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
MASK_SYMBOL = "<mask>"  # masked-language-model input symbol (encoder families' vocabularies only)
# A pretrained checkpoint's special tokens and the symbols they become here.
PRETRAINED_SPECIALS = {"[PAD]": "<pad>", "[UNK]": "<unk>", "[CLS]": "<s>", "[SEP]": "</s>", "[MASK]": MASK_SYMBOL}


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
        return cls.from_counts(Counter(s for seq in sequences for s in seq), min_frequency)

    @classmethod
    def from_counts(cls, counts: Counter, min_frequency: int = 1) -> "Vocab":
        """Specials, then the symbols seen at least `min_frequency` times, most frequent first."""
        kept = sorted((s for s, c in counts.items() if c >= min_frequency and s not in SPECIALS),
                      key=lambda s: (-counts[s], s))
        return cls(SPECIALS + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def char_table(self) -> np.ndarray:
        """id of each code point up to the largest one-character symbol (UNK elsewhere), plus one
        last entry that stands for every code point beyond it (UNK)."""
        table = getattr(self, "_char_table", None)
        if table is None:
            singles = {ord(s): i for s, i in self.stoi.items() if len(s) == 1}
            table = np.full(max(singles, default=0) + 2, UNK, dtype=np.int32)
            for c, i in singles.items():
                table[c] = i
            self._char_table = table
        return table

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


def _count_unknown(ids: np.ndarray, symbols, unknown: Counter | None) -> None:
    if unknown is not None:
        for k in np.flatnonzero(ids == UNK):
            unknown[symbols(k)] += 1


class CharTokenizer:
    """One symbol per character. Bulk paths (`count`, `ids`) work on many texts at once, in C
    and numpy, and give exactly what `split` + `Vocab.encode` give text by text."""

    kind = "char"

    def __init__(self, lowercase: bool = False):
        self.lowercase = lowercase

    def split(self, text: str) -> list[str]:
        return list(text.lower() if self.lowercase else text)

    def join(self, symbols: list[str]) -> str:
        return "".join(symbols)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase}

    def _cased(self, texts: list[str]) -> list[str]:
        return [t.lower() for t in texts] if self.lowercase else texts

    def count(self, texts: list[str], chunk: int = 200_000) -> Counter:
        """Symbol counts over all texts, a chunk at a time."""
        counts = Counter()
        for k in range(0, len(texts), chunk):
            self._count_into(counts, self._cased(texts[k: k + chunk]))
        return counts

    def _count_into(self, counts: Counter, texts: list[str]) -> None:
        text = "".join(texts)
        try:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:  # lone surrogates
            counts.update(text)
            return
        n = np.bincount(codes)
        seen = np.flatnonzero(n)
        for c, k in zip(seen.tolist(), n[seen].tolist()):
            counts[chr(c)] += k

    def _keys(self, texts: list[str], table: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """(int32 key of every symbol, int64 lengths) of cased texts, for `fit_ids`: a character's key
        is its code point. None where the bulk path does not apply (lone surrogates)."""
        try:
            codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:
            return None
        return codes.astype(np.int32), np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))

    def _symbol_of(self, table: dict):
        return chr

    def fit_ids(self, texts: list[str], min_frequency: int = 1, chunk: int = 200_000):
        """A vocabulary fitted on the texts and the texts' ids under it, in one pass over them:
        (vocab, flat int32 ids, int64 lengths, unknown-symbol counts), exactly what `count`,
        `Vocab.from_counts` and `ids` give; None where the bulk path does not apply."""
        table: dict = {}
        parts, counts = [], np.zeros(0, dtype=np.int64)
        for k in range(0, len(texts), chunk):
            got = self._keys(self._cased(texts[k: k + chunk]), table)
            if got is None:
                return None
            n = np.bincount(got[0])
            if len(n) > len(counts):
                counts = np.concatenate([counts, np.zeros(len(n) - len(counts), dtype=np.int64)])
            counts[: len(n)] += n
            parts.append(got)
        symbol = self._symbol_of(table)
        seen = np.flatnonzero(counts).tolist()
        counter = Counter({symbol(key): int(counts[key]) for key in seen})
        vocab = Vocab.from_counts(counter, min_frequency)
        remap = np.full(len(counts), UNK, dtype=np.int32)
        for key in seen:
            remap[key] = vocab.stoi.get(symbol(key), UNK)
        unknown = Counter({s: c for s, c in counter.items() if vocab.stoi.get(s, UNK) == UNK})
        lengths = np.concatenate([n for _, n in parts]) if parts else np.zeros(0, np.int64)
        # ids written part by part into one array, each part freed once written (memory: one copy)
        flat = np.empty(sum(len(keys) for keys, _ in parts), dtype=np.int32)
        at = 0
        for i, (keys, _) in enumerate(parts):
            np.take(remap, keys, out=flat[at: at + len(keys)])
            at += len(keys)
            parts[i] = None
        return vocab, flat, lengths, unknown

    def ids(self, texts: list[str], vocab: "Vocab", unknown: Counter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(flat int32 ids, int64 lengths) of the texts: `vocab.encode(self.split(t))` for each, joined."""
        texts = self._cased(texts)
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        try:
            codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:  # lone surrogates: one text at a time
            flat = [vocab.encode(self.split(t), unknown) for t in texts]
            return np.fromiter(chain.from_iterable(flat), dtype=np.int32), lengths
        table = vocab.char_table()
        ids = table[np.minimum(codes, len(table) - 1)]  # the last entry (UNK) for every code beyond
        _count_unknown(ids, lambda k: chr(codes[k]), unknown)
        return ids, lengths


# What str.split() splits on (the code points whose str.isspace() is true).
WHITESPACE = np.array([0x9, 0xA, 0xB, 0xC, 0xD, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680,
                       *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000], dtype=np.uint32)


def _tokens_per_text(codes: np.ndarray, n: int) -> np.ndarray | None:
    """Whitespace-separated tokens in each of `n` texts from the code points of the texts joined by
    newlines: the token starts (a non-space at the start or after a space) between the joining
    newlines. None when a text holds a newline of its own."""
    seps = np.flatnonzero(codes == 0xA)
    if len(seps) != n - 1:
        return None
    space = np.isin(codes, WHITESPACE)
    starts = ~space
    starts[1:] &= space[:-1]
    before = np.cumsum(starts)
    edges = np.concatenate(([0], before[seps], before[-1:] if len(before) else [0]))
    return np.diff(edges).astype(np.int64)


class WhitespaceTokenizer(CharTokenizer):
    kind = "whitespace"

    def split(self, text: str) -> list[str]:
        return (text.lower() if self.lowercase else text).split()

    def join(self, symbols: list[str]) -> str:
        return " ".join(symbols)

    def _count_into(self, counts: Counter, texts: list[str]) -> None:
        counts.update(" ".join(texts).split())  # the same tokens as splitting each text, in one C call

    def _split_joined(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """Every text's tokens (one C call) and the number in each text."""
        joined = "\n".join(texts)
        tokens = joined.split()
        try:
            lengths = _tokens_per_text(np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32), len(texts))
        except UnicodeEncodeError:  # lone surrogates
            lengths = None
        if lengths is None:  # one text at a time
            lengths = np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(texts))
        return tokens, lengths

    def _keys(self, texts: list[str], table: dict) -> tuple[np.ndarray, np.ndarray]:
        # a token's key: the order in which it was first seen
        tokens, lengths = self._split_joined(texts)
        for t in set(tokens).difference(table):
            table[t] = len(table)
        return np.fromiter(map(table.__getitem__, tokens), dtype=np.int32, count=len(tokens)), lengths

    def _symbol_of(self, table: dict):
        return sorted(table, key=table.__getitem__).__getitem__

    def ids(self, texts: list[str], vocab: "Vocab", unknown: Counter | None = None) -> tuple[np.ndarray, np.ndarray]:
        tokens, lengths = self._split_joined(self._cased(texts))
        ids = np.fromiter(map(vocab.stoi.get, tokens, repeat(UNK)), dtype=np.int32, count=len(tokens))
        _count_unknown(ids, tokens.__getitem__, unknown)
        return ids, lengths


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
        try:
            tok.train_from_iterator((t.lower() if lowercase else t for t in texts), trainer)
        except Exception as e:  # `tokenizers` raises bare Exceptions, e.g. a vocab_size below the alphabet
            raise ValueError(f"cannot train the {kind} tokenizer: {e} (vocab_size={vocab_size}; "
                             f"the training text has {len(set(''.join(texts)))} distinct characters)") from None
        return cls(kind, lowercase, tok.to_str())

    def split(self, text: str) -> list[str]:
        return self.hf.encode(text.lower() if self.lowercase else text, add_special_tokens=False).tokens

    def join(self, symbols: list[str]) -> str:
        return self.hf.decoder.decode(symbols)

    def symbols(self) -> list[str]:
        """Our specials first, then the trained pieces in their id order. The trainer does not
        always give the specials ids 0..3 (unigram can move <unk>); pieces map through our
        Vocab, so its ids need not equal the tokenizer's."""
        vocab = self.hf.get_vocab()
        return SPECIALS + [s for s, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if s not in SPECIALS]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase, "hf_json": self.hf.to_str()}


class PretrainedTokenizer:
    """A Hugging Face checkpoint's tokenizer (e.g. BERT's WordPiece), special tokens renamed to ours.

    Built from the checkpoint folder's tokenizer.json, or from vocab.txt
    (BERT normalisation and pre-tokenisation; lower-cased unless
    tokenizer_config.json says `do_lower_case: false`). The whole tokenizer is
    stored in the codec, so a trained run never needs the folder again.
    """

    kind = "pretrained"

    def __init__(self, hf_json: str, lowercase: bool = False):
        from tokenizers import Tokenizer

        self.lowercase = lowercase
        self.hf = Tokenizer.from_str(hf_json)
        self.hf.no_padding()     # tokenizer.json files often pad/truncate to a fixed length
        self.hf.no_truncation()
        self.rename = {t: s for t, s in PRETRAINED_SPECIALS.items() if self.hf.token_to_id(t) is not None}
        self.unrename = {s: t for t, s in self.rename.items()}
        missing = [s for s in SPECIALS if s not in self.unrename and self.hf.token_to_id(s) is None]
        if missing:
            raise ValueError(f"pretrained tokenizer has no token for {missing} (needs [PAD], [UNK], [CLS], "
                             "[SEP] or <pad>, <unk>, <s>, </s>)")

    @classmethod
    def load(cls, folder, lowercase: bool = False) -> "PretrainedTokenizer":
        from transduce.data.pretrained import read_tokenizer_json

        return cls(read_tokenizer_json(folder), lowercase)

    def split(self, text: str) -> list[str]:
        tokens = self.hf.encode(text.lower() if self.lowercase else text, add_special_tokens=False).tokens
        return [self.rename.get(t, t) for t in tokens]

    def join(self, symbols: list[str]) -> str:
        tokens = [self.unrename.get(s, s) for s in symbols]
        # without a decoder, tokenizers joins the tokens with spaces
        return self.hf.decoder.decode(tokens) if self.hf.decoder is not None else " ".join(tokens)

    def symbols(self) -> list[str]:
        """Our specials first, then every other checkpoint symbol in checkpoint-id order."""
        vocab = self.hf.get_vocab(with_added_tokens=True)
        rest = [self.rename.get(t, t) for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        return SPECIALS + [s for s in rest if s not in SPECIALS]

    def checkpoint_id(self, symbol: str) -> int | None:
        """The id of our `symbol` in the checkpoint's vocabulary (None if it has none)."""
        return self.hf.token_to_id(self.unrename.get(symbol, symbol))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase, "hf_json": self.hf.to_str()}


class TextCodec:
    """Text <-> ids through a tokenizer and a vocabulary.

    `wrap`: non-empty texts are encoded as <s> ... </s> (what a BERT encoder
    saw in pretraining as [CLS] ... [SEP]); for the source side only.
    `eos`: non-empty texts end with </s> (a Marian encoder's input); source side.
    `reverse`: the ids run last symbol first (a right-to-left decoder on the
    target side, a reversed input on the source side); `decode` puts them
    back in reading order, so text in and text out read as usual.
    """

    def __init__(self, tokenizer, vocab: Vocab, wrap: bool = False, reverse: bool = False, eos: bool = False):
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.wrap = wrap
        self.reverse = reverse
        self.eos = eos

    @classmethod
    def fit(cls, cfg: TokenizerConfig, texts: list[str]) -> "TextCodec":
        if cfg.kind == "pretrained":
            from transduce.data.pretrained import resolve_path

            tok = PretrainedTokenizer.load(resolve_path(cfg.path), cfg.lowercase)
            return cls(tok, Vocab(tok.symbols()), cfg.wrap, cfg.reverse)
        if cfg.kind in ("bpe", "unigram"):
            tok = SubwordTokenizer.train(cfg.kind, cfg.lowercase, texts, cfg.vocab_size)
            return cls(tok, Vocab(tok.symbols()), cfg.wrap, cfg.reverse)
        tok = CharTokenizer(cfg.lowercase) if cfg.kind == "char" else WhitespaceTokenizer(cfg.lowercase)
        return cls(tok, Vocab.from_counts(tok.count(texts), cfg.min_frequency), cfg.wrap, cfg.reverse)

    @classmethod
    def fit_encode(cls, cfg: TokenizerConfig, texts: list[str], unknown: Counter | None = None
                   ) -> tuple["TextCodec", np.ndarray, np.ndarray]:
        """`fit` and then `encode_many` of the same texts: (codec, flat ids, lengths). Character and
        whitespace tokenizers do both in one pass over the texts (a large corpus is read once)."""
        if cfg.kind in ("char", "whitespace") and not cfg.wrap:
            tok = CharTokenizer(cfg.lowercase) if cfg.kind == "char" else WhitespaceTokenizer(cfg.lowercase)
            got = tok.fit_ids(texts, cfg.min_frequency)
            if got is not None:
                vocab, flat, lengths, unknown_here = got
                if unknown is not None:
                    unknown.update(unknown_here)
                if cfg.reverse:
                    flat = reverse_segments(flat, lengths)
                return cls(tok, vocab, cfg.wrap, cfg.reverse), flat, lengths
        codec = cls.fit(cfg, texts)
        return (codec, *codec.encode_many(texts, unknown))

    def encode(self, text: str, unknown: Counter | None = None) -> list[int]:
        ids = self.vocab.encode(self.tokenizer.split(text), unknown)
        if self.reverse:
            ids.reverse()
        if self.wrap and ids:
            return [BOS] + ids + [EOS]
        return ids + [EOS] if self.eos and ids else ids

    def encode_many(self, texts: list[str], unknown: Counter | None = None,
                    chunk: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
        """(flat int32 ids, int64 lengths) of many texts, exactly `encode` of each, joined; in bulk
        (numpy) for character and whitespace tokenizers, chunk by chunk to bound the memory."""
        bulk = getattr(self.tokenizer, "ids", None)
        flats, lengths = [], []
        for k in range(0, len(texts), chunk):
            part = texts[k: k + chunk]
            if bulk is not None and not self.wrap and not self.eos:
                flat, length = bulk(part, self.vocab, unknown)
                if self.reverse:
                    flat = reverse_segments(flat, length)
            else:
                seqs = [self.encode(t, unknown) for t in part]
                length = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
                flat = np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(length.sum()))
            flats.append(flat)
            lengths.append(length)
        if not flats:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        return np.concatenate(flats), np.concatenate(lengths)

    def encode_words(self, words: list[str], unknown: Counter | None = None) -> tuple[list[int], list[int]]:
        """Ids of pre-split words (each word's pieces, at least <unk>) and the position of each
        word's first piece (for tagging: one label per word)."""
        if self.reverse:
            raise ValueError("a reversed codec has no word positions to tag (reverse applies to families with "
                             "a decoder)")
        ids, firsts = [BOS] if self.wrap else [], []
        for w in words:
            firsts.append(len(ids))
            ids += self.vocab.encode(self.tokenizer.split(w), unknown) or [UNK]
        if self.wrap:
            ids.append(EOS)
        return ids, firsts

    def decode(self, ids: Iterable[int]) -> str:
        symbols = self.vocab.decode(ids)
        if self.reverse:
            symbols.reverse()
        return self.tokenizer.join(symbols)

    def symbols(self, ids: Iterable[int]) -> list[str]:
        return self.vocab.decode(ids)

    def with_symbol(self, symbol: str) -> "TextCodec":
        """This codec with `symbol` added right after the specials (if it is not there yet)."""
        if symbol in self.vocab.stoi:
            return self
        itos = self.vocab.itos
        return TextCodec(self.tokenizer, Vocab(itos[: len(SPECIALS)] + [symbol] + itos[len(SPECIALS):]), self.wrap,
                         self.reverse, self.eos)

    def to_dict(self) -> dict:
        d = {"tokenizer": self.tokenizer.to_dict(), "symbols": self.vocab.itos, "wrap": self.wrap}
        if self.reverse:  # absent in reading order: codecs saved before it existed compare equal
            d["reverse"] = True
        if self.eos:
            d["eos"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TextCodec":
        t = d["tokenizer"]
        if t["kind"] == "char":
            tok = CharTokenizer(t["lowercase"])
        elif t["kind"] == "whitespace":
            tok = WhitespaceTokenizer(t["lowercase"])
        elif t["kind"] in ("bpe", "unigram"):
            tok = SubwordTokenizer(t["kind"], t["lowercase"], t["hf_json"])
        elif t["kind"] == "pretrained":
            tok = PretrainedTokenizer(t["hf_json"], t["lowercase"])
        else:
            raise ValueError(f"unknown tokenizer kind {t['kind']!r}")
        return cls(tok, Vocab(d["symbols"]), bool(d.get("wrap", False)), bool(d.get("reverse", False)),
                   bool(d.get("eos", False)))

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


def share_vocab(a: TextCodec, b: TextCodec) -> tuple[TextCodec, TextCodec]:
    """Both codecs over one vocabulary covering both sides (for shared embeddings)."""
    extra = [s for s in b.vocab.itos[len(SPECIALS):] if s not in a.vocab.stoi]
    vocab = Vocab(a.vocab.itos + extra)
    return (TextCodec(a.tokenizer, vocab, a.wrap, a.reverse, a.eos),
            TextCodec(b.tokenizer, vocab, b.wrap, b.reverse, b.eos))


def reverse_segments(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`flat` (the sequences of `lengths` laid end to end) with each sequence reversed in place."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    # position i of the sequence starting at s with length n takes the id at s + (s + n - 1) - i
    src = np.repeat(2 * starts + lengths - 1, lengths) - np.arange(int(lengths.sum()), dtype=np.int64)
    return flat[src]
