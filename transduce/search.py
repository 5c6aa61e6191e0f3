"""Decoding as pure functions over the model's encode/step interface.

Both searches encode once and then step the decoder one position at a time
with its cache; sources that are finished are dropped from the batch so the
remaining steps cost less. Neither knows which family the model is.

Output lengths: a hypothesis has at most `floor(a * source_length + b)`
tokens before its </s>; at that length </s> is forced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transduce.data.vocab import BOS, EOS, PAD
from transduce.config import DecodeConfig


@dataclass
class Hypothesis:
    tokens: list[int]   # output ids without </s>
    logprob: float      # sum of token log-probabilities, </s> included
    score: float        # logprob / length ** length_penalty (length counts </s>)


def max_lengths(src_mask: torch.Tensor, a: float, b: int) -> torch.Tensor:
    return (a * src_mask.sum(1).float() + b).floor().long().clamp(min=1)  # (B,)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    logp[..., PAD] = float("-inf")
    logp[..., BOS] = float("-inf")
    return logp


@torch.no_grad()
def greedy(model, src: torch.Tensor, src_mask: torch.Tensor, max_len_a: float = 1.5,
           max_len_b: int = 10, length_penalty: float = 0.0) -> list[list[Hypothesis]]:
    """Most probable next token at each step. Returns one hypothesis per source."""
    b = src.shape[0]
    max_len = max_lengths(src_mask, max_len_a, max_len_b)
    memory = model.encode(src, src_mask)
    state = model.init_state(memory, 1, int(max_len.max()) + 1)
    alive = torch.arange(b)                       # original index of each row
    last = torch.full((b,), BOS, dtype=torch.long)
    tokens = torch.zeros(b, 0, dtype=torch.long)  # (rows, t)
    logprob = torch.zeros(b)
    out: list[list[Hypothesis]] = [[] for _ in range(b)]
    for t in range(int(max_len.max()) + 1):
        logits, state = model.step(last, state)
        logp = _log_probs(logits)                  # (rows, V)
        at_max = max_len[alive] == t
        best = logp.argmax(-1)
        best[at_max] = EOS
        logprob = logprob + logp.gather(1, best[:, None])[:, 0]
        done = best == EOS
        for r in done.nonzero()[:, 0].tolist():
            n = tokens.shape[1] + 1
            lp = float(logprob[r])
            out[int(alive[r])] = [Hypothesis(tokens[r].tolist(), lp, lp / n ** length_penalty)]
        tokens = torch.cat([tokens, best[:, None]], 1)
        if done.any():
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            alive, tokens, logprob, best = alive[keep], tokens[keep], logprob[keep], best[keep]
            state = model.reorder_state(state, keep, keep)
        last = best
    return out


@torch.no_grad()
def beam_search(model, src: torch.Tensor, src_mask: torch.Tensor, beam: int = 5, nbest: int = 1,
                length_penalty: float = 1.0, max_len_a: float = 1.5, max_len_b: int = 10
                ) -> list[list[Hypothesis]]:
    """Batched beam search; returns the `nbest` best hypotheses per source, best first.

    Per step, the top 2*beam continuations are ranked; a </s> among the first
    `beam` ranks finishes a hypothesis, and the first `beam` others stay
    alive. A source is done when it has `beam` finished hypotheses, or has
    `nbest` and no alive one can still beat them (exact when
    length_penalty == 0, since log-probabilities only fall).
    """
    if nbest > beam:
        raise ValueError(f"nbest={nbest} cannot exceed beam={beam}")
    b, k = src.shape[0], beam
    max_len = max_lengths(src_mask, max_len_a, max_len_b)
    steps = int(max_len.max()) + 1
    memory = model.encode(src, src_mask)
    state = model.init_state(memory, k, steps)
    alive = torch.arange(b)
    scores = torch.full((b, k), float("-inf"))
    scores[:, 0] = 0.0                            # only the first beam is live at the start
    hist = torch.zeros(b, k, 0, dtype=torch.long)
    last = torch.full((b * k,), BOS, dtype=torch.long)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    for t in range(steps):
        logits, state = model.step(last, state)
        n_rows = alive.numel()
        logp = _log_probs(logits).view(n_rows, k, -1)  # (b, K, V)
        vocab = logp.shape[-1]
        at_max = max_len[alive] == t
        if at_max.any():
            forced = torch.full_like(logp[at_max], float("-inf"))
            forced[..., EOS] = logp[at_max][..., EOS]
            logp[at_max] = forced
        cand = (scores[:, :, None] + logp).view(n_rows, -1)
        n_cand = min(2 * k, cand.shape[1])
        top, idx = cand.topk(n_cand, dim=1)        # (b, 2K), best first
        beam_of, tok = idx // vocab, idx % vocab
        finite = torch.isfinite(top)
        rank = torch.arange(n_cand)[None, :]
        ends = (tok == EOS) & finite & (rank < k)
        length = t + 1                             # tokens including </s>
        for i, r in ends.nonzero().tolist():
            raw = float(top[i, r])
            hyp = Hypothesis(hist[i, beam_of[i, r]].tolist(), raw, raw / length ** length_penalty)
            f = finished[int(alive[i])]
            f.append(hyp)
            f.sort(key=lambda h: -h.score)
            del f[k:]
        # First K candidates that do not end: they stay alive, in rank order.
        cont = (tok != EOS) & finite
        order = torch.argsort((~cont).long() * n_cand + rank, dim=1)[:, :k]
        scores = top.gather(1, order).masked_fill(~cont.gather(1, order), float("-inf"))
        new_beam, new_tok = beam_of.gather(1, order), tok.gather(1, order)
        hist = torch.cat([hist.gather(1, new_beam[:, :, None].expand(-1, -1, t)), new_tok[:, :, None]], 2)
        # Which sources are done?
        bound = scores[:, 0] / (length + 1) ** length_penalty  # best alive, ending next step
        done = []
        for i in range(n_rows):
            f = finished[int(alive[i])]
            if not torch.isfinite(scores[i, 0]) or len(f) >= k or (
                    len(f) >= nbest and float(bound[i]) <= f[nbest - 1].score):
                done.append(i)
        rows = (new_beam + torch.arange(n_rows)[:, None] * k).view(-1)
        keep = None
        if done:
            keep_mask = torch.ones(n_rows, dtype=torch.bool)
            keep_mask[done] = False
            keep = keep_mask.nonzero()[:, 0]
            if keep.numel() == 0:
                break
            rows = rows.view(n_rows, k)[keep].view(-1)
            alive, scores, hist, new_tok = alive[keep], scores[keep], hist[keep], new_tok[keep]
        state = model.reorder_state(state, rows, keep)
        last = new_tok.reshape(-1)
    return [f[:nbest] for f in finished]


def search(model, src: torch.Tensor, src_mask: torch.Tensor, cfg: DecodeConfig,
           beam: int | None = None, nbest: int | None = None) -> list[list[Hypothesis]]:
    """Greedy for beam 1 with one hypothesis, beam search otherwise."""
    beam = cfg.beam if beam is None else beam
    nbest = cfg.nbest if nbest is None else nbest
    if beam == 1 and nbest == 1:
        return greedy(model, src, src_mask, cfg.max_len_a, cfg.max_len_b, cfg.length_penalty)
    return beam_search(model, src, src_mask, beam, nbest, cfg.length_penalty, cfg.max_len_a, cfg.max_len_b)
