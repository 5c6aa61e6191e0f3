"""Decoding controls: what search lets a user impose on the output besides the model's preferences.

Logit processors are small pure functions of one step's log-probabilities (rows, V) and the tokens
each row has written so far (rows, t): minimum length, no-repeat n-grams, repetition penalty,
banned phrases, an end-of-sequence bonus. `Controls` gathers them with the per-input settings (a
target prefix to force, lexical constraints) for `search`; `ConstraintTracker` follows each
hypothesis's progress through its constraints (Post & Vilar 2018's banks). `controls_for` turns the
text of `DecodeConfig` and per-input files into ids, naming any symbol the vocabulary lacks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from transduce.data.vocab import EOS, UNK

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------
# Logit processors: (logp (rows, V), hist (rows, t), ...) -> logp, in place
# ---------------------------------------------------------------------------

def min_length(logp: torch.Tensor, t: int, n: int) -> torch.Tensor:
    """</s> impossible before `n` tokens (t tokens written so far)."""
    if t < n:
        logp[:, EOS] = NEG_INF
    return logp


def no_repeat_ngram(logp: torch.Tensor, hist: torch.Tensor, n: int) -> torch.Tensor:
    """Tokens that would complete an n-gram already in the row's history are impossible."""
    t = hist.shape[1]
    if n <= 0 or t < n:
        return logp
    windows = hist.unfold(1, n, 1)                                   # (rows, t - n + 1, n)
    if windows.shape[1] == 0:
        return logp
    last = hist[:, t - n + 1:]                                       # (rows, n - 1)
    match = (windows[:, :, :-1] == last[:, None, :]).all(-1)         # (rows, W)
    hits = torch.zeros_like(logp).scatter_add_(1, windows[:, :, -1], match.float())
    return logp.masked_fill_(hits > 0, NEG_INF)


def repetition_penalty(logp: torch.Tensor, hist: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) on tokens the row has written: a log-probability (never
    positive) is multiplied by `penalty` (> 1 discourages repeats, < 1 encourages them)."""
    if penalty == 1.0 or hist.shape[1] == 0:
        return logp
    seen = logp.gather(1, hist)
    return logp.scatter_(1, hist, seen * penalty)


def ban_sequences(logp: torch.Tensor, hist: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """The last token of each banned phrase is impossible where the row ends with the rest of it."""
    t = hist.shape[1]
    for phrase in banned:
        head = len(phrase) - 1
        if head > t:
            continue
        if head == 0:
            logp[:, phrase[-1]] = NEG_INF
            continue
        match = (hist[:, t - head:] == torch.tensor(phrase[:-1])).all(1)
        logp[match, phrase[-1]] = NEG_INF
    return logp


def eos_bonus(logp: torch.Tensor, bonus: float) -> torch.Tensor:
    """`bonus` added to </s>'s log-probability: > 0 favours shorter outputs, < 0 longer ones."""
    if bonus:
        logp[:, EOS] += bonus
    return logp


