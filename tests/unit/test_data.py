"""Readers, codecs and batching; every bad-input case names the file and line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from transduce.config import DataConfig, TokenizerConfig
from transduce.data.cmudict import load_cmudict, split_of
from transduce.config import CmudictConfig
from transduce.data.pipeline import (TokenArray, encode_pairs, epoch_batches, group_references, load_splits,
                                     token_budget_batches)
from transduce.data.readers import DataError, read_aligned, read_jsonl, read_pairs, read_tsv
from transduce.data.vocab import BOS, EOS, PAD, UNK, TextCodec


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_tsv_reads_pairs_with_bom_and_crlf(tmp_path):
    f = write(tmp_path / "a.tsv", b"\xef\xbb\xbfcat\tK AE1 T\r\ndog\tD AO1 G\n")
    pairs, report = read_tsv(f)
    assert [(p.source, p.target) for p in pairs] == [("cat", "K AE1 T"), ("dog", "D AO1 G")]
    assert pairs[1].origin == f"{f}:2" and report.skipped == 0


@pytest.mark.parametrize("content,line,problem", [
    (b"cat\tK AE1 T\nno tab here\n", 2, "no tab"),
    (b"cat\tK AE1 T\na\tb\tc\n", 2, "2 tabs"),
    (b"ok\tfine\n\tK AE1 T\n", 2, "empty source"),
    (b"ok\tfine\nok2\tfine\ncat\t \n", 3, "empty target"),
    (b"ok\tfine\ncat\t\xff\xfe\n", 2, "invalid UTF-8"),
])
def test_tsv_errors_name_file_and_line(tmp_path, content, line, problem):
    f = write(tmp_path / "bad.tsv", content)
    with pytest.raises(DataError) as e:
        read_tsv(f)
    assert f"{f}:{line}:" in str(e.value) and problem in str(e.value)


def test_skip_invalid_counts_skipped_lines(tmp_path):
    f = write(tmp_path / "bad.tsv", b"a\tb\nnotab\nc\td\n\tx\n")
    pairs, report = read_tsv(f, skip_invalid=True)
    assert [p.source for p in pairs] == ["a", "c"]
    assert report.skipped == 2 and f"{f}:2" in report.first_problems[0]


def test_aligned_files_of_different_lengths(tmp_path):
    s = write(tmp_path / "src.txt", b"a\nb\nc\n")
    t = write(tmp_path / "tgt.txt", b"A\nB\n")
    with pytest.raises(DataError) as e:
        read_aligned(s, t, skip_invalid=True)  # misalignment is never skippable
    assert f"{s}:3" in str(e.value) and "same number of lines" in str(e.value)
    t2 = write(tmp_path / "tgt2.txt", b"A\nB\nC\n")
    pairs, _ = read_pairs(f"{s}|{t2}")
    assert [(p.source, p.target) for p in pairs] == [("a", "A"), ("b", "B"), ("c", "C")]


def test_aligned_empty_target_names_target_file(tmp_path):
    s = write(tmp_path / "src.txt", b"a\nb\n")
    t = write(tmp_path / "tgt.txt", b"A\n\n")
    with pytest.raises(DataError, match=f"{t}:2: empty target"):
        read_aligned(s, t)


def test_jsonl_errors(tmp_path):
    f = write(tmp_path / "d.jsonl", b'{"source": "a", "target": "b"}\n{"source": "a"}\n')
    with pytest.raises(DataError, match=f"{f}:2: expected an object"):
        read_jsonl(f)
    g = write(tmp_path / "e.jsonl", b'{"source": "a", "target": "b"}\n{oops\n')
    with pytest.raises(DataError, match=f"{g}:2: not valid JSON"):
        read_jsonl(g)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_tsv(tmp_path / "nope.tsv")


def test_codecs_round_trip_and_unknowns():
    for kind in ("char", "whitespace", "bpe", "unigram"):
        texts = ["the cat sat", "the dog ran", "a cat ran fast", "dogs and cats"] * 20
        codec = TextCodec.fit(TokenizerConfig(kind=kind, vocab_size=40), texts)
        again = TextCodec.from_dict(json.loads(codec.dumps()))
        for t in ["the cat ran", "a dog sat"]:
            ids = again.encode(t)
            assert ids == codec.encode(t)
            assert all(0 <= i < len(again.vocab) for i in ids)
            assert again.decode(ids + [EOS, 7]) == t
    codec = TextCodec.fit(TokenizerConfig(kind="char"), ["abc"])
    from collections import Counter
    unk = Counter()
    assert codec.encode("abz", unk)[-1] == UNK and unk == {"z": 1}


def test_token_budget_batches_cover_every_example_once():
    rng = np.random.default_rng(0)
    src_len, tgt_len = rng.integers(1, 30, 500), rng.integers(1, 30, 500)
    batches = token_budget_batches(src_len, tgt_len, batch_tokens=300, max_pairs=64, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    for b in batches:
        padded = len(b) * (max(src_len[b]) + max(tgt_len[b]) + 1)
        assert padded <= 300 or len(b) == 1
        assert len(b) <= 64
    assert batches == token_budget_batches(src_len, tgt_len, 300, 64, seed=1)
    assert batches != token_budget_batches(src_len, tgt_len, 300, 64, seed=2)


def greedy_batches(src_len, tgt_len, batch_tokens, max_pairs, seed):
    """The packing rule, one example at a time: in (source, target, random) length order, an
    example joins the current batch unless the padded size or the pair count would pass the limit."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(src_len)), tgt_len, src_len))
    batches, current, max_s, max_t = [], [], 0, 0
    for i in order.tolist():
        s, t = int(src_len[i]), int(tgt_len[i]) + 1
        ns, nt = max(max_s, s), max(max_t, t)
        if current and ((len(current) + 1) * (ns + nt) > batch_tokens or len(current) >= max_pairs):
            batches.append(current)
            current, ns, nt = [], s, t
        current.append(i)
        max_s, max_t = ns, nt
    batches += [current] if current else []
    return [batches[i] for i in rng.permutation(len(batches))]


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_batching_follows_the_greedy_rule(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 400))
    longest = 50 if seed < 6 else 3000  # lengths whose sort key passes 16 bits, too
    src_len, tgt_len = rng.integers(0, longest, n), rng.integers(0, longest, n)
    budget, pairs = int(rng.integers(1, 500)), int(rng.integers(1, 40))
    assert token_budget_batches(src_len, tgt_len, budget, pairs, seed) == \
        greedy_batches(src_len, tgt_len, budget, pairs, seed)


