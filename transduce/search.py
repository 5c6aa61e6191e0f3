"""Decoding as pure functions over the model's encode/step interface.

`greedy`, `beam_search` and `sample` encode once and then step the decoder one position at a time
with its cache; sources that are finished leave the batch (once they are a
quarter of it, `COMPACT_AT`) so the remaining steps cost less. None knows
which family the model is.
`ForcedPrefix` makes every output start with given tokens (a prompt to
continue) without the searches knowing; `Ensemble` makes several models
decode as one (`SourceReversed` lets a model trained on reversed sources
join); `Bidirectional` decodes with models that write the target in
opposite directions (each proposes its n-best, all score every candidate).

Output lengths: a hypothesis has at most `floor(a * source_length + b)`
tokens before its </s>; at that length </s> is forced.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transduce import kernels
from transduce.config import DecodeConfig
from transduce.controls import Controls, ConstraintTracker, bank_order, check_lengths
from transduce.data.vocab import BOS, EOS, PAD

# Finished sources leave the batch once they are this fraction of its rows: dropping them copies
# the decoder state, so a few finished rows are cheaper to carry along than to drop at once.
COMPACT_AT = 0.25


@dataclass
class Hypothesis:
    tokens: list[int]   # output ids without </s>
    logprob: float      # sum of token log-probabilities, </s> included
    score: float        # logprob / length ** length_penalty (length counts </s>), + coverage penalty
    # with controls (transduce/controls.py): each token's log-probability as search ranked it, </s>'s
    # last (they sum to logprob), and each token's most attended source position
    token_logprobs: list[float] | None = None
    alignment: list[int] | None = None


def max_lengths(src_mask: torch.Tensor, a: float, b: int, model=None) -> torch.Tensor:
    """(B,) most output tokens per source: floor(a * source length + b), at least 1, and no more
    than the model's positions allow (`max_output_len`)."""
    n = (a * src_mask.sum(1).float() + b).floor().long()
    limit = max_lengths_of(model, src_mask)
    if limit is not None:
        n = torch.minimum(n, limit)
    return n.clamp(min=1)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    logp[..., PAD] = float("-inf")
    logp[..., BOS] = float("-inf")
    return logp


