"""Single-stack families: one self-attention stack reads [source | target] as one sequence.

- Decoder-only (GPT; Radford et al. 2018): every position attends to itself
  and to earlier positions. Trained on plain text (`data.format: text`: the
  source is empty and the sequence is `<s> line </s>`) or on pairs, read as
  `source <s> target </s>` with the loss on the target only.
- Prefix-LM (UniLM, Dong et al. 2019; the "prefix LM" of T5): source
  positions attend to the whole source in both directions; target positions
  attend to the whole source and to earlier target positions.

The two differ only in `attention_mask`. The separator between source and
target is `<s>` itself: every family's target side already starts with it
(`Batch.tgt_in`), so the stack reads `src ++ tgt_in`, search's first step
feeds it, and no new symbol enters the vocabularies. There is one token
table, so the vocabulary is always shared (`share_embeddings` is True).

Search interface: `encode` runs the source through the stack and keeps each
layer's keys/values as the memory (the source never sees the target under
either mask, so they equal those of the full pass); `init_state` copies them
into a per-row cache with room for the target; `step` appends one position.

Padding: sources are right-padded, so [source | target] has padding in the
middle. Positions are per row (target position t of row b sits at
len(source_b) + t) and the mask hides padding keys, so padding never changes
a real position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from transduce.models.base import EncoderDecoderModel
from transduce.models.layers import Attention, Embedding, FeedForward, Residual, init_weights, reorder_cache


@dataclass
class StackConfig:
    """Fields of both single-stack families (the family only picks the mask)."""
    family: str = ""
    d_model: int = 256               # width of every layer
    heads: int = 4                   # attention heads; d_model must divide by it
    layers: int = 6                  # one stack reads source and target (no encoder/decoder split)
    ff_dim: int = 1024               # inner width of the feed-forward blocks
    dropout: float = 0.1             # on embeddings, residual branches and feed-forward
    attention_dropout: float = 0.0   # on attention probabilities
    activation: Literal["relu", "gelu", "geglu", "swiglu"] = "gelu"  # geglu, swiglu: gated (models/layers.py)
    norm: Literal["pre", "post"] = "pre"  # pre-norm trains stably without long warmup
    positions: Literal["sinusoidal", "learned"] = "learned"
    max_positions: int = 1024        # longest source + target (with its <s>) the model accepts
    tie_output: bool = True          # output projection shares the token embedding weights

    # A language model on plain text (data.format: text) has no source; these families accept that.
    reads_without_source = True

    @property
    def share_embeddings(self) -> bool:
        """Source and target are one sequence: one token table, so one vocabulary (the trainer
        reads this when it fits the codecs). Always true, not a config key."""
        return True

    def validate(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if min(self.d_model, self.heads, self.ff_dim, self.max_positions) <= 0:
            raise ValueError("d_model, heads, ff_dim and max_positions must be positive")
        if self.layers < 1:
            raise ValueError("layers must be at least 1")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.attention_dropout < 1.0):
            raise ValueError("dropout values must be in [0, 1)")

    def validate_data(self, data) -> None:
        """The longest allowed pair must fit: source + <s> + target (the </s> is only a label)."""
        need = data.max_target_len + (0 if data.format == "text" else data.max_source_len)
        if need > self.max_positions:
            raise ValueError(f"model.max_positions={self.max_positions} is shorter than the longest allowed "
                             f"sequence ({need} = data.max_source_len + data.max_target_len); raise it or "
                             "lower the data limits")


@dataclass
class DecoderOnlyConfig(StackConfig):
    family: Literal["decoder_only"] = "decoder_only"


@dataclass
class PrefixLMConfig(StackConfig):
    family: Literal["prefix_lm"] = "prefix_lm"


def attention_mask(src_mask: torch.Tensor, tgt_len: int, bidirectional_source: bool) -> torch.Tensor:
    """Who sees whom in [source | target]: (B, S+T, S+T), True where query i may attend to key j.

    src_mask (B, S) is True at real source tokens (right-padded); the target
    part has `tgt_len` positions. Query i may attend to key j when
      - j is a real source token and j <= i, or any real source token if
        `bidirectional_source` (prefix-LM: the source reads itself both
        ways, and every target position sees all of it);
      - j is a target position and j <= i (target padding comes after every
        real target position, so causality already hides it);
      - j == i, so that padding queries attend to something and stay finite.
    Source queries never see target keys, so the source part of the full
    pass equals `encode` on the source alone.
    """
    b, s = src_mask.shape
    n = s + tgt_len
    idx = torch.arange(n, device=src_mask.device)
    allowed = idx[None, :] <= idx[:, None]                         # (n, n) causal: key j <= query i
    if bidirectional_source:
        allowed = allowed | (idx < s)[None, :]                     # every query sees source keys
    real_key = torch.cat([src_mask, src_mask.new_ones(b, tgt_len)], 1)  # (B, n)
    eye = torch.eye(n, dtype=torch.bool, device=src_mask.device)
    return (allowed[None] & real_key[:, None, :]) | eye[None]


def sequence_positions(src_mask: torch.Tensor, tgt_len: int) -> torch.Tensor:
    """(B, S+T) position of each column: source columns 0..S-1, target column t at len(source) + t."""
    b, s = src_mask.shape
    src_pos = torch.arange(s, device=src_mask.device).expand(b, s)
    tgt_pos = src_mask.sum(1, keepdim=True) + torch.arange(tgt_len, device=src_mask.device)
    return torch.cat([src_pos, tgt_pos], 1)


class StackLayer(nn.Module):
    def __init__(self, c: StackConfig):
        super().__init__()
        pre = c.norm == "pre"
        self.attn = Attention(c.d_model, c.heads, c.attention_dropout, cross=False)
        self.ff = FeedForward(c.d_model, c.ff_dim, c.dropout, c.activation)
        self.r1 = Residual(c.d_model, c.dropout, pre)
        self.r2 = Residual(c.d_model, c.dropout, pre)

    def forward(self, x, mask, cache=None, at: int = 0):
        # x (N, L, D); mask broadcastable to (N, H, L, keys). Without cache the
        # keys are x's own positions. With cache (k, v buffers (N, H, Lmax, dh))
        # x holds positions at..at+L-1: written into the cache, then the
        # queries attend to cache[:, :, :at+L].
        a = self.attn

        def self_attention(h):
            q, k, v = a.project_qkv(h)
            if cache is not None:
                ck, cv = cache
                end = at + h.shape[1]
                ck[:, :, at: end] = k
                cv[:, :, at: end] = v
                k, v = ck[:, :, :end], cv[:, :, :end]
            return a.out(a.merge(a.attend(q, k, v, mask)))

        x = self.r1(x, self_attention)
        return self.r2(x, self.ff)


@dataclass
class PromptMemory:
    kv: list                    # per layer (k, v), each (B, H, S, dh): the source's keys and values
    mask: torch.Tensor          # (B, S) True at real source tokens


@dataclass
class StackState:
    cache: list                 # per layer (k, v) buffers, each (N, H, S + max_len, dh); source in [:S]
    src_mask: torch.Tensor      # (N, S) per row
    src_len: torch.Tensor       # (N,) real source tokens per row: where the target starts
    s: int                      # source width (padded)
    t: int                      # target positions decoded so far
    beam: int
    attention: None = None      # no cross-attention to record (`transduce attention` says so)
    spare: list | None = None   # buffers shaped like `cache` that the next beam reorder fills


class SingleStack(EncoderDecoderModel):
    """One stack over [source | target]; subclasses fix `bidirectional_source`."""

    bidirectional_source: bool

    def __init__(self, c: StackConfig, src_vocab: int, tgt_vocab: int):
        super().__init__()
        if src_vocab != tgt_vocab:
            raise ValueError(f"{c.family} reads source and target with one vocabulary "
                             f"(got {src_vocab} and {tgt_vocab})")
        self.config = c
        d = c.d_model
        tokens = nn.Embedding(tgt_vocab, d, padding_idx=0)
        self.embed = Embedding(tgt_vocab, d, c.positions, c.max_positions, c.dropout, tokens)
        self.layers = nn.ModuleList(StackLayer(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(d) if c.norm == "pre" else nn.Identity()
        self.output = nn.Linear(d, tgt_vocab, bias=False)
        init_weights(self)
        if c.tie_output:
            self.output.weight = tokens.weight

    # -- training -----------------------------------------------------------
    def forward(self, batch) -> torch.Tensor:
        s, t = batch.src.shape[1], batch.tgt_in.shape[1]
        ids = torch.cat([batch.src, batch.tgt_in], 1)                        # (B, S+T)
        x = self.embed(ids, pos_ids=sequence_positions(batch.src_mask, t))   # (B, S+T, D)
        mask = attention_mask(batch.src_mask, t, self.bidirectional_source)[:, None]  # (B, 1, S+T, S+T)
        for layer in self.layers:
            x = layer(x, mask)
        return self.output(self.norm(x[:, s:]))                             # (B, T, V), aligned with labels

    # -- search interface ---------------------------------------------------
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> PromptMemory:
        # src (B, S) ids; src_mask (B, S) True at real tokens. S may be 0 (plain-text LM).
        assert src.shape == src_mask.shape and src.dim() == 2, (src.shape, src_mask.shape)
        b, s = src.shape
        c = self.config
        x = self.embed(src)                                                  # (B, S, D), positions 0..S-1
        mask = attention_mask(src_mask, 0, self.bidirectional_source)[:, None]
        kv = []
        for layer in self.layers:
            shape = (b, c.heads, s, c.d_model // c.heads)
            cache = (x.new_zeros(shape), x.new_zeros(shape))
            if s:
                x = layer(x, mask, cache, at=0)
            kv.append(cache)
        return PromptMemory(kv, src_mask)

    def max_output_len(self, src_mask: torch.Tensor) -> torch.Tensor:
        # target position t sits at src_len + t (see step); the last fed token must fit
        return self.config.max_positions - 1 - src_mask.sum(1).long()

    def init_state(self, memory: PromptMemory, beam: int, max_len: int,
                   record_attention: bool = False) -> StackState:
        b, s = memory.mask.shape
        n = b * beam
        cache = []
        for k, v in memory.kv:
            ck = k.new_empty(n, k.shape[1], s + max_len, k.shape[3])  # target positions: written before read
            cv = torch.empty_like(ck)
            ck[:, :, :s] = k.repeat_interleave(beam, 0)     # rows are source-major: row = source * beam + j
            cv[:, :, :s] = v.repeat_interleave(beam, 0)
            cache.append((ck, cv))
        mask = memory.mask.repeat_interleave(beam, 0)
        return StackState(cache, mask, mask.sum(1), s, 0, beam)

    def step(self, tokens: torch.Tensor, state: StackState) -> tuple[torch.Tensor, StackState]:
        # tokens (N,) -> logits (N, V). The new position is target position t.
        n, s, t = tokens.shape[0], state.s, state.t
        x = self.embed(tokens[:, None], pos_ids=(state.src_len + t)[:, None])  # (N, 1, D)
        # The query's row of `attention_mask`: real source keys and target keys 0..t.
        keys = torch.cat([state.src_mask, state.src_mask.new_ones(n, t + 1)], 1)
        mask = keys[:, None, None, :]                                          # (N, 1, 1, S+t+1)
        for layer, cache in zip(self.layers, state.cache):
            x = layer(x, mask, cache, at=s + t)
        state.t += 1
        return self.output(self.norm(x[:, 0])), state

    def reorder_state(self, state: StackState, rows: torch.Tensor | None,
                      batch: torch.Tensor | None = None) -> StackState:
        """Keep cache rows `rows`. Everything is per row, so dropped sources (`batch`) need only rows."""
        if rows is None:
            if batch is None:
                return state
            rows = (batch[:, None] * state.beam + torch.arange(state.beam)).reshape(-1)
        state.cache, state.spare = reorder_cache(state.cache, rows, state.s + state.t, state.spare)
        state.src_mask = state.src_mask.index_select(0, rows)
        state.src_len = state.src_len.index_select(0, rows)
        return state

    def describe(self) -> dict:
        c = self.config
        return {
            "family": c.family,
            "d_model": c.d_model, "heads": c.heads, "ff_dim": c.ff_dim, "layers": c.layers,
            "parameters": sum(p.numel() for p in self.parameters()),
        }


class DecoderOnly(SingleStack):
    """GPT-style: causal everywhere, the source included."""
    bidirectional_source = False


class PrefixLM(SingleStack):
    """UniLM-style: the source reads itself both ways; the target is causal and sees all the source."""
    bidirectional_source = True
