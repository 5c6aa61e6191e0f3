"""Transformer encoder-decoder (Vaswani et al. 2017) with a key/value cache for search.

The modules are the reference; decoding on the CPU kernels is an engine built from them
(transduce/engine/kernels.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from transduce.data.vocab import BOS, EOS, PAD
from transduce.models.base import EncoderDecoderModel, EncoderOutput
from transduce.models.layers import Attention, Embedding, FeedForward, Residual, bf16_twin, init_weights, reorder_cache


@dataclass
class EncoderStackConfig:
    """The Transformer encoder stack; shared by the encoder-decoder and the encoder-only families.

    A BERT-compatible stack (for `init_encoder`) is post-norm, learned
    positions, GELU, `embed_scale: false`, `embed_norm: true`, `norm_eps: 1e-12`.
    """
    family: str = ""
    d_model: int = 256               # width of every layer
    heads: int = 4                   # attention heads; d_model must divide by it
    encoder_layers: int = 3
    ff_dim: int = 1024               # inner width of the feed-forward blocks
    dropout: float = 0.1             # on embeddings and residual branches
    activation_dropout: float = 0.0  # inside the feed-forward block (costly on CPU, rarely needed)
    attention_dropout: float = 0.0   # on attention probabilities
    # geglu, swiglu: gated (models/layers.py); silu: Marian's "swish"
    activation: Literal["relu", "gelu", "silu", "geglu", "swiglu"] = "relu"
    norm: Literal["pre", "post"] = "pre"  # pre-norm trains stably without long warmup
    # sinusoidal: sines and cosines interleaved; sinusoidal_halves: sines, then cosines (Marian's table)
    positions: Literal["sinusoidal", "sinusoidal_halves", "learned"] = "sinusoidal"
    max_positions: int = 1024        # longest source or target the model accepts
    embed_scale: bool = True         # token embeddings times sqrt(d_model) (Vaswani); BERT: false
    embed_norm: bool = False         # LayerNorm on embeddings + positions (BERT: true)
    norm_eps: float = 1e-5           # LayerNorm epsilon (BERT checkpoints: 1e-12)
    # Hugging Face BERT-style checkpoint folder (config.json, model.safetensors,
    # tokenizer.json or vocab.txt), or `package:NAME/sub/dir` inside an
    # installed Python package, whose weights start the encoder of a fresh run
    # (never read on resume or when loading a trained run). See models/bert.py.
    init_encoder: Optional[str] = None

    def validate(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if min(self.d_model, self.heads, self.ff_dim, self.max_positions) <= 0:
            raise ValueError("d_model, heads, ff_dim and max_positions must be positive")
        if self.encoder_layers < 1:
            raise ValueError("encoder_layers must be at least 1")
        if not all(0.0 <= p < 1.0 for p in (self.dropout, self.attention_dropout, self.activation_dropout)):
            raise ValueError("dropout values must be in [0, 1)")
        if not 0.0 < self.norm_eps < 1.0:
            raise ValueError("norm_eps must be in (0, 1)")


@dataclass
class TransformerConfig(EncoderStackConfig):
    family: Literal["transformer"] = "transformer"
    decoder_layers: int = 3
    share_embeddings: bool = False   # one embedding table (and vocabulary) for source and target
    tie_output: bool = True          # output projection shares the target embedding weights
    # With init_encoder: also start the decoder's embeddings, self-attention and
    # feed-forward blocks from that checkpoint (BERT2BERT, Rothe et al. 2020);
    # cross-attention is always new. Needs a pretrained target tokenizer.
    init_decoder: bool = False
    output_bias: bool = False        # a bias on the output projection (Marian's and BART's final_logits_bias)
    # what the decoder reads before its first output: <s> (ours), <pad> (Marian), </s> <s> (BART, whose
    # decoder starts from </s> and is made to write <s> first)
    decoder_start: Literal["bos", "pad", "eos_bos"] = "bos"

    def validate(self) -> None:
        super().validate()
        if self.decoder_layers < 1:
            raise ValueError("decoder_layers must be at least 1")
        if self.init_decoder and not self.init_encoder:
            raise ValueError("init_decoder needs init_encoder (the checkpoint to read)")


def stack_embedding(c: EncoderStackConfig, vocab: int, tokens: nn.Embedding | None = None) -> Embedding:
    return Embedding(vocab, c.d_model, c.positions, c.max_positions, c.dropout, tokens,
                     scale=c.embed_scale, norm=c.embed_norm, eps=c.norm_eps)


def final_norm(c: EncoderStackConfig) -> nn.Module:
    """Pre-norm stacks end with a LayerNorm; post-norm layers already end normalised."""
    return nn.LayerNorm(c.d_model, eps=c.norm_eps) if c.norm == "pre" else nn.Identity()


# model.decoder_start -> the ids the decoder reads before its first output
DECODER_STARTS = {"bos": (BOS,), "pad": (PAD,), "eos_bos": (EOS, BOS)}


class EncoderLayer(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        pre = c.norm == "pre"
        self.attn = Attention(c.d_model, c.heads, c.attention_dropout, cross=False)
        self.ff = FeedForward(c.d_model, c.ff_dim, c.activation_dropout, c.activation)
        self.r1 = Residual(c.d_model, c.dropout, pre, c.norm_eps)
        self.r2 = Residual(c.d_model, c.dropout, pre, c.norm_eps)

    def forward(self, x, mask):
        # x (B, S, D); mask (B, 1, 1, S)
        def self_attention(h):
            q, k, v = self.attn.project_qkv(h)
            return self.attn.out(self.attn.merge(self.attn.attend(q, k, v, mask)))

        x = self.r1(x, self_attention)
        return self.r2(x, self.ff)


class DecoderLayer(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        pre = c.norm == "pre"
        self.self_attn = Attention(c.d_model, c.heads, c.attention_dropout, cross=False)
        self.cross_attn = Attention(c.d_model, c.heads, c.attention_dropout, cross=True)
        self.ff = FeedForward(c.d_model, c.ff_dim, c.activation_dropout, c.activation)
        self.r1 = Residual(c.d_model, c.dropout, pre, c.norm_eps)
        self.r2 = Residual(c.d_model, c.dropout, pre, c.norm_eps)
        self.r3 = Residual(c.d_model, c.dropout, pre, c.norm_eps)

    def forward(self, x, mem_k, mem_v, src_mask, cache=None, t: int = 0, beam: int = 1, weights=None):
        # x (N, T, D). Without cache: causal over T. With cache (k, v buffers
        # (N, H, Tmax, dh)): T == 1, the new position is written at t.
        a = self.self_attn

        def self_attention(h):
            q, k, v = a.project_qkv(h)
            if cache is None:
                o = a.attend(q, k, v, causal=True)
            else:
                ck, cv = cache
                ck[:, :, t: t + 1] = k
                cv[:, :, t: t + 1] = v
                o = a.attend(q, ck[:, :, : t + 1], cv[:, :, : t + 1])
            return a.out(a.merge(o))

        def cross_attention(h):
            c = self.cross_attn
            o = c.attend(c.split(c.q(h)), mem_k, mem_v, src_mask, weights=weights, group=beam)
            return c.out(c.merge(o))

        x = self.r1(x, self_attention)
        x = self.r2(x, cross_attention)
        return self.r3(x, self.ff)


@dataclass
class TransformerState:
    mem_kv: list                # per layer (k, v), each (B, H, S, dh): projected once
    src_mask: torch.Tensor      # (B, 1, 1, S)
    cache: list                 # per layer (k, v) buffers, each (B*beam, H, max_len, dh)
    t: int                      # positions decoded so far
    beam: int
    attention: list | None      # if recording: per step, per layer (N, H, S) cross-attention
    spare: list | None = None   # buffers shaped like `cache` that the next beam reorder fills


class EncoderStack(EncoderDecoderModel):
    """`encode` over `src_embed`, `encoder` (EncoderLayers) and `enc_norm`.

    The Transformer and the encoder-only families (models/encoder.py) build
    these three under the same names, so encoder weights load across them
    (`train.init_from`, `model.init_encoder`).
    """

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        # src (B, S) ids; src_mask (B, S) True at real tokens
        assert src.shape == src_mask.shape and src.dim() == 2, (src.shape, src_mask.shape)
        return self.encode_embedded(self.src_embed(src), src_mask)

    def encode_embedded(self, x: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        """The stack over embedded inputs x (B, S, D) (vector front-ends: models/series.py)."""
        mask = src_mask[:, None, None, :]
        for layer in self.encoder:
            x = layer(x, mask)
        return EncoderOutput(self.enc_norm(x), src_mask)  # states (B, S, D)

    def init_pretrained(self, source, target) -> list[str]:
        """Load `model.init_encoder` (see models/bert.py); returns what was loaded, for the log."""
        if not self.config.init_encoder:
            return []
        from transduce.models.bert import load_bert

        return load_bert(self, self.config, source, target)


class Transformer(EncoderStack):
    def __init__(self, c: TransformerConfig, src_vocab: int, tgt_vocab: int):
        super().__init__()
        self.config = c
        d = c.d_model
        tgt_tokens = nn.Embedding(tgt_vocab, d, padding_idx=0)
        if c.share_embeddings:
            if src_vocab != tgt_vocab:
                raise ValueError("share_embeddings needs one vocabulary for source and target")
            src_tokens = tgt_tokens
        else:
            src_tokens = nn.Embedding(src_vocab, d, padding_idx=0)
        self.src_embed = stack_embedding(c, src_vocab, src_tokens)
        self.tgt_embed = stack_embedding(c, tgt_vocab, tgt_tokens)
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        self.enc_norm = final_norm(c)
        self.dec_norm = final_norm(c)
        self.output = nn.Linear(d, tgt_vocab, bias=c.output_bias)
        self.start = DECODER_STARTS[c.decoder_start]
        init_weights(self)
        if c.tie_output:
            self.output.weight = tgt_tokens.weight

    # -- training -----------------------------------------------------------
    def forward(self, batch) -> torch.Tensor:
        memory = self.encode(batch.src, batch.src_mask)
        mask = memory.mask[:, None, None, :]
        tgt_in, extra = self.decoder_input(batch.tgt_in)
        x = self.tgt_embed(tgt_in)  # (B, T + extra, D)
        states = bf16_twin(memory.states)  # a post-norm stack's last Residual's bf16 copy under autocast
        for layer in self.decoder:
            k, v = layer.cross_attn.project_kv(states)
            x = layer(x, k, v, mask)
        return self.output(bf16_twin(self.dec_norm(x[:, extra:])))  # (B, T, V)

    def decoder_input(self, tgt_in: torch.Tensor) -> tuple[torch.Tensor, int]:
        """tgt_in (B, T), <s> y1 .. with <s> replaced by the decoder's start (model.decoder_start),
        and how many positions the start adds (their outputs are not predictions of y)."""
        if self.start == (BOS,):
            return tgt_in, 0
        x = tgt_in.clone()
        x[:, 0] = self.start[-1]
        extra = len(self.start) - 1
        if extra:
            x = torch.cat([x.new_tensor(self.start[:-1]).expand(x.shape[0], extra), x], 1)
        return x, extra

    # -- search interface ---------------------------------------------------
    def max_output_len(self, src_mask: torch.Tensor) -> torch.Tensor:
        # the start (<s>) and the outputs before the last take positions 0..max_positions-1
        return torch.full((src_mask.shape[0],), self.config.max_positions - len(self.start), dtype=torch.long)

    def init_state(self, memory: EncoderOutput, beam: int, max_len: int,
                   record_attention: bool = False) -> TransformerState:
        b = memory.states.shape[0]
        c = self.config
        dh = c.d_model // c.heads
        # Contiguous (B, H, S, dh): the split heads of one projection are strided, and the per-step
        # matmuls would copy them to fold B and H at every step.
        mem_kv = [tuple(t.contiguous() for t in layer.cross_attn.project_kv(memory.states)) for layer in self.decoder]
        like = memory.states
        # positions are written before they are read: no need to clear them
        max_len += len(self.start) - 1
        cache = [(like.new_empty(b * beam, c.heads, max_len, dh), like.new_empty(b * beam, c.heads, max_len, dh))
                 for _ in self.decoder]
        return TransformerState(mem_kv, memory.mask[:, None, None, :], cache, 0, beam,
                                [] if record_attention else None)

    def step(self, tokens: torch.Tensor, state: TransformerState) -> tuple[torch.Tensor, TransformerState]:
        # tokens (N,) with N = B * beam -> logits (N, V); the first (<s>) stands for the decoder's start
        if state.t == 0 and self.start != (BOS,):
            for tok in self.start[:-1]:  # positions before the last start token: their outputs go unused
                self._step(torch.full_like(tokens, tok), state)
                if state.attention is not None:
                    state.attention.pop()
            tokens = torch.full_like(tokens, self.start[-1])
        return self._step(tokens, state)

    def _step(self, tokens: torch.Tensor, state: TransformerState) -> tuple[torch.Tensor, TransformerState]:
        x = self.tgt_embed(tokens[:, None], start=state.t)
        weights = [] if state.attention is not None else None
        for layer, (k, v), cache in zip(self.decoder, state.mem_kv, state.cache):
            x = layer(x, k, v, state.src_mask, cache=cache, t=state.t, beam=state.beam, weights=weights)
        if weights is not None:
            state.attention.append([w[:, :, 0] for w in weights])  # per layer (N, H, S)
        state.t += 1
        return self.output(self.dec_norm(x[:, 0])), state

    def reorder_state(self, state: TransformerState, rows: torch.Tensor | None,
                      batch: torch.Tensor | None = None) -> TransformerState:
        """Keep cache rows `rows` (beam selection); keep sources `batch` (finished ones dropped)."""
        if batch is not None:
            state.mem_kv = [(k.index_select(0, batch), v.index_select(0, batch)) for k, v in state.mem_kv]
            state.src_mask = state.src_mask.index_select(0, batch)
        if rows is None:
            return state
        state.cache, state.spare = reorder_cache(state.cache, rows, state.t, state.spare)
        return state

    def describe(self) -> dict:
        c = self.config
        return {
            "family": c.family,
            "d_model": c.d_model, "heads": c.heads, "ff_dim": c.ff_dim,
            "encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers,
            "parameters": sum(p.numel() for p in self.parameters()),
        }
