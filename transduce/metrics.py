"""Task metrics over hypotheses and (possibly several) references per source.

- `wer`: word error rate for G2P, % of sources whose output matches none of
  its references (a word is right if it matches any pronunciation).
- `per`: phoneme (token) error rate, edit distance to the closest reference
  over that reference's length, summed over the corpus, in %.
- `*_nostress`: the same with stress digits removed from both sides.
- `seq_acc`: % of outputs equal to a reference; `cer`: character error rate
  against the closest reference; `bleu`, `chrf`: sacrebleu corpus scores.
Lower is better for error rates, higher for the others (`higher_is_better`).

Labelling tasks (encoder-only families), all in %:
- `accuracy`: share of texts given the right label; `macro_f1`: F1 per
  label, averaged with every label weighted equally.
- `token_accuracy`: share of tokens given the right tag.
- `entity_f1`: micro-averaged F1 over entities (CoNLL-2003 `conlleval`):
  spans read from BIO tags (`B-X` begins an X, `I-X` continues one, an
  `I-X` that does not continue an X begins one, `O` is outside); a tag
  without a B-/I- prefix is a one-token entity of that type. An entity is
  right when both its span and its type are.
- `label_f1`: macro-averaged F1 over the tags other than `O`, per token.
- `mlm_accuracy`: share of masked positions predicted right; `mlm_loss`
  (lower is better): mean cross-entropy per masked position.
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


HIGHER_IS_BETTER = {"seq_acc", "bleu", "chrf", "accuracy", "macro_f1", "token_accuracy", "entity_f1", "label_f1",
                    "mlm_accuracy"}


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
    for name, (score, _) in sacrebleu_scores(need, hyps, refs).items():
        out[name] = score
    return {m: round(out[m], 4) for m in metrics}


def sacrebleu_scores(metrics, hyps: list[str], refs: list[list[str]]) -> dict[str, tuple[float, str]]:
    """sacreBLEU's corpus BLEU and chrF (those of `metrics`) on detokenised text, with the signature
    that says how each was computed (references, case, tokenisation, version), as papers report them."""
    wanted = [m for m in ("bleu", "chrf") if m in set(metrics)]
    if not wanted or not hyps:
        return {}
    from sacrebleu.metrics import BLEU, CHRF

    width = max(len(rs) for rs in refs)
    streams = [[rs[i] if i < len(rs) else rs[0] for rs in refs] for i in range(width)]
    out = {}
    for name in wanted:
        scorer = BLEU() if name == "bleu" else CHRF()
        score = scorer.corpus_score(hyps, streams).score
        out[name] = (score, str(scorer.get_signature()))
    return out


def is_better(metric: str, a: float, b: float | None) -> bool:
    """Is value `a` better than `b` (None = no value yet)?"""
    if b is None:
        return True
    return a > b if metric in HIGHER_IS_BETTER else a < b


# ---------------------------------------------------------------------------
# Labelling tasks
# ---------------------------------------------------------------------------

def entities(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) spans of BIO `tags` (see the module docstring)."""
    out, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if tag.startswith("I-") and start is not None and tag[2:] == kind:
            continue
        if start is not None:
            out.add((start, i, kind))
            start, kind = None, None
        if tag.startswith(("B-", "I-")):
            start, kind = i, tag[2:]
        elif tag != "O" and i < len(tags):
            out.add((i, i + 1, tag))
    return out


def _f1(tp: int, fp: int, fn: int) -> float:
    """F1 in %; 100 when there was nothing to find and nothing was found."""
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 100.0


def macro_f1(gold: list[str], pred: list[str], skip: tuple[str, ...] = ()) -> float:
    """F1 of each label (those in `skip` left out), averaged with equal weights."""
    labels = sorted((set(gold) | set(pred)) - set(skip))
    if not labels:
        return 100.0
    scores = []
    for lab in labels:
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / len(scores)


def classification_metrics(metrics: list[str], gold: list[str], pred: list[str]) -> dict[str, float]:
    out = {"accuracy": 100.0 * sum(g == p for g, p in zip(gold, pred, strict=True)) / max(1, len(gold)),
           "macro_f1": macro_f1(gold, pred)}
    return {m: round(out[m], 4) for m in metrics}


def tagging_metrics(metrics: list[str], gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    flat_g = [t for seq in gold for t in seq]
    flat_p = [t for seq in pred for t in seq]
    tp = fp = fn = 0
    for g, p in zip(gold, pred, strict=True):
        ge, pe = entities(g), entities(p)
        tp, fp, fn = tp + len(ge & pe), fp + len(pe - ge), fn + len(ge - pe)
    out = {"token_accuracy": 100.0 * sum(a == b for a, b in zip(flat_g, flat_p, strict=True)) / max(1, len(flat_g)),
           "entity_f1": _f1(tp, fp, fn), "label_f1": macro_f1(flat_g, flat_p, skip=("O",))}
    return {m: round(out[m], 4) for m in metrics}


# ---------------------------------------------------------------------------
# Forecasting
# ---------------------------------------------------------------------------

FORECAST_METRICS = ("mase", "mae", "rmse", "crps", "quantile_loss", "coverage")


def forecast_metrics(metrics: list[str], actual, point, quantiles: dict, mase_scale, crps=None) -> dict:
    """Point and probabilistic scores of forecasts, over every window, step and target column.

    actual, point (W, H, T); quantiles {level: (W, H, T)}; mase_scale (T,) the in-sample
    seasonal-naive mean absolute error of each target on the training series (Hyndman & Koehler
    2006); crps (W, H, T) where the forecast's distribution gives it in closed form, else the
    quantile approximation 2 x mean pinball loss over the levels. `quantile_loss` is that mean
    pinball loss; `coverage` the share of actuals inside the outermost levels' interval (%)."""
    import numpy as np

    actual, point = np.asarray(actual, dtype=np.float64), np.asarray(point, dtype=np.float64)
    err = actual - point
    levels = sorted(quantiles)
    pin = [np.maximum(q * (actual - quantiles[q]), (q - 1) * (actual - quantiles[q])) for q in levels]
    qloss = np.mean(pin, axis=0) if pin else np.zeros_like(actual)
    out = {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
           "mase": float((np.abs(err) / np.asarray(mase_scale, dtype=np.float64)).mean()),
           "quantile_loss": float(qloss.mean()),
           "crps": float(np.mean(crps) if crps is not None else 2 * qloss.mean())}
    if levels:
        inside = (actual >= quantiles[levels[0]]) & (actual <= quantiles[levels[-1]])
        out["coverage"] = 100.0 * float(inside.mean())
    else:
        out["coverage"] = float("nan")
    return {m: round(out[m], 4) for m in metrics}
