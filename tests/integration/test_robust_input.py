"""Any Unicode text in, no crash out: tokenizers, readers and `translate`'s line handling (property tests)."""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from transduce.cli import _read_inputs
from transduce.config import TokenizerConfig
from transduce.data.readers import DataError, _line_blocks, read_aligned, read_jsonl, read_lines, read_tsv
from transduce.data.vocab import TextCodec, Vocab

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Characters that break naive text handling; mixed into the generated text.
TRICKY = ["\x00", "\ufeff", "\r\n", "\r", "\n", "\u2028", "\u2029", "\x85", "\x0b", "\x1c", "e\u0301",
          "\u0301", "\U0001F600", "\u200d", "İ", "ß", "\t", "  ", "\u3000", "<unk>", "</s>", "▁"]
# Any Unicode scalar value (surrogates cannot come from UTF-8 input).
any_char = st.characters(blacklist_categories=("Cs",))
text = st.lists(st.one_of(st.text(any_char, max_size=8), st.sampled_from(TRICKY)), max_size=20).map("".join)
CORPUS = ["hello world", "the cat sat on the mat", "naïve café", "日本語のテキスト", "e\u0301 combining",
          "tab\there", "emoji \U0001F600 here", "x" * 50] * 5
KINDS = ["char", "whitespace", "bpe", "unigram"]


@pytest.fixture(scope="module")
def codecs():
    return {(kind, low): TextCodec.fit(TokenizerConfig(kind=kind, lowercase=low, vocab_size=60), CORPUS)
            for kind in KINDS for low in (False, True)}


def check_codec(codec: TextCodec, s: str) -> None:
    ids = codec.encode(s)
    n = len(codec.vocab)
    assert all(isinstance(i, int) and 0 <= i < n for i in ids)
    assert isinstance(codec.decode(ids), str)


@SETTINGS
@given(s=text)
@example(s="x" * 100_000)
@example(s=("ab " * 30_000))
@example(s="\x00\ufeff\r\n\u2028e\u0301")
def test_encode_any_text_gives_ids_in_range(codecs, s):
    for codec in codecs.values():
        check_codec(codec, s)


@SETTINGS
@given(texts=st.lists(text, max_size=6))
@example(texts=["ΟΔΟΣ ΣΑΣ", "İx", "", "\U0001F600\x00"])
def test_bulk_encoding_equals_encoding_one_by_one(codecs, texts):
    """encode_many (numpy paths for char/whitespace, used on large corpora) gives exactly encode's ids
    and unknown-symbol counts, whatever the text and wherever the chunks break."""
    for codec in codecs.values():
        one, many = Counter(), Counter()
        ref = [codec.encode(t, one) for t in texts]
        flat, lengths = codec.encode_many(texts, many, chunk=4)
        assert lengths.tolist() == [len(r) for r in ref]
        assert flat.tolist() == [i for r in ref for i in r]
        assert many == one


def test_whitespace_table_is_what_str_split_splits_on():
    from transduce.data.vocab import WHITESPACE

    assert WHITESPACE.tolist() == [c for c in range(0x110000) if chr(c).isspace()]


@pytest.mark.parametrize("kind", ["char", "whitespace"])
def test_bulk_vocabulary_counts_equal_token_by_token(kind):
    texts = CORPUS + ["ΟΔΟΣ İstanbul", "ẞ straße"]
    for low in (False, True):
        fitted = TextCodec.fit(TokenizerConfig(kind=kind, lowercase=low), texts)
        tok = fitted.tokenizer
        assert fitted.vocab.itos == Vocab.build(tok.split(t) for t in texts).itos


