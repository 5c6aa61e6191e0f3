"""Task metrics over hypotheses and (possibly several) references per source.

- `wer`: word error rate for G2P, % of sources whose output matches none of
  its references (a word is right if it matches any pronunciation).
- `per`: phoneme (token) error rate, edit distance to the closest reference
  over that reference's length, summed over the corpus, in %.
- `*_nostress`: the same with stress digits removed from both sides.
- `seq_acc`: % of outputs equal to a reference; `cer`: character error rate
  against the closest reference; `bleu`, `chrf`: sacrebleu corpus scores.
Lower is better for error rates, higher for the others (`higher_is_better`).
"""
from __future__ import annotations

import re

_DIGITS = re.compile(r"\d")


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _closest(hyp: list, refs: list[list]) -> tuple[int, int]:
    """(edit distance, reference length) of the reference closest to hyp."""
    return min((edit_distance(hyp, r), len(r)) for r in refs)


def error_rates(hyps: list[str], refs: list[list[str]], unit: str = "token") -> tuple[float, float]:
    """(sequence error %, token error %) with multi-reference matching."""
    split = str.split if unit == "token" else list
    wrong, edits, total = 0, 0, 0
    for h, rs in zip(hyps, refs, strict=True):
        hs = split(h)
        rss = [split(r) for r in rs]
        if hs not in rss:
            wrong += 1
        d, n = _closest(hs, rss)
        edits += d
        total += n
    return 100.0 * wrong / max(1, len(hyps)), 100.0 * edits / max(1, total)


def strip_digits(text: str) -> str:
    return _DIGITS.sub("", text)


HIGHER_IS_BETTER = {"seq_acc", "bleu", "chrf"}


def compute(metrics: list[str], hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    need = set(metrics)
    if need & {"wer", "per", "seq_acc"}:
        wer, per = error_rates(hyps, refs)
        out.update(wer=wer, per=per, seq_acc=100.0 - wer)
    if need & {"wer_nostress", "per_nostress"}:
        wer, per = error_rates([strip_digits(h) for h in hyps],
                               [[strip_digits(r) for r in rs] for rs in refs])
        out.update(wer_nostress=wer, per_nostress=per)
    if "cer" in need:
        out["cer"] = error_rates(hyps, refs, unit="char")[1]
    if need & {"bleu", "chrf"}:
        import sacrebleu

        width = max(len(rs) for rs in refs)
        streams = [[rs[i] if i < len(rs) else rs[0] for rs in refs] for i in range(width)]
        if "bleu" in need:
            out["bleu"] = sacrebleu.corpus_bleu(hyps, streams).score
        if "chrf" in need:
            out["chrf"] = sacrebleu.corpus_chrf(hyps, streams).score
    return {m: round(out[m], 4) for m in metrics}


def is_better(metric: str, a: float, b: float | None) -> bool:
    """Is value `a` better than `b` (None = no value yet)?"""
    if b is None:
        return True
    return a > b if metric in HIGHER_IS_BETTER else a < b