@torch.no_grad()
def greedy(model, src: torch.Tensor, src_mask: torch.Tensor, max_len_a: float = 1.5,
           max_len_b: int = 10, length_penalty: float = 0.0) -> list[list[Hypothesis]]:
    """Most probable next token at each step. Returns one hypothesis per source."""
    return _one_path(model, src, src_mask, max_len_a, max_len_b, length_penalty, None)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (N, V) with -inf outside the `top_k` largest (0 = keep all; ties with the k-th stay)
    and outside the nucleus: the most probable tokens whose probabilities, before each, sum to
    less than `top_p` (1.0 = keep all). The most probable token always stays."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(-1)
        before = probs.cumsum(-1) - probs          # mass of the more probable tokens
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(model, src: torch.Tensor, src_mask: torch.Tensor, max_len_a: float = 1.5, max_len_b: int = 10,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, controls: Controls | None = None) -> list[list[Hypothesis]]:
    """One sampled output per source (repeat a source for several samples).

    Each token is drawn from the model's distribution divided by
    `temperature` (0 = always the most probable token, i.e. greedy), cut to
    `top_k` and `top_p` by `filter_logits`. The same `generator` state gives
    the same outputs. Hypothesis log-probabilities are under the model's own
    distribution (temperature 1, no cut), after `controls`' processors
    (constraints, alignments and the coverage penalty need beam search).
    """
    if controls is not None and (controls.has_constraints or controls.needs_attention or controls.alternatives):
        raise ValueError("sampling takes no constraints, alternatives, alignments or coverage penalty; use beam search")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1 "
                         f"(got {temperature}, {top_k}, {top_p})")

    def draw(logp: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return logp.argmax(-1)
        probs = filter_logits(logp / temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return _one_path(model, src, src_mask, max_len_a, max_len_b, 0.0, draw, controls)


def _one_path(model, src, src_mask, max_len_a, max_len_b, length_penalty, pick,
              controls: Controls | None = None) -> list[list[Hypothesis]]:
    """One hypothesis per source, the next token chosen by `pick(logp (rows, V)) -> (rows,)`, or
    (None) the most probable: then a step's bookkeeping is one call of the kernels' `greedy_pick`
    where they apply (with decoding workers on threads, each small op of a step waits for the
    interpreter lock behind the other workers: 18 of them per step took a fifth of the step)."""
    b = src.shape[0]
    max_len = max_lengths(src_mask, max_len_a, max_len_b, model)
    ctl = controls if controls is not None and controls.active else None
    if ctl is not None:
        check_lengths(ctl, max_len)
        prefix, _ = ctl.prefix_table(b)
    memory = model.encode(src, src_mask)
    state = model.init_state(memory, 1, int(max_len.max()) + 1)
    tok_lp = torch.zeros(b, 0)                    # with controls: each token's log-probability
    alive = torch.arange(b)                       # original index of each row
    stop = max_len.clone()                        # each row's last step
    live = torch.ones(b, dtype=torch.bool)        # rows still decoding (finished ones wait to be dropped)
    last = torch.full((b,), BOS, dtype=torch.long)
    tokens = torch.zeros(b, 0, dtype=torch.long)  # (rows, t)
    logprob = torch.zeros(b)
    out: list[list[Hypothesis]] = [[] for _ in range(b)]
    ops = kernels.ops() if pick is None and ctl is None else None
    for t in range(int(max_len.max()) + 1):
        logits, state = model.step(last, state)
        if (ops is not None and logits.device.type == "cpu" and logits.dtype == torch.float32
                and logits.dim() == 2 and logits.stride(1) == 1):
            best, rows, n_live = ops.greedy_pick(logits, stop, t, live, logprob, PAD, BOS, EOS)
        else:
            logp = _log_probs(logits)                  # (rows, V)
            if ctl is not None:
                logp = ctl.process(logp, tokens, t, prefix[alive, t] if t < prefix.shape[1] else None)
            best = logp.argmax(-1) if pick is None else pick(logp)
            best[stop == t] = EOS
            picked = logp.gather(1, best[:, None])
            logprob = logprob + picked[:, 0]
            if ctl is not None:
                tok_lp = torch.cat([tok_lp, picked], 1)
            done = (best == EOS) & live
            rows = done.nonzero()[:, 0]
            live &= ~done
            n_live = int(live.sum())
        if rows.numel():  # as Python lists once, not an indexing op per row
            n = tokens.shape[1] + 1
            lps = tok_lp[rows].tolist() if ctl is not None else [None] * rows.numel()
            for src_i, toks, lp, tl in zip(alive[rows].tolist(), tokens[rows].tolist(), logprob[rows].tolist(), lps):
                out[src_i] = [Hypothesis(toks, lp, lp / n ** length_penalty, tl)]
        tokens = torch.cat([tokens, best[:, None]], 1)
        if n_live == 0:
            break
        if n_live <= (1.0 - COMPACT_AT) * live.numel():
            keep = live.nonzero()[:, 0]
            alive, tokens, logprob, best, live, stop = (alive[keep], tokens[keep], logprob[keep], best[keep],
                                                        live[keep], stop[keep])
            tok_lp = tok_lp[keep]
            state = model.reorder_state(state, keep, keep)
        last = best
    return out


@torch.no_grad()
def beam_search(model, src: torch.Tensor, src_mask: torch.Tensor, beam: int = 5, nbest: int = 1,
                length_penalty: float = 1.0, max_len_a: float = 1.5, max_len_b: int = 10,
                controls: Controls | None = None) -> list[list[Hypothesis]]:
    """Batched beam search; returns the `nbest` best hypotheses per source, best first.

    Per step, the top 2*beam continuations are ranked; a </s> among the first
    `beam` ranks finishes a hypothesis, and the first `beam` others stay
    alive. A source is done when it has `beam` finished hypotheses, or has
    `nbest` and no alive one can still beat them (exact when
    length_penalty == 0, since log-probabilities only fall).

    `controls` (transduce/controls.py) change the step's log-probabilities before ranking (forced
    prefix tokens, logit processors), and with constraints the ranking: the candidates are the top
    2*beam, every token that advances a hypothesis through its constraints and each beam's best,
    placed by dynamic beam allocation (`controls.bank_order`), and </s> is impossible until every
    constraint is met.
    """
    if nbest > beam:
        raise ValueError(f"nbest={nbest} cannot exceed beam={beam}")
    b, k = src.shape[0], beam
    max_len = max_lengths(src_mask, max_len_a, max_len_b, model)
    steps = int(max_len.max()) + 1
    ctl = controls if controls is not None and controls.active else None
    if ctl is not None:
        check_lengths(ctl, max_len)
        prefix, prefix_len = ctl.prefix_table(b)
        tracker = ConstraintTracker(ctl.constraints, k, ctl.ordered) if ctl.has_constraints else None
    memory = model.encode(src, src_mask)
    state = model.init_state(memory, k, steps, **_recording(model, ctl))
    tok_lp = torch.zeros(b, k, 0)                 # with controls: per hypothesis, each token's log-probability
    align = torch.zeros(b, k, 0, dtype=torch.long)  # and its most attended source position
    coverage = torch.zeros(b, k, src.shape[1])    # and the attention each source position got
    alive = torch.arange(b)
    live = torch.ones(b, dtype=torch.bool)        # sources still searching (done ones wait to be dropped)
    scores = torch.full((b, k), float("-inf"))
    scores[:, 0] = 0.0                            # only the first beam is live at the start
    hist = torch.zeros(b, k, 0, dtype=torch.long)
    last = torch.full((b * k,), BOS, dtype=torch.long)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    n_finished = [0] * b                         # per source
    nth_score = [float("-inf")] * b              # score of its nbest-th finished hypothesis
    ops = kernels.ops() if ctl is None else None
    stop = max_len.clone()                        # each source's last step
    count = torch.zeros(b, dtype=torch.long)      # the kernel's n_finished and finished scores
    best = torch.full((b, k), float("-inf"))
    for t in range(steps):
        logits, state = model.step(last, state)
        n_rows = alive.numel()
        if (ops is not None and logits.device.type == "cpu" and logits.dtype == torch.float32
                and logits.dim() == 2 and logits.stride(1) == 1):
            # the step's ranking and bookkeeping in one call (see _one_path: with decoding workers on
            # threads, each small op waits for the interpreter lock behind the other workers)
            scores, new_tok, rows, ended, raw, n_live = ops.beam_advance(
                logits, scores, stop, t, live, count, best, nbest, float(length_penalty), PAD, BOS, EOS)
            if ended.numel():
                length = t + 1
                e_i, e_b = ended[:, 0], ended[:, 1]
                for score, toks, src_i in zip(raw.tolist(), hist[e_i, e_b].tolist(), alive[e_i].tolist()):
                    f = finished[src_i]
                    f.append(Hypothesis(toks, score, score / length ** length_penalty))
                    f.sort(key=lambda h: -h.score)
                    del f[k:]
            if n_live == 0:
                break
            new_beam = rows.view(n_rows, k) - torch.arange(n_rows)[:, None] * k
            hist = torch.cat([hist.gather(1, new_beam[:, :, None].expand(-1, -1, t)), new_tok[:, :, None]], 2)
            keep = None
            if n_live <= (1.0 - COMPACT_AT) * n_rows:
                keep = live.nonzero()[:, 0]
                rows = rows.view(n_rows, k)[keep].view(-1)
                alive, scores, hist, new_tok, live = alive[keep], scores[keep], hist[keep], new_tok[keep], live[keep]
                stop, count, best = stop[keep], count[keep], best[keep]
            state = model.reorder_state(state, rows, keep)
            last = new_tok.reshape(-1)
            continue
        logp = _log_probs(logits)                  # (b * K, V)
        att = None
        if ctl is not None:
            forced = prefix[alive, t].repeat_interleave(k) if t < prefix.shape[1] else None
            logp = ctl.process(logp, hist.reshape(n_rows * k, t), t, forced)
            att = _step_attention(state, ctl)      # (b * K, S) or None
        logp = logp.view(n_rows, k, -1)            # (b, K, V)
        vocab = logp.shape[-1]
        at_max = max_len[alive] == t
        if at_max.any():
            forced = torch.full_like(logp[at_max], float("-inf"))
            forced[..., EOS] = logp[at_max][..., EOS]
            logp[at_max] = forced
        if ctl is not None and tracker is not None:
            logp[..., EOS] = logp[..., EOS].masked_fill(~tracker.can_end(), float("-inf"))
        cand = (scores[:, :, None] + logp).view(n_rows, -1)
        n_cand = min(2 * k, cand.shape[1])
        top, idx = cand.topk(n_cand, dim=1)        # (b, 2K), best first
        beam_of, tok = idx // vocab, idx % vocab
        if ctl is not None and tracker is not None:
            top, beam_of, tok, cand_state = _allocate(tracker, alive, cand.view(n_rows, k, vocab), top, beam_of, tok)
            n_cand = top.shape[1]
        finite = torch.isfinite(top)
        rank = torch.arange(n_cand)[None, :]
        ends = (tok == EOS) & finite & (rank < k) & live[:, None]
        length = t + 1                             # tokens including </s>
        ended = ends.nonzero()
        if ended.numel():  # the ended ones' scores and tokens as Python lists once, not an op per hypothesis
            e_i, e_r = ended[:, 0], ended[:, 1]
            e_b = beam_of[e_i, e_r]
            extra = _ended_extras(ctl, scores, top, tok_lp, align, coverage, att, src_mask, alive, e_i, e_r, e_b, k)
            for j, (raw, toks, src_i) in enumerate(zip(top[e_i, e_r].tolist(), hist[e_i, e_b].tolist(),
                                                       alive[e_i].tolist())):
                hyp = Hypothesis(toks, raw, raw / length ** length_penalty)
                if extra is not None:
                    hyp.token_logprobs, hyp.alignment = extra[0][j], extra[1][j]
                    hyp.score += extra[2][j]
                f = finished[src_i]
                f.append(hyp)
                f.sort(key=lambda h: -h.score)
                del f[k:]
                n_finished[src_i] = len(f)
                if len(f) >= nbest:
                    nth_score[src_i] = f[nbest - 1].score
        # First K candidates that do not end: they stay alive, in rank order.
        cont = (tok != EOS) & finite
        order = torch.argsort((~cont).long() * n_cand + rank, dim=1)[:, :k]
        scores = top.gather(1, order).masked_fill(~cont.gather(1, order), float("-inf"))
        new_beam, new_tok = beam_of.gather(1, order), tok.gather(1, order)
        hist = torch.cat([hist.gather(1, new_beam[:, :, None].expand(-1, -1, t)), new_tok[:, :, None]], 2)
        if ctl is not None:
            tok_lp, align, coverage = _follow(tok_lp, align, coverage, att, logp, new_beam, new_tok, n_rows, k, t)
            if tracker is not None:
                tracker.take(cand_state, order)
        # Which sources are done?
        # best alive, ending next step (under constraints the first alive is its bank's best, not the best)
        best_alive = scores.max(1).values if ctl is not None and tracker is not None else scores[:, 0]
        bound = best_alive / (length + 1) ** length_penalty
        count, nth = torch.tensor(n_finished)[alive], torch.tensor(nth_score)[alive]
        done = ~torch.isfinite(best_alive) | (count >= k) | ((count >= nbest) & (bound <= nth))
        live &= ~done
        n_live = int(live.sum())
        if n_live == 0:
            break
        rows = (new_beam + torch.arange(n_rows)[:, None] * k).view(-1)
        keep = None
        if n_live <= (1.0 - COMPACT_AT) * n_rows:
            keep = live.nonzero()[:, 0]
            rows = rows.view(n_rows, k)[keep].view(-1)
            alive, scores, hist, new_tok, live = alive[keep], scores[keep], hist[keep], new_tok[keep], live[keep]
            tok_lp, align, coverage = tok_lp[keep], align[keep], coverage[keep]
            if ctl is not None and tracker is not None:
                tracker.keep(keep)
        state = model.reorder_state(state, rows, keep)
        last = new_tok.reshape(-1)
    return [f[:nbest] for f in finished]


def _recording(model, ctl: Controls | None) -> dict:
    """init_state's keywords: cross-attention recorded where the controls read it."""
    return {"record_attention": True} if ctl is not None and ctl.needs_attention else {}


def _step_attention(state, ctl: Controls) -> torch.Tensor | None:
    """(rows, S) the cross-attention of the step just taken (the last decoder layer's, the mean of
    its heads), or None where the controls do not need it. The state keeps no history of it."""
    if not ctl.needs_attention:
        return None
    steps = getattr(state, "attention", None)
    if not steps or steps[-1][-1] is None:
        raise ValueError("alignments, --replace-unk and the coverage penalty need a model with cross-attention "
                         "(a Transformer or an RNN with attention)")
    att = steps[-1][-1].float().mean(1)            # (rows, H, S) -> (rows, S)
    steps.clear()
    return att


def _allocate(tracker: ConstraintTracker, alive, cand, top, beam_of, tok):
    """The step's candidates under constraints, in dynamic beam allocation's order: the top 2K
    (`top`, `beam_of`, `tok`), each beam's tokens that advance its constraints and each beam's best;
    duplicates once. Returns (scores, beams, tokens, constraint state) of the candidates, placed."""
    n, k, vocab = cand.shape
    nxt = tracker.next_tokens(alive)                                   # (n, K, P + 1)
    best = cand.argmax(-1, keepdim=True)                               # (n, K, 1)
    extra_tok = torch.cat([nxt, best], 2)                              # (n, K, E)
    extra_beam = torch.arange(k)[None, :, None].expand_as(extra_tok)
    extra_score = cand.gather(2, extra_tok.clamp(min=0)).masked_fill(extra_tok < 0, float("-inf"))
    score = torch.cat([top, extra_score.reshape(n, -1)], 1)
    beam_of = torch.cat([beam_of, extra_beam.reshape(n, -1)], 1)
    tok = torch.cat([tok, extra_tok.reshape(n, -1).clamp(min=0)], 1)
    key = beam_of * vocab + tok                                        # a candidate's identity
    sorted_key, by_key = key.sort(dim=1, stable=True)
    dup = torch.zeros_like(sorted_key, dtype=torch.bool)
    dup[:, 1:] = sorted_key[:, 1:] == sorted_key[:, :-1]
    score = score.masked_fill(torch.zeros_like(dup).scatter_(1, by_key, dup), float("-inf"))
    cand_state, bank = tracker.advance(alive, beam_of, tok)
    place = bank_order(score, bank, tracker.n_banks)
    order = place.argsort(dim=1, stable=True)
    met, phrase, pos = cand_state
    cand_state = (met.gather(1, order[:, :, None].expand(-1, -1, met.shape[2])), phrase.gather(1, order),
                  pos.gather(1, order))
    return score.gather(1, order), beam_of.gather(1, order), tok.gather(1, order), cand_state


def _follow(tok_lp, align, coverage, att, logp, new_beam, new_tok, n_rows: int, k: int, t: int):
    """Per-hypothesis histories after a beam selection: each token's log-probability, source
    position and the coverage, following the kept hypotheses' parents."""
    lp = logp.gather(1, new_beam[:, :, None].expand(-1, -1, logp.shape[2])).gather(2, new_tok[:, :, None])
    tok_lp = torch.cat([tok_lp.gather(1, new_beam[:, :, None].expand(-1, -1, t)), lp], 2)
    if att is None:
        return tok_lp, align, coverage
    att = att.view(n_rows, k, -1)
    coverage = (coverage + att).gather(1, new_beam[:, :, None].expand(-1, -1, att.shape[2]))
    pos = att.argmax(-1).gather(1, new_beam)
    align = torch.cat([align.gather(1, new_beam[:, :, None].expand(-1, -1, t)), pos[:, :, None]], 2)
    return tok_lp, align, coverage


def _ended_extras(ctl, scores, top, tok_lp, align, coverage, att, src_mask, alive, e_i, e_r, e_b, k):
    """For hypotheses ending now (rows e_i, candidates e_r of beams e_b): their token log-probabilities
    (</s>'s last), alignments and coverage penalties as lists, or None without controls."""
    if ctl is None:
        return None
    eos_lp = top[e_i, e_r] - scores[e_i, e_b]
    lps = torch.cat([tok_lp[e_i, e_b], eos_lp[:, None]], 1).tolist()
    aligned = align[e_i, e_b].tolist() if ctl.alignments else [None] * len(lps)
    penalty = [0.0] * len(lps)
    if ctl.coverage_penalty > 0 and att is not None:
        cov = coverage[e_i, e_b] + att.view(-1, k, att.shape[1])[e_i, e_b]            # (E, S)
        mask = src_mask[alive[e_i]]
        logs = cov.clamp(min=1e-9, max=1.0).log().masked_fill(~mask, 0.0).sum(1)
        penalty = (ctl.coverage_penalty * logs).tolist()
    return lps, aligned, penalty


def search(model, src: torch.Tensor, src_mask: torch.Tensor, cfg: DecodeConfig,
           beam: int | None = None, nbest: int | None = None,
           controls: Controls | None = None) -> list[list[Hypothesis]]:
    """Greedy for beam 1 with one hypothesis, beam search otherwise (also for beam 1 under
    `controls`: the same outputs, one step body for every control)."""
    beam = cfg.beam if beam is None else beam
    nbest = cfg.nbest if nbest is None else nbest
    ctl = controls if controls is not None and controls.active else None
    if isinstance(model, Bidirectional):
        if ctl is not None:
            raise ValueError("decoding controls need models of one direction (not a bidirectional ensemble)")
        return bidirectional_search(model, src, src_mask, cfg, beam, nbest)
    if ctl is not None and ctl.alternatives:
        return alternatives(model, src, src_mask, cfg, beam, ctl)
    if beam == 1 and nbest == 1 and ctl is None:
        return greedy(model, src, src_mask, cfg.max_len_a, cfg.max_len_b, cfg.length_penalty)
    return beam_search(model, src, src_mask, beam, nbest, cfg.length_penalty, cfg.max_len_a, cfg.max_len_b, ctl)


@torch.no_grad()
def next_token_logprobs(model, src: torch.Tensor, src_mask: torch.Tensor, prefixes: list[list[int]]
                        ) -> torch.Tensor:
    """(B, V) the model's log-probabilities of the token after each source's prefix."""
    b, width = src.shape[0], max(map(len, prefixes))
    memory = model.encode(src, src_mask)
    state = model.init_state(memory, 1, width + 1)
    table = torch.full((b, width + 1), BOS, dtype=torch.long)  # <s> then the prefix; after it, anything
    for i, p in enumerate(prefixes):
        table[i, 1: len(p) + 1] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prefixes])
    out = None
    for t in range(width + 1):
        logits, state = model.step(table[:, t], state)
        logp = _log_probs(logits)
        out = logp if out is None else torch.where((lengths == t)[:, None], logp, out)
    return out