def lines_one_by_one(path):
    """The line rule, a line at a time: split at LF, drop one LF or CRLF ending and a leading BOM,
    decode each line on its own."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield number, None, f"invalid UTF-8 at byte {e.start} of the line"


BYTES = [b"a", b"\t", b"\r", b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xc3", b"\xc3\xa9", b"\xff", b" ", b"\x00",
         b"\xe2\x80\xa8", b"\xf0\x9f\x98\x80"]


@SETTINGS
@given(parts=st.lists(st.one_of(st.sampled_from(BYTES), st.binary(max_size=4)), max_size=40),
       block=st.sampled_from([1, 2, 5, 64, 1 << 20]))
def test_block_reader_reads_lines_as_one_by_one(tmp_path, parts, block):
    """Whole blocks decoded at once (fast on millions of lines) give every line, number, text and
    error exactly as reading and decoding one line at a time."""
    path = tmp_path / "x.txt"
    path.write_bytes(b"".join(parts))
    got = [(first + i, t, errors.get(i) if errors else None)
           for first, texts, errors in _line_blocks(path, block) for i, t in enumerate(texts)]
    assert got == list(lines_one_by_one(path))


@SETTINGS
@given(parts=st.lists(st.one_of(st.sampled_from(BYTES + [b"\t", b"a\tb\n", b"\xe3\x80\x80"]),
                                st.binary(max_size=4)), max_size=40),
       block=st.sampled_from([1, 3, 8, 1 << 20]))
@example(parts=[b"a\tb\n", b"c\t\xe3\x80\x80\n", b"d\te\tf\n", b"g\n", b"h\ti"], block=1 << 20)
def test_tsv_blocks_read_as_line_by_line(tmp_path, parts, block):
    """The TSV fast path (whole blocks split in C) keeps, numbers and rejects exactly the lines that
    reading one line at a time does."""
    from transduce.data.readers import PairList, ReadReport, _lines, _tsv_line

    path = tmp_path / "d.tsv"
    path.write_bytes(b"".join(parts))
    ref, ref_report = PairList(path), ReadReport()
    for number, t, error in _lines(path):
        _tsv_line(ref, ref_report, True, path, number, t, error)
    got, report = read_tsv(path, skip_invalid=True, block_bytes=block)
    assert list(got) == list(ref) and report == ref_report


@SETTINGS
@given(data=st.data())
def test_decode_any_in_range_ids(codecs, data):
    for codec in codecs.values():
        ids = data.draw(st.lists(st.integers(0, len(codec.vocab) - 1), max_size=40))
        assert isinstance(codec.decode(ids), str)
        assert isinstance(codec.symbols(ids), list)


@settings(max_examples=25, deadline=None)
@given(corpus=st.lists(text, min_size=1, max_size=6), kind=st.sampled_from(KINDS), probe=text)
def test_fit_on_any_corpus_then_encode(corpus, kind, probe):
    try:
        codec = TextCodec.fit(TokenizerConfig(kind=kind, vocab_size=40), corpus)
    except ValueError as e:  # unigram needs a vocabulary that holds every character: said clearly
        assert kind == "unigram" and "vocab_size=40" in str(e) and "distinct characters" in str(e)
        return
    for s in corpus + [probe]:
        check_codec(codec, s)
    assert TextCodec.from_dict(json.loads(codec.dumps())).encode(probe) == codec.encode(probe)


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------

# A field as it can appear in a line: no tab or LF, something besides white space.
field = text.map(lambda s: s.replace("\t", " ").replace("\n", " ")).filter(lambda s: s.strip())


def no_trailing_cr(s: str) -> bool:
    return not s.endswith("\r")  # "x\r\n" is a CRLF line end, so a trailing CR is not data


@SETTINGS
@given(pairs=st.lists(st.tuples(field, field), min_size=1, max_size=8), crlf=st.booleans())
@example(pairs=[("a\r", "b\r"), ("\ra", "\rc\r")], crlf=True)
def test_tsv_round_trip(tmp_path, pairs, crlf):
    if pairs[0][0].startswith("\ufeff"):
        pairs[0] = ("x" + pairs[0][0], pairs[0][1])  # a BOM at the start of a file is not data
    if not crlf:  # "x\r\n" is a CRLF line end, so before LF a trailing CR is not data
        pairs = [(s, t + "x" if t.endswith("\r") else t) for s, t in pairs]
    end = "\r\n" if crlf else "\n"
    path = tmp_path / "d.tsv"
    path.write_bytes("".join(f"{s}\t{t}{end}" for s, t in pairs).encode("utf-8"))
    got, report = read_tsv(path)
    assert [(p.source, p.target) for p in got] == pairs and report.skipped == 0


@SETTINGS
@given(pairs=st.lists(st.tuples(text.filter(str.strip), text.filter(str.strip)), min_size=1, max_size=8))
def test_jsonl_round_trip(tmp_path, pairs):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n" for s, t in pairs),
                    encoding="utf-8")
    got, _ = read_jsonl(path)
    assert [(p.source, p.target) for p in got] == pairs


@SETTINGS
@given(lines=st.lists(field.filter(no_trailing_cr), min_size=1, max_size=8))
def test_aligned_round_trip(tmp_path, lines):
    lines = ["x" + s if s.startswith("\ufeff") else s for s in lines]
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_text("".join(s + "\n" for s in lines), encoding="utf-8", newline="")
    tgt.write_text("".join("y" + s[::-1] + "y\n" for s in lines), encoding="utf-8", newline="")
    got, _ = read_aligned(src, tgt)
    assert [(p.source, p.target) for p in got] == [(s, "y" + s[::-1] + "y") for s in lines]


raw_bytes = st.one_of(st.binary(max_size=300), text.map(lambda s: s.encode("utf-8")))


@SETTINGS
@given(data=raw_bytes, other=raw_bytes)
@example(data=b"[" * 100_000 + b"\n", other=b"x\n")
@example(data=b'{"source": ' + b"1" * 5000 + b"}\n", other=b"")
@example(data=b"\xef\xbb\xbfa\tb\r\n\xff\xfe\tq\n", other=b"\xc3\n")
def test_readers_never_crash(tmp_path, data, other):
    """Arbitrary bytes: pairs, or a DataError naming file and line; with skip_invalid, never an error."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(data)
    b.write_bytes(other)
    n_lines = len(data.split(b"\n")) - (1 if data.endswith(b"\n") or not data else 0)
    for read in (read_tsv, read_jsonl, lambda p, skip: read_aligned(p, b, skip)):
        try:
            read(a, False)
        except DataError as e:
            assert str(a) in str(e) or str(b) in str(e)
        if read is not read_tsv and read is not read_jsonl:
            continue  # misaligned files are an error even when skipping
        pairs, report = read(a, True)
        assert report.read + report.skipped == n_lines == len(pairs) + report.skipped
    try:
        assert len(read_lines(a)) == n_lines
    except DataError as e:
        assert f"{a}:" in str(e)


