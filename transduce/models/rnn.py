"""Recurrent encoder-decoders: LSTM/GRU, with or without attention.

- Without attention (Sutskever et al. 2014): the encoder's final state,
  bridged to the decoder's size, is the only context.
- Additive attention (Bahdanau et al. 2015): the previous decoder state
  queries the encoder states; the context is fed into the RNN.
- Multiplicative attention (Luong et al. 2015, `dot` or `general`): the new
  decoder state queries the encoder states; output = tanh(W [context; state]),
  optionally fed to the next step's input ("input feeding").

Encoder states and attention keys are computed once per source and shared
by every beam: the beams of a source are folded into the query axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from transduce.models.base import EncoderDecoderModel, EncoderOutput
from transduce.models.layers import Dropout


@dataclass
class RNNConfig:
    family: Literal["rnn"] = "rnn"
    cell: Literal["lstm", "gru"] = "lstm"
    attention: Literal["none", "bahdanau", "luong_dot", "luong_general"] = "bahdanau"
    embedding_dim: int = 256         # token embedding width (both sides)
    encoder_hidden: int = 256        # encoder state width per direction
    hidden_size: int = 256           # decoder state width
    encoder_layers: int = 2
    decoder_layers: int = 2
    bidirectional: bool = True       # encoder reads both ways; states are concatenated
    dropout: float = 0.2             # on embeddings, between layers and before the output
    input_feeding: bool = False      # Luong: feed the previous attentional output to the input
    attention_dim: int = 256         # hidden width of the additive (Bahdanau) scorer
    tie_output: bool = False         # output projection shares the target embedding (needs
                                     # embedding_dim == hidden_size)
    max_positions: int = 1024        # longest sequence accepted (kept for a uniform interface)

    def validate(self) -> None:
        if min(self.embedding_dim, self.encoder_hidden, self.hidden_size, self.attention_dim) <= 0:
            raise ValueError("sizes must be positive")
        if self.encoder_layers < 1 or self.decoder_layers < 1:
            raise ValueError("encoder_layers and decoder_layers must be at least 1")
        if self.input_feeding and not self.attention.startswith("luong"):
            raise ValueError("input_feeding applies to Luong attention (luong_dot, luong_general)")
        enc_out = self.encoder_hidden * (2 if self.bidirectional else 1)
        if self.attention == "luong_dot" and enc_out != self.hidden_size:
            raise ValueError(f"luong_dot needs encoder output width ({enc_out}) == hidden_size "
                             f"({self.hidden_size}); use luong_general")
        if self.tie_output and self.embedding_dim != self.hidden_size:
            raise ValueError("tie_output needs embedding_dim == hidden_size")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")


class AdditiveAttention(nn.Module):
    """score(q, h) = v . tanh(W q + U h)   (Bahdanau)."""

    def __init__(self, query: int, memory: int, hidden: int):
        super().__init__()
        self.w = nn.Linear(query, hidden, bias=False)
        self.u = nn.Linear(memory, hidden)
        self.v = nn.Linear(hidden, 1, bias=False)

    def keys(self, memory):  # (B, S, E) -> (B, S, A), once per source
        return self.u(memory)

    def scores(self, query, keys):  # query (B, K, Q), keys (B, S, A) -> (B, K, S)
        return self.v(torch.tanh(self.w(query)[:, :, None, :] + keys[:, None, :, :]))[..., 0]


class MultiplicativeAttention(nn.Module):
    """score(q, h) = q . h (dot) or q . W h (general)   (Luong)."""

    def __init__(self, query: int, memory: int, general: bool):
        super().__init__()
        self.w = nn.Linear(memory, query, bias=False) if general else None

    def keys(self, memory):  # (B, S, E) -> (B, S, Q)
        return self.w(memory) if self.w is not None else memory

    def scores(self, query, keys):  # (B, K, Q) x (B, S, Q) -> (B, K, S)
        return query @ keys.transpose(1, 2)


def attend(attn, query, keys, memory, mask, beam: int):
    """query (N, Q) with N = B * beam -> context (N, E), weights (N, S)."""
    n = query.shape[0]
    b = n // beam
    scores = attn.scores(query.view(b, beam, -1), keys)            # (B, K, S)
    weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
    context = weights @ memory                                       # (B, K, E)
    return context.reshape(n, -1), weights.reshape(n, -1)


@dataclass
class RNNState:
    hidden: object              # (layers, N, H) tensor, or (h, c) for LSTM
    feed: torch.Tensor | None   # (N, H) previous attentional output (input feeding)
    memory: torch.Tensor        # (B, S, E) encoder states
    keys: torch.Tensor | None   # (B, S, *) precomputed attention keys
    mask: torch.Tensor          # (B, S)
    beam: int
    attention: list | None      # if recording: per step, [(N, 1, S)]


class RNNSeq2Seq(EncoderDecoderModel):
    def __init__(self, c: RNNConfig, src_vocab: int, tgt_vocab: int):
        super().__init__()
        self.config = c
        rnn = nn.LSTM if c.cell == "lstm" else nn.GRU
        dirs = 2 if c.bidirectional else 1
        enc_out = c.encoder_hidden * dirs
        self.src_embed = nn.Embedding(src_vocab, c.embedding_dim, padding_idx=0)
        self.tgt_embed = nn.Embedding(tgt_vocab, c.embedding_dim, padding_idx=0)
        self.dropout = Dropout(c.dropout)
        self.encoder = rnn(c.embedding_dim, c.encoder_hidden, c.encoder_layers, batch_first=True,
                           bidirectional=c.bidirectional, dropout=c.dropout if c.encoder_layers > 1 else 0.0)
        # Bridge: top encoder layer's final state(s) -> initial state of every decoder layer.
        self.bridge = nn.Linear(enc_out, c.decoder_layers * c.hidden_size)
        self.bridge_cell = nn.Linear(enc_out, c.decoder_layers * c.hidden_size) if c.cell == "lstm" else None
        self.attn = None
        if c.attention == "bahdanau":
            self.attn = AdditiveAttention(c.hidden_size, enc_out, c.attention_dim)
        elif c.attention.startswith("luong"):
            self.attn = MultiplicativeAttention(c.hidden_size, enc_out, general=c.attention == "luong_general")
        rnn_in = c.embedding_dim
        if c.attention == "bahdanau":
            rnn_in += enc_out
        if c.input_feeding:
            rnn_in += c.hidden_size
        self.decoder = rnn(rnn_in, c.hidden_size, c.decoder_layers, batch_first=True,
                           dropout=c.dropout if c.decoder_layers > 1 else 0.0)
        out_in = c.hidden_size + (enc_out if c.attention != "none" else 0)
        # Luong: tanh(W [context; state]); Bahdanau: tanh(W [state; context]); none: identity.
        self.combine = nn.Linear(out_in, c.hidden_size) if c.attention != "none" else None
        self.output = nn.Linear(c.hidden_size, tgt_vocab, bias=False)
        for m in (self.src_embed, self.tgt_embed):
            nn.init.normal_(m.weight, 0.0, 0.1)
            with torch.no_grad():
                m.weight[0].zero_()
        if c.tie_output:
            self.output.weight = self.tgt_embed.weight

    # -- encoder --------------------------------------------------------------
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        # src (B, S) -> states (B, S, E); final (B, E) kept on the output for the bridge
        assert src.shape == src_mask.shape and src.dim() == 2, (src.shape, src_mask.shape)
        return self.encode_embedded(self.src_embed(src), src_mask)

    def encode_embedded(self, x: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        """The encoder RNN over embedded inputs x (B, S, D) (vector front-ends: models/series.py)."""
        lengths = src_mask.sum(1).cpu()
        x = self.dropout(x)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, hidden = self.encoder(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        h = hidden[0] if isinstance(hidden, tuple) else hidden        # (layers*dirs, B, H)
        dirs = 2 if self.config.bidirectional else 1
        final = torch.cat([h[-dirs + d] for d in range(dirs)], -1)     # top layer, (B, E)
        return EncoderOutput(states, src_mask, final)

    def initial_hidden(self, final: torch.Tensor, beam: int):
        c = self.config
        b = final.shape[0]

        def spread(linear):  # (B, E) -> (layers, B*beam, H)
            h = torch.tanh(linear(final)).view(b, c.decoder_layers, c.hidden_size).transpose(0, 1)
            return h.repeat_interleave(beam, dim=1).contiguous()

        h = spread(self.bridge)
        return (h, spread(self.bridge_cell)) if self.bridge_cell is not None else h

    # -- decoder --------------------------------------------------------------
    def _top(self, hidden) -> torch.Tensor:
        return (hidden[0] if isinstance(hidden, tuple) else hidden)[-1]  # (N, H)

    def _decode_step(self, emb, state: RNNState):
        """emb (N, D) -> attentional output (N, H), weights (N, S) or None."""
        c = self.config
        parts = [emb]
        weights = None
        if c.attention == "bahdanau":
            ctx, weights = attend(self.attn, self._top(state.hidden), state.keys, state.memory, state.mask,
                                  state.beam)
            parts.append(ctx)
        if c.input_feeding:
            parts.append(state.feed)
        out, state.hidden = self.decoder(torch.cat(parts, -1)[:, None], state.hidden)
        out = out[:, 0]
        if c.attention == "bahdanau":
            out = torch.tanh(self.combine(torch.cat([out, ctx], -1)))
        elif c.attention != "none":
            ctx, weights = attend(self.attn, out, state.keys, state.memory, state.mask, state.beam)
            out = torch.tanh(self.combine(torch.cat([ctx, out], -1)))
            if c.input_feeding:
                state.feed = out
        return out, weights

    def init_state(self, memory: EncoderOutput, beam: int, max_len: int,
                   record_attention: bool = False) -> RNNState:
        n = memory.states.shape[0] * beam
        keys = self.attn.keys(memory.states) if self.attn is not None else None
        feed = memory.states.new_zeros(n, self.config.hidden_size) if self.config.input_feeding else None
        return RNNState(self.initial_hidden(memory.final, beam), feed, memory.states, keys, memory.mask, beam,
                        [] if record_attention else None)

    def step(self, tokens: torch.Tensor, state: RNNState):
        # tokens (N,) -> logits (N, V)
        out, weights = self._decode_step(self.dropout(self.tgt_embed(tokens)), state)
        if state.attention is not None:
            state.attention.append([weights[:, None, :] if weights is not None else None])
        return self.output(self.dropout(out)), state

    def reorder_state(self, state: RNNState, rows, batch=None) -> RNNState:
        if batch is not None:
            state.memory = state.memory.index_select(0, batch)
            state.mask = state.mask.index_select(0, batch)
            if state.keys is not None:
                state.keys = state.keys.index_select(0, batch)
        if rows is not None:
            h = state.hidden
            state.hidden = (tuple(x.index_select(1, rows) for x in h) if isinstance(h, tuple)
                            else h.index_select(1, rows))
            if state.feed is not None:
                state.feed = state.feed.index_select(0, rows)
        return state

    def forward(self, batch) -> torch.Tensor:
        c = self.config
        memory = self.encode(batch.src, batch.src_mask)
        emb = self.dropout(self.tgt_embed(batch.tgt_in))                 # (B, T, D)
        if c.attention == "bahdanau" or c.input_feeding:
            # The RNN input depends on the previous step's attention: step through time.
            state = self.init_state(memory, 1, batch.tgt_in.shape[1])
            outs = [self._decode_step(emb[:, t], state)[0] for t in range(emb.shape[1])]
            out = torch.stack(outs, 1)
        else:
            out, _ = self.decoder(emb, self.initial_hidden(memory.final, 1))  # (B, T, H)
            if c.attention != "none":
                keys = self.attn.keys(memory.states)
                scores = self.attn.scores(out, keys).masked_fill(~memory.mask[:, None, :], float("-inf"))
                ctx = scores.softmax(-1) @ memory.states
                out = torch.tanh(self.combine(torch.cat([ctx, out], -1)))
        return self.output(self.dropout(out))

    def describe(self) -> dict:
        c = self.config
        return {"family": c.family, "cell": c.cell, "attention": c.attention,
                "embedding_dim": c.embedding_dim, "encoder_hidden": c.encoder_hidden,
                "hidden_size": c.hidden_size, "encoder_layers": c.encoder_layers,
                "decoder_layers": c.decoder_layers, "bidirectional": c.bidirectional,
                "parameters": sum(p.numel() for p in self.parameters())}
