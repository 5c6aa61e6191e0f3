"""Transformer encoder-decoder (Vaswani et al. 2017) with a key/value cache for search."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from transduce import kernels
from transduce.models.base import EncoderDecoderModel, EncoderOutput
from transduce.models.layers import (Attention, Embedding, FeedForward, GatedActivation, Residual, bf16_twin,
                                     init_weights, reorder_cache)
from transduce.models.quantize import Int8Linear


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
    activation: Literal["relu", "gelu", "geglu", "swiglu"] = "relu"  # geglu, swiglu: gated (models/layers.py)
    norm: Literal["pre", "post"] = "pre"  # pre-norm trains stably without long warmup
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
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


_NO_ROWS = torch.empty(0, dtype=torch.long)
_EMPTY = torch.empty(0)


def _gather_cache(state: "TransformerState", dtype: torch.dtype) -> None:
    """Cache buffers in hypothesis order and in `dtype`, from the table `state.rows` (or as they are),
    for the modules' path."""
    t = state.t
    n = state.cache[0][0].shape[0] if state.rows is None else state.rows.shape[0]
    table = torch.arange(n)[:, None].expand(n, t) if state.rows is None else state.rows[:, :t]
    cache = []
    for k, v in state.cache:
        _, h, tmax, dh = k.shape
        # flat index of (row, head, position) in the (N, H, T_max, dh) buffers, one row of dh each
        idx = (table[:, None, :] * (h * tmax) + torch.arange(h)[None, :, None] * tmax + torch.arange(t)).view(-1)
        k2, v2 = k.new_empty((n, h, tmax, dh), dtype=dtype), v.new_empty((n, h, tmax, dh), dtype=dtype)
        k2[:, :, :t] = k.view(-1, dh).index_select(0, idx).view(n, h, t, dh)
        v2[:, :, :t] = v.view(-1, dh).index_select(0, idx).view(n, h, t, dh)
        cache.append((k2, v2))
    state.cache, state.rows, state.spare = cache, None, None


def _linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) for x (rows, in) float32, without the module call's overhead for an nn.Linear or an int8
    copy's Int8Linear (models/quantize.py)."""
    t = type(m)
    if t is nn.Linear:
        return F.linear(x, m.weight, m.bias)
    if t is Int8Linear:
        return kernels.ops().int8_linear(x, *m.packed)
    return m(x)


def _unbiased(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T, b) for an nn.Linear or an Int8Linear, whose bias the next kernel adds in its own pass;
    (m(x), empty) for other modules."""
    t = type(m)
    if t is nn.Linear:
        return F.linear(x, m.weight), (_EMPTY if m.bias is None else m.bias)
    if t is Int8Linear:
        w, scale, bias = m.packed
        return kernels.ops().int8_linear(x, w, scale, _EMPTY), bias
    return m(x), _EMPTY


def _ffn(ops, ff: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down(act(up(x))) without down's bias, down's bias), for the next kernel to add: one kernel
    call, in row blocks whose hidden layer stays in cache (an int8 copy's as int8)."""
    up, down, act = ff.up, ff.down, ff.act
    code = _GATES.get(act.gate) if type(act) is GatedActivation else _ACTS.get(
        (type(act), getattr(act, "approximate", "none")))
    if code is not None and type(up) is type(down):
        if type(up) is nn.Linear:
            return (ops.ffn(x, up.weight, _EMPTY if up.bias is None else up.bias, code, down.weight),
                    _EMPTY if down.bias is None else down.bias)
        if type(up) is Int8Linear:
            (w1, s1, b1), (w2, s2, b2) = up.packed, down.packed
            return ops.int8_ffn(x, w1, s1, b1, code, w2, s2), b2
    return _unbiased(ff.down, ff.act(_linear(ff.up, x)))


_ACTS = {(nn.ReLU, "none"): 1, (nn.GELU, "none"): 2}  # the feed-forward kernels' activation codes
_GATES = {"gelu": 3, "silu": 4}  # and their gated units' (GEGLU, SwiGLU), by the gate's function


