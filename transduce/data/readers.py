"""Readers for parallel data: TSV, JSONL and pairs of line-aligned files;
plain text (one document per line) for language models.

Every problem is reported with the file and line it comes from. Bad lines
stop the run unless the caller passes `skip_invalid=True`, in which case they
are counted in the returned `ReadReport` and never silently dropped.
"""
from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the problem."""


@dataclass(frozen=True, slots=True)
class Pair:
    source: str
    target: str
    origin: str  # "file:line", for messages


class PairList(Sequence):
    """The pairs read from one file, kept as two lists of strings and the line numbers: about
    a hundred bytes per pair instead of three strings and an object, so millions of pairs fit
    in memory. Items are `Pair`s made on access; `sources` and `targets` give the columns to
    code that encodes them in bulk (`pipeline.encode_pairs`)."""

    __slots__ = ("path", "sources", "targets", "numbers")

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sources: list[str] = []
        self.targets: list[str] = []
        self.numbers = array("q")

    def append(self, source: str, target: str, number: int) -> None:
        self.sources.append(source)
        self.targets.append(target)
        self.numbers.append(number)

    def origin(self, i: int) -> str:
        return f"{self.path}:{self.numbers[i]}"

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Pair(self.sources[i], self.targets[i], self.origin(i))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"PairList({self.path!r}, {len(self)} pairs)"


@dataclass
class ReadReport:
    read: int = 0
    skipped: int = 0
    first_problems: list[str] = field(default_factory=list)

    def skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.first_problems) < 5:
            self.first_problems.append(message)


BLOCK_BYTES = 1 << 24


def _raw_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """Blocks of whole lines as bytes (the last may lack its LF), the byte-order mark removed."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    first = True
    with f:
        while True:
            block = f.read(block_bytes)
            if not block:
                return
            if not block.endswith(b"\n"):
                block += f.readline()  # complete the last line
            if first and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            first = False
            yield block


def _block_lines(block: bytes) -> tuple[list, dict | None]:
    """(texts, errors) of a block's lines (see `_line_blocks`)."""
    whole = block.endswith(b"\n")
    errors = None
    try:
        texts = block.decode("utf-8").split("\n")
        if whole:
            texts.pop()
    except UnicodeDecodeError:
        texts, errors = [], {}
        for i, raw in enumerate((block[:-1] if whole else block).split(b"\n")):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:  # a CR at the end (ASCII) moves no error
                errors[i] = f"invalid UTF-8 at byte {e.start} of the line"
                texts.append(None)
    if b"\r" in block:  # CR of CRLF endings: every line but a last one that had no LF
        ended = len(texts) if whole else len(texts) - 1
        for i in range(ended):
            t = texts[i]
            if t is not None and t.endswith("\r"):
                texts[i] = t[:-1]
    return texts, errors


def _line_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, list, dict | None]]:
    """Yield (number of the first line, texts, errors) for blocks of whole lines.

    Lines end at LF; one CRLF or LF ending is removed (a CR inside the text
    is kept), and a byte-order mark at the start of the file. A block decodes
    in one call; where it is not valid UTF-8, line by line: `errors` maps the
    index of each bad line (its text None) to the problem, else it is None.
    """
    number = 1
    for block in _raw_blocks(path, block_bytes):
        texts, errors = _block_lines(block)
        yield number, texts, errors
        number += len(texts)