def alternatives(model, src: torch.Tensor, src_mask: torch.Tensor, cfg: DecodeConfig, beam: int,
                 ctl: Controls) -> list[list[Hypothesis]]:
    """Per source, `ctl.alternatives` hypotheses: the most probable tokens after its prefix (under the
    controls' processors), most probable first, each continued by the search (`beam` wide)."""
    b, n = src.shape[0], ctl.alternatives
    prefixes = ctl.prefixes or [[] for _ in range(b)]
    first = next_token_logprobs(model, src, src_mask, prefixes)
    hist = [torch.tensor(p, dtype=torch.long) for p in prefixes]
    rows = []
    for i in range(b):  # the processors see each source's prefix as its history
        rows.append(ctl.process(first[i: i + 1], hist[i][None, :], len(prefixes[i]), None)[0])
    first = torch.stack(rows)
    first[:, EOS] = float("-inf")                  # an alternative is a token, not the end
    n = min(n, first.shape[1])
    top = first.topk(n, dim=1)
    picks = [[(tok, lp) for tok, lp in zip(ts, ls) if math.isfinite(lp)]
             for ts, ls in zip(top.indices.tolist(), top.values.tolist())]
    idx = [i for i in range(b) for _ in picks[i]]
    longer = [prefixes[i] + [tok] for i in range(b) for tok, _ in picks[i]]
    out: list[list[Hypothesis]] = [[] for _ in range(b)]
    if not idx:
        return out
    sub = dataclasses.replace(ctl, prefixes=longer, alternatives=0)
    sel = torch.tensor(idx)
    found = beam_search(model, src[sel], src_mask[sel], beam, 1, cfg.length_penalty, cfg.max_len_a,
                        cfg.max_len_b, sub)
    for i, hyps in zip(idx, found):
        out[i].extend(hyps[:1])
    return out