def test_padded_gathers_sequences_with_markers():
    seqs = [[5, 6, 7], [], [8], [9, 10, 11, 12]]
    ta = TokenArray(seqs)
    # rows in the requested order (repeats allowed), right-padded; markers around each sequence
    assert ta.padded([3, 0, 1, 3]).tolist() == [[9, 10, 11, 12], [5, 6, 7, PAD], [PAD] * 4, [9, 10, 11, 12]]
    assert ta.padded([2, 1], prefix=BOS).tolist() == [[BOS, 8], [BOS, PAD]]
    assert ta.padded([1, 0], suffix=EOS).tolist() == [[EOS, PAD, PAD, PAD], [5, 6, 7, EOS]]
    assert ta.padded([0, 2], value=-1, prefix=BOS, suffix=EOS).tolist() == [[BOS, 5, 6, 7, EOS],
                                                                          [BOS, 8, EOS, -1, -1]]
    assert ta.padded([]).shape == (0, 0)


def test_batches_and_masks(tmp_path):
    f = write(tmp_path / "t.tsv", "".join(f"{'ab' * (i % 5 + 1)}\t{'x y ' * (i % 3 + 1)}\n"
                                          for i in range(40)).encode())
    cfg = DataConfig(train=str(f), target_tokenizer=TokenizerConfig(kind="whitespace"))
    splits = load_splits(cfg)
    src = TextCodec.fit(cfg.source_tokenizer, [p.source for p in splits.train])
    tgt = TextCodec.fit(cfg.target_tokenizer, [p.target for p in splits.train])
    data = encode_pairs(splits.train, src, tgt, cfg)
    seen = 0
    for pos, batch in epoch_batches(data, 100, 16, seed=0, epoch=0):
        assert batch.src_mask.equal(batch.src != PAD)
        assert (batch.tgt_in[:, 0] == 2).all()
        # labels are tgt_in shifted left, ending with </s>
        for i in range(batch.src.shape[0]):
            n = int((batch.labels[i] != PAD).sum())
            assert batch.labels[i, n - 1] == EOS
            assert batch.labels[i, : n - 1].equal(batch.tgt_in[i, 1:n])
        seen += batch.src.shape[0]
    assert seen == 40
    resumed = [p for p, _ in epoch_batches(data, 100, 16, seed=0, epoch=0, start=2)]
    assert resumed[0] == 2


def test_too_long_pair_is_an_error(tmp_path):
    f = write(tmp_path / "t.tsv", b"abc\tx\nabcdefghij\ty\n")
    cfg = DataConfig(train=str(f), max_source_len=5)
    pairs, _ = read_tsv(f)
    codec = TextCodec.fit(cfg.source_tokenizer, ["abcdefghij", "xy"])
    with pytest.raises(DataError, match=f"{f}:2: pair longer"):
        encode_pairs(pairs, codec, codec, cfg)


def test_cmudict_split_is_by_word_and_keeps_all_references():
    splits = load_cmudict(CmudictConfig(max_words=3000))
    words = {s: {p.source for p in splits[s]} for s in splits}
    assert not (words["train"] & words["test"]) and not (words["train"] & words["dev"])
    assert len(words["test"]) > 50 and len(words["dev"]) > 20
    sources, refs = group_references(splits["test"])
    assert len(sources) == len(words["test"])
    assert any(len(r) > 1 for r in refs), "multi-pronunciation words keep every reference"
    assert split_of("hello", 0.02, 0.05) == split_of("hello", 0.02, 0.05)
    nostress = load_cmudict(CmudictConfig(max_words=3000, stress=False))
    assert not any(ch.isdigit() for p in nostress["train"] for ch in p.target)


def test_reading_pauses_the_cyclic_garbage_collector(tmp_path):
    # it rescanned every pair read so far, again and again (1.1 s of CMUdict's loading); after
    # reading it is as it was
    import gc

    (tmp_path / "t.tsv").write_text("a b\tb a\nc\td\n")
    seen = []

    def read(spec, skip_invalid):
        seen.append(gc.isenabled())
        return read_pairs(spec, skip_invalid)

    cfg = DataConfig(train=str(tmp_path / "t.tsv"), dev=str(tmp_path / "t.tsv"))
    was = gc.isenabled()
    try:
        for before in (True, False):
            (gc.enable if before else gc.disable)()
            splits = load_splits(cfg, read)
            assert len(splits.train) == 2 and gc.isenabled() == before
        assert seen == [False] * 4  # train and dev, twice
        gc.enable()
        with pytest.raises(DataError):
            load_splits(DataConfig(train=str(tmp_path / "missing.tsv")), read)
        assert gc.isenabled()  # restored on an error too
    finally:
        (gc.enable if was else gc.disable)()