# ---------------------------------------------------------------------------
# translate: one output line per input line
# ---------------------------------------------------------------------------

def stdin_lines(monkeypatch, data: bytes) -> list[str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    return _read_inputs(argparse.Namespace(input=None))


input_line = text.map(lambda s: s.replace("\n", " "))


@SETTINGS
@given(lines=st.lists(input_line, max_size=10), crlf=st.booleans(), final_newline=st.booleans())
@example(lines=["a\rb", "", "\x00", "x\u2028y", "", "\u2029\x85\x0b\x0c"], crlf=False, final_newline=True)
@example(lines=["a\r", "\r", "", "b"], crlf=True, final_newline=False)
@example(lines=["\r"], crlf=True, final_newline=False)  # a last line with no LF: its CR is text
def test_read_inputs_keeps_every_line(tmp_path, monkeypatch, lines, crlf, final_newline):
    if not crlf:
        lines = [s + "x" if no_trailing_cr(s) is False else s for s in lines]
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = "x" + lines[0]
    if lines and not final_newline and lines[-1] == "":
        lines[-1] = "x"  # without a final newline, a last empty line does not exist
    end = "\r\n" if crlf else "\n"
    data = (end.join(lines) + (end if final_newline else "")).encode("utf-8") if lines else b""
    assert stdin_lines(monkeypatch, data) == lines
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    assert read_lines(path) == lines


def test_read_inputs_bom_and_bad_utf8(monkeypatch):
    assert stdin_lines(monkeypatch, b"\xef\xbb\xbfcat\r\n\r\ndog") == ["cat", "", "dog"]
    with pytest.raises(ValueError, match="<stdin>:2: invalid UTF-8"):
        stdin_lines(monkeypatch, b"ok\n\xff\n")


def test_translate_writes_one_line_per_input(monkeypatch, capsys):
    """Through the command: empty lines, CR, NUL and U+2028 inside lines, and outputs that contain CR/LF."""
    import transduce.cli as cli
    import transduce.inference as inference

    inputs = ["a\rb", "", "\x00", "x\u2028y", "", "last"]
    from types import SimpleNamespace

    from transduce.config import Config

    # no model, only its config: the lines are the point
    monkeypatch.setattr(cli, "_decoding_run", lambda args: SimpleNamespace(config=Config()))
    monkeypatch.setattr(inference, "decode", lambda run, sources, *a, **k: [[s] for s in sources])
    monkeypatch.setattr(inference, "output_text", lambda run, source, hyp: f"{hyp}\n{hyp}\r")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(inputs).encode())))
    assert cli.main(["translate", "--model", "unused"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.split("\n")) == len(inputs) + 1
    assert out.split("\n")[3] == "x\u2028y x\u2028y "


@SETTINGS
@given(texts=st.lists(text, max_size=12), kind=st.sampled_from(["char", "whitespace"]), low=st.booleans(),
       min_frequency=st.sampled_from([1, 2]))
@example(texts=["ΟΔΟΣ ΣΑΣ", "İx", "", "\U0001F600\x00", "<unk> </s> a", "a\nb"], kind="whitespace", low=True,
         min_frequency=1)
def test_fit_encode_in_one_pass_equals_fit_then_encode(texts, kind, low, min_frequency):
    """Fitting and encoding a corpus in one pass gives the vocabulary, ids and unknown-symbol counts
    of fitting first and encoding each text after."""
    cfg = TokenizerConfig(kind=kind, lowercase=low, min_frequency=min_frequency)
    one = Counter()
    codec, flat, lengths = TextCodec.fit_encode(cfg, texts, one)
    ref = TextCodec.fit(cfg, texts)
    assert codec.vocab.itos == ref.vocab.itos
    unknown = Counter()
    ids = [ref.encode(t, unknown) for t in texts]
    assert lengths.tolist() == [len(i) for i in ids]
    assert flat.tolist() == [i for x in ids for i in x]
    assert one == unknown
    vocab, flat2, lengths2, unknown2 = codec.tokenizer.fit_ids(texts, min_frequency, chunk=2)  # across chunks
    assert vocab.itos == ref.vocab.itos and flat2.tolist() == flat.tolist()
    assert lengths2.tolist() == lengths.tolist() and unknown2 == unknown