class ForcedPrefix:
    """The model, seen by search as if every output started with `prefix` (a prompt to continue).

    Search feeds <s> first; the first `step` of each search feeds <s> and the
    prefix instead, and returns the logits after the last prefix token.
    Hypotheses hold what follows the prefix; their log-probabilities are
    conditional on it. Lengths limit what follows the prefix.
    """

    def __init__(self, model, prefix: list[int]):
        self.model = model
        self.prefix = list(prefix)
        self.config = getattr(model, "config", None)
        self._fresh = False

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor):
        return self.model.encode(src, src_mask)

    def init_state(self, memory, beam: int, max_len: int, record_attention: bool = False):
        self._fresh = True
        return self.model.init_state(memory, beam, max_len + len(self.prefix), record_attention)

    def step(self, tokens: torch.Tensor, state):
        if self._fresh:
            self._fresh = False
            for tok in self.prefix:   # tokens are <s> here
                _, state = self.model.step(tokens, state)
                tokens = torch.full_like(tokens, tok)
        return self.model.step(tokens, state)

    def reorder_state(self, state, rows: torch.Tensor | None, batch: torch.Tensor | None = None):
        return self.model.reorder_state(state, rows, batch)

    def max_output_len(self, src_mask: torch.Tensor) -> torch.Tensor | None:
        limit = self.model.max_output_len(src_mask)
        return None if limit is None else limit - len(self.prefix)