def _tsv_columns(block: bytes) -> tuple[list[str], list[str]] | None:
    """Sources and targets of a block of TSV lines in a few C calls, or None unless every line is
    valid UTF-8 with exactly one tab, no CR and no empty (or all-space) field; such a block goes
    line by line, which names the problem."""
    if b"\r" in block:
        return None
    codes = np.frombuffer(block, dtype=np.uint8)
    tabs, ends = np.flatnonzero(codes == 9), np.flatnonzero(codes == 10)
    if not block.endswith(b"\n"):
        ends = np.append(ends, len(codes))
    if len(tabs) != len(ends) or (tabs > ends).any() or (tabs[1:] < ends[:-1]).any():
        return None  # some line has no tab or more than one
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        return None
    fields = text.replace("\t", "\n").split("\n")
    if block.endswith(b"\n"):
        fields.pop()
    sources, targets = fields[0::2], fields[1::2]
    for col in (sources, targets):
        if "" in col or any(map(str.isspace, col)):
            return None
    return sources, targets


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line number, text, error) for each line (see `_line_blocks`)."""
    for first, texts, errors in _line_blocks(path):
        for i, text in enumerate(texts):
            yield first + i, text, errors.get(i) if errors else None


def _check(source: str, target: str, origin: str) -> str | None:
    if not source.strip():
        return f"{origin}: empty source"
    if not target.strip():
        return f"{origin}: empty target"
    return None


def _emit(pairs: PairList, report: ReadReport, skip_invalid: bool, problem: str | None,
          pair: tuple[str, str, int] | None) -> None:
    if problem is None:
        pairs.append(*pair)
        report.read += 1
    elif skip_invalid:
        report.skip(problem)
    else:
        raise DataError(problem + " (set data.skip_invalid: true to skip such lines)")


def read_tsv(path: Path, skip_invalid: bool = False, block_bytes: int = BLOCK_BYTES) -> tuple[PairList, ReadReport]:
    pairs = PairList(path)
    report = ReadReport()
    first = 1
    for block in _raw_blocks(path, block_bytes):
        cols = _tsv_columns(block)
        if cols is not None:  # a block of good lines goes in whole (the common case: millions of lines)
            n = len(cols[0])
            pairs.sources.extend(cols[0])
            pairs.targets.extend(cols[1])
            pairs.numbers.extend(range(first, first + n))
            report.read += n
        else:
            texts, errors = _block_lines(block)
            n = len(texts)
            for i, text in enumerate(texts):
                _tsv_line(pairs, report, skip_invalid, path, first + i, text, errors.get(i) if errors else None)
        first += n
    return pairs, report


def _tsv_line(pairs: PairList, report: ReadReport, skip_invalid: bool, path: Path, number: int,
              text: str | None, error: str | None) -> None:
    """One TSV line: a pair, or a problem reported (or counted as skipped)."""
    origin = f"{path}:{number}"
    if error:
        _emit(pairs, report, skip_invalid, f"{origin}: {error}", None)
    elif "\t" not in text:
        _emit(pairs, report, skip_invalid, f"{origin}: no tab; expected source<TAB>target", None)
    elif text.count("\t") != 1:
        _emit(pairs, report, skip_invalid,
              f"{origin}: {text.count(chr(9))} tabs; expected exactly one (source<TAB>target)", None)
    else:
        source, target = text.split("\t")
        _emit(pairs, report, skip_invalid, _check(source, target, origin), (source, target, number))


def read_jsonl(path: Path, skip_invalid: bool = False) -> tuple[PairList, ReadReport]:
    pairs = PairList(path)
    report = ReadReport()
    for number, text, error in _lines(path):
        origin = f"{path}:{number}"
        if error:
            _emit(pairs, report, skip_invalid, f"{origin}: {error}", None)
            continue
        if not text.strip():
            _emit(pairs, report, skip_invalid, f"{origin}: empty line; expected a JSON object", None)
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:  # also huge integers and deep nesting
            _emit(pairs, report, skip_invalid, f"{origin}: not valid JSON ({getattr(e, 'msg', e)})", None)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("source"), str) \
                or not isinstance(obj.get("target"), str):
            _emit(pairs, report, skip_invalid,
                  f'{origin}: expected an object with string fields "source" and "target"', None)
            continue
        source, target = obj["source"], obj["target"]
        _emit(pairs, report, skip_invalid, _check(source, target, origin), (source, target, number))
    return pairs, report


def read_aligned(src_path: Path, tgt_path: Path, skip_invalid: bool = False) -> tuple[PairList, ReadReport]:
    """Two files with one segment per line, line i of one aligned with line i of the other."""
    pairs = PairList(src_path)
    report = ReadReport()
    src_lines, tgt_lines = _lines(src_path), _lines(tgt_path)
    while True:
        s = next(src_lines, None)
        t = next(tgt_lines, None)
        if s is None and t is None:
            break
        if s is None or t is None:
            longer, shorter = (tgt_path, src_path) if s is None else (src_path, tgt_path)
            number = (t or s)[0]
            # Misaligned files cannot be repaired by skipping: always an error.
            raise DataError(f"{longer}:{number}: {shorter} has only {number - 1} lines; "
                            "line-aligned files must have the same number of lines")
        number = s[0]
        if s[2] or t[2]:
            bad_path, bad = (src_path, s) if s[2] else (tgt_path, t)
            _emit(pairs, report, skip_invalid, f"{bad_path}:{number}: {bad[2]}", None)
            continue
        problem = None
        if not s[1].strip():
            problem = f"{src_path}:{number}: empty source"
        elif not t[1].strip():
            problem = f"{tgt_path}:{number}: empty target"
        _emit(pairs, report, skip_invalid, problem, (s[1], t[1], number))
    return pairs, report


def read_text(path: Path, skip_invalid: bool = False) -> tuple[PairList, ReadReport]:
    """Plain text, one document per line, for a language model: each line is a target with an empty
    source. Blank lines are passed over (they separate documents), as the MLM reader does."""
    pairs = PairList(path)
    report = ReadReport()
    for number, text, error in _lines(path):
        if error:
            _emit(pairs, report, skip_invalid, f"{path}:{number}: {error}", None)
        elif text.strip():
            _emit(pairs, report, skip_invalid, None, ("", text, number))
    return pairs, report


def read_pairs(spec: str, skip_invalid: bool = False, format: str = "pairs") -> tuple[PairList, ReadReport]:
    """Read data named by `spec`: `file.tsv`, `file.jsonl` or `src_file|tgt_file`; with
    `format="text"`, a plain-text file (see `read_text`)."""
    if format == "text":
        return read_text(Path(spec), skip_invalid)
    if "|" in spec:
        src, tgt = spec.split("|", 1)
        return read_aligned(Path(src), Path(tgt), skip_invalid)
    path = Path(spec)
    if path.suffix == ".jsonl":
        return read_jsonl(path, skip_invalid)
    return read_tsv(path, skip_invalid)


def read_lines(path: Path) -> list[str]:
    """Plain input lines (e.g. sources to translate); empty lines are kept."""
    out = []
    for number, text, error in _lines(path):
        if error:
            raise DataError(f"{path}:{number}: {error}")
        out.append(text)
    return out