def force(logp: torch.Tensor, raw: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Rows with forced[r] >= 0 can only write that token, at the model's log-probability."""
    rows = (forced >= 0).nonzero()[:, 0]
    if rows.numel():
        tok = forced[rows]
        keep = raw[rows, tok]
        logp[rows] = NEG_INF
        logp[rows, tok] = keep
    return logp


# ---------------------------------------------------------------------------
# Controls for one batch
# ---------------------------------------------------------------------------

@dataclass
class Controls:
    """What search imposes on a batch's outputs (ids; `controls_for` builds it from text).
    Per-source lists are indexed by the batch's source rows."""
    min_length: int = 0                      # tokens before </s> may come (prefix included)
    no_repeat_ngram: int = 0                 # no n-gram of this size twice in an output (0 = off)
    repetition_penalty: float = 1.0          # CTRL-style, on the log-probabilities (1 = off)
    eos_bonus: float = 0.0                   # added to </s>'s log-probability
    banned: list[list[int]] = field(default_factory=list)      # phrases never written
    prefixes: list[list[int]] | None = None  # per source: the output's forced start
    constraints: list[list[list[int]]] | None = None  # per source: phrases every output contains
    ordered: bool = False                    # constraints in the given order
    coverage_penalty: float = 0.0            # Wu et al. 2016's beta (attention models)
    alignments: bool = False                 # source position per output token
    token_scores: bool = False               # log-probability per output token
    alternatives: int = 0                    # the k best next tokens after the prefix, each continued

    @property
    def active(self) -> bool:
        return bool(self.min_length or self.no_repeat_ngram or self.repetition_penalty != 1.0 or self.eos_bonus
                    or self.banned or self.has_prefix or self.has_constraints or self.coverage_penalty
                    or self.alignments or self.token_scores or self.alternatives)

    @property
    def has_prefix(self) -> bool:
        return self.prefixes is not None and any(self.prefixes)

    @property
    def has_constraints(self) -> bool:
        return self.constraints is not None and any(self.constraints)

    @property
    def needs_attention(self) -> bool:
        return self.alignments or self.coverage_penalty > 0

    def for_rows(self, rows: list[int]) -> "Controls":
        """These controls for a batch of the sources `rows`."""
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]
        return replace(self, prefixes=pick(self.prefixes), constraints=pick(self.constraints))

    def prefix_table(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """((b, P) prefix ids padded with -1, (b,) prefix lengths)."""
        prefixes = self.prefixes or [[] for _ in range(b)]
        width = max((len(p) for p in prefixes), default=0)
        table = torch.full((b, max(width, 1)), -1, dtype=torch.long)
        for i, p in enumerate(prefixes):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        return table, torch.tensor([len(p) for p in prefixes], dtype=torch.long)

    def process(self, raw: torch.Tensor, hist: torch.Tensor, t: int, forced: torch.Tensor | None) -> torch.Tensor:
        """The step's log-probabilities (rows, V) as search ranks them, from the model's `raw` ones
        (changed in place unless a prefix is `forced`), `hist` (rows, t) the tokens so far and
        `forced` (rows,) the prefix token of each row (-1: none)."""
        logp = raw.clone() if forced is not None else raw
        min_length(logp, t, self.min_length)
        no_repeat_ngram(logp, hist, self.no_repeat_ngram)
        repetition_penalty(logp, hist, self.repetition_penalty)
        ban_sequences(logp, hist, self.banned)
        eos_bonus(logp, self.eos_bonus)
        if forced is not None:
            force(logp, raw, forced)
        return logp


def check_lengths(controls: Controls, max_len: torch.Tensor) -> None:
    """A prefix, or the constraints' tokens after it, that cannot fit the output is refused."""
    for i, n in enumerate(max_len.tolist()):
        p = len(controls.prefixes[i]) if controls.prefixes is not None else 0
        if p > n:
            raise ValueError(f"input {i + 1}: the target prefix has {p} tokens, more than the maximum output "
                             f"length {n} (decode.max_len_a/max_len_b)")
        if controls.min_length > n:
            raise ValueError(f"input {i + 1}: decode.min_length {controls.min_length} exceeds the maximum output "
                             f"length {n} (decode.max_len_a/max_len_b)")
        c = sum(map(len, controls.constraints[i])) if controls.constraints is not None else 0
        if p + c > n:
            raise ValueError(f"input {i + 1}: the constraints ({c} tokens) after the prefix ({p}) do not fit the "
                             f"maximum output length {n} (decode.max_len_a/max_len_b)")


class ConstraintTracker:
    """Each hypothesis's progress through its source's constraints: the phrases it has met, and the
    phrase it is part-way through (which, and how many of its tokens). Its bank (Post & Vilar 2018)
    is the number of constraint tokens met, those of the phrase in progress included; a hypothesis
    may end only when every phrase is met. A token that breaks a phrase in progress loses that
    progress (it may start a phrase again). `ordered`: phrases are met in the given order only.

    Tensors per source (indexed by original source index) and per hypothesis (rows, k)."""

    def __init__(self, constraints: list[list[list[int]]], beam: int, ordered: bool):
        b = len(constraints)
        n_phrases = max(1, max(len(c) for c in constraints))
        width = max(1, max((len(p) for c in constraints for p in c), default=1))
        self.tokens = torch.full((b, n_phrases, width), -1, dtype=torch.long)   # (b, P, L)
        self.lengths = torch.zeros(b, n_phrases, dtype=torch.long)              # (b, P); 0: no phrase
        for i, c in enumerate(constraints):
            for j, p in enumerate(c):
                self.tokens[i, j, : len(p)] = torch.tensor(p, dtype=torch.long)
                self.lengths[i, j] = len(p)
        self.ordered = ordered
        self.n_banks = int(self.lengths.sum(1).max()) + 1
        self.met = (self.lengths == 0)[:, None, :].repeat(1, beam, 1)           # (rows, k, P)
        self.phrase = torch.full((b, beam), -1, dtype=torch.long)               # (rows, k); -1: none
        self.pos = torch.zeros(b, beam, dtype=torch.long)                       # tokens of it met

    def can_end(self) -> torch.Tensor:
        """(rows, k) True where every constraint is met."""
        return self.met.all(-1)

    def _eligible(self, met: torch.Tensor) -> torch.Tensor:
        """Phrases that may start next: the unmet ones, or (ordered) the first of them."""
        unmet = ~met
        if not self.ordered:
            return unmet
        first = unmet.long().argmax(-1, keepdim=True)
        return unmet & (torch.arange(met.shape[-1]) == first)

    def next_tokens(self, alive: torch.Tensor) -> torch.Tensor:
        """(rows, k, P + 1) tokens that advance each hypothesis (-1: none): the next of the phrase in
        progress, the first of each phrase it may start."""
        tokens = self.tokens[alive]                                              # (rows, P, L)
        rows, k = self.phrase.shape
        ongoing = self.phrase >= 0
        nxt = tokens[torch.arange(rows)[:, None], self.phrase.clamp(min=0), self.pos.clamp(max=tokens.shape[2] - 1)]
        nxt = torch.where(ongoing, nxt, -1)
        firsts = tokens[:, None, :, 0].expand(rows, k, -1)
        firsts = torch.where(self._eligible(self.met), firsts, -1)
        return torch.cat([nxt[:, :, None], firsts], 2)

    def advance(self, alive: torch.Tensor, beam_of: torch.Tensor, tok: torch.Tensor):
        """The state and bank of each candidate: parent beam `beam_of` (rows, c) writing `tok`."""
        tokens, lengths = self.tokens[alive], self.lengths[alive]                # (rows, P, L), (rows, P)
        rows = torch.arange(tokens.shape[0])[:, None]
        met = self.met.gather(1, beam_of[:, :, None].expand(-1, -1, self.met.shape[2])).clone()  # (rows, c, P)
        phrase, pos = self.phrase.gather(1, beam_of), self.pos.gather(1, beam_of)
        p0 = phrase.clamp(min=0)
        expected = tokens[rows, p0, pos.clamp(max=tokens.shape[2] - 1)]
        cont = (phrase >= 0) & (tok == expected)
        done = cont & (pos + 1 == lengths[rows, p0])
        starts = self._eligible(met) & (tokens[:, None, :, 0] == tok[:, :, None])
        has = ~cont & starts.any(-1)
        q = starts.long().argmax(-1)
        single = has & (lengths[rows, q] == 1)
        met.scatter_(2, p0[:, :, None], met.gather(2, p0[:, :, None]) | done[:, :, None])
        met.scatter_(2, q[:, :, None], met.gather(2, q[:, :, None]) | single[:, :, None])
        new_phrase = torch.where(cont & ~done, phrase, torch.where(has & ~single, q, -1))
        new_pos = torch.where(cont & ~done, pos + 1, torch.where(has & ~single, 1, 0))
        bank = (lengths[:, None, :] * met).sum(-1) + torch.where(new_phrase >= 0, new_pos, 0)
        return (met, new_phrase, new_pos), bank

    def take(self, state, order: torch.Tensor) -> None:
        """Keep the candidates `order` (rows, k) of an `advance`'s state."""
        met, phrase, pos = state
        self.met = met.gather(1, order[:, :, None].expand(-1, -1, met.shape[2]))
        self.phrase, self.pos = phrase.gather(1, order), pos.gather(1, order)

    def keep(self, rows: torch.Tensor) -> None:
        self.met, self.phrase, self.pos = self.met[rows], self.phrase[rows], self.pos[rows]


def bank_order(score: torch.Tensor, bank: torch.Tensor, n_banks: int) -> torch.Tensor:
    """(rows, c) each candidate's place in dynamic beam allocation: banks take turns, the most
    advanced first, each giving its best candidate not yet placed (the beam is shared between
    banks; a bank with too few candidates leaves its turns to the others). -inf scores come last."""
    finite = torch.isfinite(score)
    by_score = score.argsort(dim=1, descending=True, stable=True)
    bank_s = bank.gather(1, by_score)
    onehot = torch.nn.functional.one_hot(bank_s, n_banks) * finite.gather(1, by_score)[:, :, None].long()
    within = (onehot.cumsum(1) * onehot).sum(-1) - 1                # place within its bank, by score
    place_s = within * n_banks + (n_banks - 1 - bank_s)
    place_s = torch.where(finite.gather(1, by_score), place_s, score.shape[1] * n_banks + 1)
    return torch.empty_like(place_s).scatter_(1, by_score, place_s)


# ---------------------------------------------------------------------------
# From text
# ---------------------------------------------------------------------------

def phrase_ids(codec, text: str, where: str) -> list[int]:
    """The target ids of `text`; a symbol the vocabulary lacks is an error naming it and `where`."""
    symbols = codec.tokenizer.split(text)
    ids = codec.vocab.encode(symbols)
    for s, i in zip(symbols, ids):
        if i == UNK and s != codec.vocab.itos[UNK]:
            raise ValueError(f"{where}: symbol {s!r} of {text!r} is not in the target vocabulary")
    if codec.reverse:
        ids.reverse()
    return ids


def controls_for(cfg, codec, n: int, prefixes: list[str] | None = None,
                 constraints: list[list[str]] | None = None) -> Controls:
    """The controls of `cfg` (a DecodeConfig) for `n` inputs in ids of the target `codec`;
    per-input `prefixes` and `constraints` (phrases) replace decode.prefix and decode.constraints."""
    if prefixes is not None and len(prefixes) != n:
        raise ValueError(f"--prefix: {len(prefixes)} lines for {n} inputs")
    if constraints is not None and len(constraints) != n:
        raise ValueError(f"--constraints: {len(constraints)} lines for {n} inputs")
    if codec.reverse and (prefixes or cfg.prefix or constraints or cfg.constraints):
        raise ValueError("a target prefix or constraints need a left-to-right target (this run's target ids run "
                         "last symbol first)")
    if prefixes is not None:
        pre = [phrase_ids(codec, p, f"--prefix line {i + 1}") for i, p in enumerate(prefixes)]
    elif cfg.prefix:
        pre = [phrase_ids(codec, cfg.prefix, "decode.prefix")] * n
    else:
        pre = None
    if constraints is not None:
        cons = [[phrase_ids(codec, c, f"--constraints line {i + 1}") for c in line if c.strip()]
                for i, line in enumerate(constraints)]
    elif cfg.constraints:
        cons = [[phrase_ids(codec, c, "decode.constraints") for c in cfg.constraints if c.strip()]] * n
    else:
        cons = None
    for line in cons or []:
        if any(not p for p in line):
            raise ValueError("a constraint encodes to no target symbol")
    banned = [phrase_ids(codec, p, "decode.banned") for p in cfg.banned if p.strip()]
    return Controls(min_length=cfg.min_length, no_repeat_ngram=cfg.no_repeat_ngram,
                    repetition_penalty=cfg.repetition_penalty, eos_bonus=cfg.eos_bonus, banned=banned,
                    prefixes=pre, constraints=cons, ordered=cfg.constraints_ordered,
                    coverage_penalty=cfg.coverage_penalty, alignments=cfg.alignments or cfg.replace_unk,
                    token_scores=cfg.token_scores, alternatives=cfg.alternatives)