class Ensemble:
    """Several models, seen by search as one whose next-token distribution is the mean of theirs.

    Each member encodes the source and keeps its own decoder state; per step the members'
    probabilities are averaged (log-sum-exp of their log-probabilities, minus log N), and the
    mixture's log-probabilities are returned as the logits. Members may be of different families
    but must share the source and target vocabularies (checked where runs are loaded,
    `inference.ensemble`). Output lengths are capped by the tightest member.
    """

    def __init__(self, models: list):
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = list(models)
        self.can_decode = all(getattr(m, "can_decode", True) for m in self.models)
        self._log_n = math.log(len(self.models))

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> list:
        return [m.encode(src, src_mask) for m in self.models]

    def init_state(self, memory: list, beam: int, max_len: int, record_attention: bool = False) -> list:
        if record_attention:
            raise ValueError("an ensemble has no single cross-attention to record; decode with one model")
        return [m.init_state(mem, beam, max_len) for m, mem in zip(self.models, memory)]

    def step(self, tokens: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        logps, states = [], []
        for m, s in zip(self.models, state):
            logits, s = m.step(tokens, s)
            logps.append(F.log_softmax(logits.float(), dim=-1))
            states.append(s)
        if len(logps) == 1:
            return logps[0], states
        return torch.logsumexp(torch.stack(logps), dim=0) - self._log_n, states

    def reorder_state(self, state: list, rows: torch.Tensor | None, batch: torch.Tensor | None = None) -> list:
        return [m.reorder_state(s, rows, batch) for m, s in zip(self.models, state)]

    def forward(self, batch) -> torch.Tensor:
        """(B, T, V) the mixture's log-probabilities under teacher forcing (valid logits)."""
        logps = [F.log_softmax(m(batch).float(), dim=-1) for m in self.models]
        if len(logps) == 1:
            return logps[0]
        return torch.logsumexp(torch.stack(logps), dim=0) - self._log_n

    __call__ = forward

    def max_output_len(self, src_mask: torch.Tensor) -> torch.Tensor | None:
        limits = [lim for m in self.models if (lim := max_lengths_of(m, src_mask)) is not None]
        if not limits:
            return None
        return torch.stack(limits).amin(0)


def max_lengths_of(model, src_mask: torch.Tensor) -> torch.Tensor | None:
    """The model's `max_output_len`, or None where it has none."""
    return getattr(model, "max_output_len", lambda m: None)(src_mask)


class SourceReversed:
    """The model, seen by search as if it read its sources in reading order, when it was trained on
    sources reversed (`data.source_tokenizer.reverse`): what a run whose source codec is not
    reversed encodes is turned around, row by row, before the model sees it (padding stays at the
    end). Lets such a run join an ensemble of runs that read sources the other way."""

    def __init__(self, model):
        self.model = model
        self.can_decode = getattr(model, "can_decode", True)
        self.config = getattr(model, "config", None)

    @staticmethod
    def flip(src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) each row's real tokens in reverse order, padding after them."""
        n = src_mask.sum(1, keepdim=True)                                # (B, 1)
        j = torch.arange(src.shape[1])[None, :]                          # (1, S)
        return src.gather(1, torch.where(j < n, n - 1 - j, j))

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor):
        return self.model.encode(self.flip(src, src_mask), src_mask)

    def init_state(self, memory, beam: int, max_len: int, record_attention: bool = False):
        return self.model.init_state(memory, beam, max_len, record_attention)

    def step(self, tokens: torch.Tensor, state):
        return self.model.step(tokens, state)

    def reorder_state(self, state, rows: torch.Tensor | None, batch: torch.Tensor | None = None):
        return self.model.reorder_state(state, rows, batch)

    def max_output_len(self, src_mask: torch.Tensor) -> torch.Tensor | None:
        return max_lengths_of(self.model, src_mask)

    def forward(self, batch):
        import dataclasses

        return self.model(dataclasses.replace(batch, src=self.flip(batch.src, batch.src_mask)))

    __call__ = forward