def _norm(norm: nn.LayerNorm) -> tuple:
    return norm.weight, norm.bias, norm.eps


@dataclass
class TransformerState:
    mem_kv: list                # per layer (k, v), each (B, H, S, dh): projected once
    src_mask: torch.Tensor      # (B, 1, 1, S)
    cache: list                 # per layer (k, v) buffers, each (B*beam, H, max_len, dh)
    t: int                      # positions decoded so far
    beam: int
    attention: list | None      # if recording: per step, per layer (N, H, S) cross-attention
    spare: list | None = None   # buffers shaped like `cache` that the next beam reorder fills
    # (N, max_len) int64 or None: with the CPU kernels, reorders (beams selected, sources dropped)
    # leave the cache where it is and reorder this table instead: position j < t of hypothesis n
    # lies in cache row rows[n, j]. The cache may then have more rows than there are hypotheses.
    rows: torch.Tensor | None = None


class EncoderStack(EncoderDecoderModel):
    """`encode` over `src_embed`, `encoder` (EncoderLayers) and `enc_norm`.

    The Transformer and the encoder-only families (models/encoder.py) build
    these three under the same names, so encoder weights load across them
    (`train.init_from`, `model.init_encoder`).
    """

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        # src (B, S) ids; src_mask (B, S) True at real tokens
        assert src.shape == src_mask.shape and src.dim() == 2, (src.shape, src_mask.shape)
        x = self.src_embed(src)
        if not self.training and not torch.is_grad_enabled() and x.device.type == "cpu" \
                and x.dtype == torch.float32 and src_mask.dtype == torch.bool:
            ops = kernels.ops()
            if ops is not None:
                return EncoderOutput(self._kernel_encode(ops, x, src_mask.contiguous()), src_mask)
        mask = src_mask[:, None, None, :]
        for layer in self.encoder:
            x = layer(x, mask)
        return EncoderOutput(self.enc_norm(x), src_mask)  # states (B, S, D)

    def _kernel_encode(self, ops, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder layers for inference on the CPU kernels, on (B * S, D) rows: attention in one
        pass per row and head, the output projections' biases, residual adds and LayerNorms in one
        pass each (see Transformer._kernel_step). x (B, S, D) embedded; mask (B, S) bool."""
        c = self.config
        b, s, d = x.shape
        heads, scale = c.heads, (d // c.heads) ** -0.5
        layers = list(self.encoder)
        pre = c.norm == "pre"
        x = x.reshape(b * s, d)
        h = F.layer_norm(x, (d,), *_norm(layers[0].r1.norm)) if pre else x
        for i, layer in enumerate(layers):
            a, ff = layer.attn, layer.ff
            qkv = _linear(a.qkv, h).view(b, s, 3 * d)
            q, k, v = (t.view(b, s, heads, d // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
            o = ops.attend(q, k, v, mask, 1, False, scale).view(b * s, d)
            if pre:
                h, x = ops.add_norm(x, *_unbiased(a.out, o), *_norm(layer.r2.norm), True)
                last = layers[i + 1].r1.norm if i + 1 < len(layers) else self.enc_norm
                h, x = ops.add_norm(x, *_ffn(ops, ff, h), *_norm(last), True)
            else:
                h = x = ops.add_norm(x, *_unbiased(a.out, o), *_norm(layer.r1.norm), False)[0]
                h = x = ops.add_norm(x, *_ffn(ops, ff, h), *_norm(layer.r2.norm), False)[0]
        return (h if pre else self.enc_norm(x)).view(b, s, d)

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
        self.output = nn.Linear(d, tgt_vocab, bias=False)
        init_weights(self)
        if c.tie_output:
            self.output.weight = tgt_tokens.weight

    # -- training -----------------------------------------------------------
    def forward(self, batch) -> torch.Tensor:
        memory = self.encode(batch.src, batch.src_mask)
        mask = memory.mask[:, None, None, :]
        x = self.tgt_embed(batch.tgt_in)  # (B, T, D)
        states = bf16_twin(memory.states)  # a post-norm stack's last Residual's bf16 copy under autocast
        for layer in self.decoder:
            k, v = layer.cross_attn.project_kv(states)
            x = layer(x, k, v, mask)
        return self.output(bf16_twin(self.dec_norm(x)))  # (B, T, V)

    # -- search interface ---------------------------------------------------
    def max_output_len(self, src_mask: torch.Tensor) -> torch.Tensor:
        # <s> and the outputs before the last take positions 0..max_positions-1
        return torch.full((src_mask.shape[0],), self.config.max_positions - 1, dtype=torch.long)

    def init_state(self, memory: EncoderOutput, beam: int, max_len: int,
                   record_attention: bool = False) -> TransformerState:
        b = memory.states.shape[0]
        c = self.config
        dh = c.d_model // c.heads
        # Contiguous (B, H, S, dh): the split heads of one projection are strided, and the per-step
        # matmuls would copy them to fold B and H at every step.
        mem_kv = [tuple(t.contiguous() for t in layer.cross_attn.project_kv(memory.states)) for layer in self.decoder]
        like = memory.states
        # An int8 copy keeps its keys and values in bfloat16 for the kernel step (quantize sets
        # kernel_cache_dtype): half the bytes a beam's step reads, within its int8 rounding.
        dtype = like.dtype
        if getattr(self, "kernel_cache_dtype", None) is not None and self._kernel_ready(like, record_attention):
            dtype = self.kernel_cache_dtype
        # positions are written before they are read: no need to clear them
        cache = [(like.new_empty(b * beam, c.heads, max_len, dh, dtype=dtype),
                  like.new_empty(b * beam, c.heads, max_len, dh, dtype=dtype)) for _ in self.decoder]
        return TransformerState(mem_kv, memory.mask[:, None, None, :], cache, 0, beam,
                                [] if record_attention else None)

    def _kernel_ready(self, like: torch.Tensor, record_attention: bool) -> bool:
        """Whether decoding steps run on the CPU kernels (`_kernel_step`)."""
        return not record_attention and not self.training and not torch.is_grad_enabled() \
            and like.device.type == "cpu" and self.tgt_embed.tokens.weight.dtype == torch.float32 \
            and kernels.ops() is not None

    def step(self, tokens: torch.Tensor, state: TransformerState) -> tuple[torch.Tensor, TransformerState]:
        # tokens (N,) with N = B * beam -> logits (N, V)
        if self._kernel_ready(tokens, state.attention is not None):
            return self._kernel_step(kernels.ops(), tokens, state), state
        dtype = state.mem_kv[0][0].dtype
        if state.rows is not None or state.cache[0][0].dtype != dtype:  # as the modules keep it
            _gather_cache(state, dtype)
        x = self.tgt_embed(tokens[:, None], start=state.t)
        weights = [] if state.attention is not None else None
        for layer, (k, v), cache in zip(self.decoder, state.mem_kv, state.cache):
            x = layer(x, k, v, state.src_mask, cache=cache, t=state.t, beam=state.beam, weights=weights)
        if weights is not None:
            state.attention.append([w[:, :, 0] for w in weights])  # per layer (N, H, S)
        state.t += 1
        return self.output(self.dec_norm(x[:, 0])), state

    def _kernel_step(self, ops, tokens: torch.Tensor, state: TransformerState) -> torch.Tensor:
        """`step` for inference on the CPU kernels (transduce/kernels): the same computation on
        (N, D) rows, with a sublayer's residual add, its projection's bias and LayerNorm in one
        pass, and the new key and value (plus their biases) written into the cache by the
        self-attention kernel. A step's work is a few hundred kB per op, where the module path's
        ~300 small tensor ops (views, copies, separate adds and norms) cost as much as the matmuls."""
        c, e = self.config, self.tgt_embed
        t = state.t
        if t >= e.max_positions:
            raise ValueError(f"sequence of {t + 1} positions exceeds model.max_positions={e.max_positions}")
        pos = e.positions.weight[t] if e.positions is not None else e.table[t]
        x = F.embedding(tokens, e.tokens.weight)
        x = torch.add(pos, x, alpha=e.scale) if e.scale != 1.0 else x + pos
        if isinstance(e.norm, nn.LayerNorm):
            x = F.layer_norm(x, (c.d_model,), *_norm(e.norm))
        mask = state.src_mask.view(state.src_mask.shape[0], -1)
        scale = (c.d_model // c.heads) ** -0.5
        pre = c.norm == "pre"
        table = _NO_ROWS if state.rows is None else state.rows
        layers = list(self.decoder)
        if pre:
            h = F.layer_norm(x, (c.d_model,), *_norm(layers[0].r1.norm))
        for i, (layer, (mk, mv), (ck, cv)) in enumerate(zip(layers, state.mem_kv, state.cache)):
            sa, ca, ff = layer.self_attn, layer.cross_attn, layer.ff
            # projections leave their biases to the kernel that reads their output (_unbiased)
            if pre:  # x: the residual stream; h: its normalised copy, the sublayer's input
                a = ops.self_step(*_unbiased(sa.qkv, h), ck, cv, t, scale, table)
                h, x = ops.add_norm(x, *_unbiased(sa.out, a), *_norm(layer.r2.norm), True)
                a = ops.attend_step(_linear(ca.q, h), mk, mv, mask, state.beam, scale)
                h, x = ops.add_norm(x, *_unbiased(ca.out, a), *_norm(layer.r3.norm), True)
                last = layers[i + 1].r1.norm if i + 1 < len(layers) else self.dec_norm
                h, x = ops.add_norm(x, *_ffn(ops, ff, h), *_norm(last), True)
            else:
                a = ops.self_step(*_unbiased(sa.qkv, x), ck, cv, t, scale, table)
                x = ops.add_norm(x, *_unbiased(sa.out, a), *_norm(layer.r1.norm), False)[0]
                a = ops.attend_step(_linear(ca.q, x), mk, mv, mask, state.beam, scale)
                x = ops.add_norm(x, *_unbiased(ca.out, a), *_norm(layer.r2.norm), False)[0]
                x = ops.add_norm(x, *_ffn(ops, ff, x), *_norm(layer.r3.norm), False)[0]
        state.t += 1
        return _linear(self.output, h if pre else self.dec_norm(x))

    def reorder_state(self, state: TransformerState, rows: torch.Tensor | None,
                      batch: torch.Tensor | None = None) -> TransformerState:
        """Keep cache rows `rows` (beam selection); keep sources `batch` (finished ones dropped)."""
        if batch is not None:
            state.mem_kv = [(k.index_select(0, batch), v.index_select(0, batch)) for k, v in state.mem_kv]
            state.src_mask = state.src_mask.index_select(0, batch)
        if rows is None:
            return state
        cache = state.cache[0][0]
        if state.rows is None and state.attention is None and cache.dtype in (torch.float32, torch.bfloat16) \
                and cache.device.type == "cpu" and kernels.ops() is not None:
            state.rows = torch.arange(cache.shape[0])[:, None].repeat(1, cache.shape[2])
        if state.rows is None:
            state.cache, state.spare = reorder_cache(state.cache, rows, state.t, state.spare)
        else:  # the table follows the hypotheses, the cache stays (the kernel set rows[n, t - 1] = n);
            # with sources dropped, hypothesis i writes its next positions into cache row i: no
            # hypothesis reads a row's position before its own step has written it
            state.rows = state.rows.index_select(0, rows)
        return state

    def describe(self) -> dict:
        c = self.config
        return {
            "family": c.family,
            "d_model": c.d_model, "heads": c.heads, "ff_dim": c.ff_dim,
            "encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers,
            "parameters": sum(p.numel() for p in self.parameters()),
        }