class Bidirectional:
    """Models that write the target in opposite directions, decoded together by n-best rescoring.

    `directions` is a list of (model, reverse): a model (or an `Ensemble` of models of one
    direction) and whether its target ids run last symbol first (`TextCodec.reverse`). Each
    direction's search proposes its n-best; every proposal, in reading order, is scored by every
    direction under teacher forcing (its log-probability, </s> included), and ranked by the mean of
    those log-probabilities over the length to the power `length_penalty` (Liu et al. 2016's
    agreement of left-to-right and right-to-left decoders, as n-best reranking). `out_reverse`:
    the direction the outputs' ids are returned in (that of the codec that decodes them).
    """

    can_decode = True

    def __init__(self, directions: list[tuple[object, bool]], out_reverse: bool = False):
        if len(directions) < 2:
            raise ValueError("Bidirectional needs models of at least two directions")
        self.directions = list(directions)
        self.out_reverse = out_reverse

    def forward(self, batch):
        raise ValueError("models of opposite directions have no common next-token distribution (no "
                         "perplexity); score them one direction at a time")

    __call__ = forward


@torch.no_grad()
def sequence_logprobs(model, src: torch.Tensor, src_mask: torch.Tensor, rows: torch.Tensor,
                      outputs: list[list[int]]) -> torch.Tensor:
    """(N,) log-probability of each output (ids without </s>; </s> is scored) given the source of
    `rows[i]`, under teacher forcing: `model(batch)` of (source, output) pairs."""
    from transduce.data.pipeline import Batch, pad

    tgt_in = pad([[BOS] + o for o in outputs])
    labels = pad([o + [EOS] for o in outputs])
    batch = Batch(src[rows], src_mask[rows], tgt_in, labels)
    logp = F.log_softmax(model(batch).float(), dim=-1)                        # (N, T, V)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]           # (N, T)
    return picked.masked_fill(labels == PAD, 0.0).sum(1)


@torch.no_grad()
def bidirectional_search(model: Bidirectional, src: torch.Tensor, src_mask: torch.Tensor, cfg: DecodeConfig,
                         beam: int, nbest: int) -> list[list[Hypothesis]]:
    """The `nbest` best of the directions' proposals (each direction: `beam` wide, its `beam`-best;
    greedy where beam is 1), rescored by all directions (see `Bidirectional`)."""
    b, k = src.shape[0], len(model.directions)
    # reading-order ids -> each direction's log-probability (NaN: not scored yet), first seen first
    proposals: list[dict[tuple, list[float]]] = [{} for _ in range(b)]
    for d, (m, reverse) in enumerate(model.directions):
        found = search(m, src, src_mask, cfg, beam, beam) if beam > 1 else search(m, src, src_mask, cfg, 1, 1)
        for i, hyps in enumerate(found):
            for h in hyps:
                scores = proposals[i].setdefault(tuple(reversed(h.tokens)) if reverse else tuple(h.tokens),
                                                 [math.nan] * k)
                scores[d] = h.logprob  # what the search found is its teacher-forced log-probability
    rows = torch.tensor([i for i in range(b) for _ in proposals[i]], dtype=torch.long)
    outputs = [list(o) for i in range(b) for o in proposals[i]]
    scores = torch.tensor([s for i in range(b) for s in proposals[i].values()], dtype=torch.float32).view(-1, k)
    for d, (m, reverse) in enumerate(model.directions):
        todo = scores[:, d].isnan().nonzero()[:, 0]  # the other directions' proposals
        if len(todo):
            these = [outputs[j] for j in todo.tolist()]
            scores[todo, d] = sequence_logprobs(m, src, src_mask, rows[todo],
                                                [o[::-1] for o in these] if reverse else these)
    mean = scores.mean(1)
    out: list[list[Hypothesis]] = [[] for _ in range(b)]
    for r, o, lp in zip(rows.tolist(), outputs, mean.tolist()):
        tokens = o[::-1] if model.out_reverse else o
        out[r].append(Hypothesis(tokens, lp, lp / (len(o) + 1) ** cfg.length_penalty))
    for hyps in out:
        hyps.sort(key=lambda h: -h.score)
        del hyps[nbest:]
    return out
