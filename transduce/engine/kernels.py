"""The `kernels` engine: a trained Transformer's encoder and decoding step on the CPU kernels.

Built from the model's own modules (float32, or the int8 copy of
models/quantize.py), it computes what the modules compute on (rows, D)
matrices: a sublayer's residual add, its projection's bias and LayerNorm in
one pass (`add_norm`), attention in one pass per row and head, the new key and
value written into the cache by the self-attention kernel (`self_step`), a
feed-forward block in row blocks whose hidden layer stays in cache (`ffn`,
`int8_ffn`). Beam reorders leave the cache where it is and reorder a table of
rows instead. Search sees the model's interface (models/base.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transduce import kernels
from transduce.data.vocab import BOS
from transduce.models.base import EncoderOutput
from transduce.models.layers import GatedActivation
from transduce.models.quantize import Int8Linear
from transduce.models.transformer import EncoderStack, TransformerState

log = logging.getLogger("transduce")
_NO_ROWS = torch.empty(0, dtype=torch.long)
_EMPTY = torch.empty(0)
_ACTS = {(nn.ReLU, "none"): 1, (nn.GELU, "none"): 2}  # the feed-forward kernels' activation codes
_GATES = {"gelu": 3, "silu": 4}  # and their gated units' (GEGLU, SwiGLU), by the gate's function


def runs_on_kernels(model: nn.Module) -> str | None:
    """None where this engine runs `model`, else why not."""
    if not isinstance(model, EncoderStack):
        return f"it runs Transformer stacks, not a {type(model).__name__}"
    if model.training:
        return "the model is in training mode"
    if not isinstance(getattr(model.src_embed, "tokens", None), nn.Embedding):
        return "its inputs are real-valued vectors, not tokens"
    if len(getattr(model, "start", ())) > 1:
        return (f"model.decoder_start {model.config.decoder_start!r} reads more than one token before the "
                "first output")
    weight = model.src_embed.tokens.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return f"it runs float32 weights on the CPU (these are {weight.dtype} on {weight.device.type})"
    return None


def _linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) for x (rows, in) float32, without the module call's overhead for an nn.Linear or an
    Int8Linear."""
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


def _norm(norm: nn.LayerNorm) -> tuple:
    return norm.weight, norm.bias, norm.eps


def encode(ops, stack: EncoderStack, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
    """(B, S, D) the encoder's states of src (B, S) ids, mask (B, S) True at real tokens, on (B * S, D)
    rows."""
    c = stack.config
    x = stack.src_embed(src)
    mask = src_mask.contiguous()
    b, s, d = x.shape
    heads, scale = c.heads, (d // c.heads) ** -0.5
    layers = list(stack.encoder)
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
            last = layers[i + 1].r1.norm if i + 1 < len(layers) else stack.enc_norm
            h, x = ops.add_norm(x, *_ffn(ops, ff, h), *_norm(last), True)
        else:
            h = x = ops.add_norm(x, *_unbiased(a.out, o), *_norm(layer.r1.norm), False)[0]
            h = x = ops.add_norm(x, *_ffn(ops, ff, h), *_norm(layer.r2.norm), False)[0]
    return (h if pre else stack.enc_norm(x)).view(b, s, d)


@dataclass
class KernelState:
    mem_kv: list                # per layer (k, v), each (B, H, S, dh) contiguous: projected once
    src_mask: torch.Tensor      # (B, S) bool
    cache: list                 # per layer (k, v) buffers, each (rows, H, max_len, dh)
    t: int                      # positions decoded so far
    beam: int
    # (N, max_len) int64 or None (rows in order): position j < t of hypothesis n lies in cache row
    # rows[n, j]. Reorders (beams selected, sources dropped) reorder this table, not the cache, which
    # may then have more rows than there are hypotheses.
    rows: torch.Tensor | None = None


class _Engine:
    """What both kernel engines share: the model's modules, and the model where the kernels do not
    apply (passes with gradients, attention recorded)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.can_decode = model.can_decode
        self.ops = kernels.ops()

    def _encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        assert src.shape == src_mask.shape and src.dim() == 2, (src.shape, src_mask.shape)
        if torch.is_grad_enabled() or src_mask.dtype != torch.bool:
            return self.model.encode(src, src_mask)
        return EncoderOutput(encode(self.ops, self.model, src, src_mask), src_mask)

    def forward(self, batch) -> torch.Tensor:
        return self.model(batch)

    __call__ = forward

    def __getattr__(self, name: str):  # describe(), parameters(), quantization ...: the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


class KernelEncoderHead(_Engine):
    """An encoder-only model (a head on the encoder) with its encoder on the kernels."""

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        return self._encode(src, src_mask)

    def scores(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        return self.model.head_logits(self.encode(src, src_mask))


class KernelTransformer(_Engine):
    """A Transformer encoder-decoder's search interface on the kernels. Keys and values of an int8
    copy are cached in bfloat16 (`cache_dtype`): half the bytes a beam's step reads, within its int8
    rounding."""

    def __init__(self, model: nn.Module, cache_dtype: torch.dtype | None = None):
        super().__init__(model)
        quantized = any(type(m) is Int8Linear for m in model.modules())
        self.cache_dtype = cache_dtype or (torch.bfloat16 if quantized else torch.float32)
        self.start_token = getattr(model, "start", (BOS,))[0]

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        return self._encode(src, src_mask)

    def max_output_len(self, src_mask: torch.Tensor) -> torch.Tensor:
        return self.model.max_output_len(src_mask)

    def init_state(self, memory: EncoderOutput, beam: int, max_len: int, record_attention: bool = False):
        if record_attention and not getattr(self, "_said_attention", False):
            self._said_attention = True  # once per engine: the kernels' attention returns no weights
            log.info("cross-attention requested (alignments, coverage or replace_unk): the decoder steps on the "
                     "PyTorch modules, the encoder stays on the kernels")
        if record_attention or torch.is_grad_enabled():
            return self.model.init_state(memory, beam, max_len, record_attention)
        b, c = memory.states.shape[0], self.config
        dh = c.d_model // c.heads
        # contiguous (B, H, S, dh): the split heads of one projection are strided
        mem_kv = [tuple(t.contiguous() for t in layer.cross_attn.project_kv(memory.states))
                  for layer in self.model.decoder]
        like = memory.states
        # positions are written before they are read: no need to clear them
        cache = [(like.new_empty(b * beam, c.heads, max_len, dh, dtype=self.cache_dtype),
                  like.new_empty(b * beam, c.heads, max_len, dh, dtype=self.cache_dtype)) for _ in self.model.decoder]
        return KernelState(mem_kv, memory.mask.contiguous(), cache, 0, beam)

    def step(self, tokens: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """tokens (N,) with N = B * beam -> logits (N, V)."""
        if isinstance(state, TransformerState):
            return self.model.step(tokens, state)
        ops, m, c = self.ops, self.model, self.config
        e, t = m.tgt_embed, state.t
        if t == 0 and self.start_token != BOS:  # <s> stands for the decoder's start token (model.decoder_start)
            tokens = torch.full_like(tokens, self.start_token)
        if t >= e.max_positions:
            raise ValueError(f"sequence of {t + 1} positions exceeds model.max_positions={e.max_positions}")
        pos = e.positions.weight[t] if e.positions is not None else e.table[t]
        x = F.embedding(tokens, e.tokens.weight)
        x = torch.add(pos, x, alpha=e.scale) if e.scale != 1.0 else x + pos
        if isinstance(e.norm, nn.LayerNorm):
            x = F.layer_norm(x, (c.d_model,), *_norm(e.norm))
        scale = (c.d_model // c.heads) ** -0.5
        pre = c.norm == "pre"
        table = _NO_ROWS if state.rows is None else state.rows
        layers = list(m.decoder)
        if pre:
            h = F.layer_norm(x, (c.d_model,), *_norm(layers[0].r1.norm))
        for i, (layer, (mk, mv), (ck, cv)) in enumerate(zip(layers, state.mem_kv, state.cache)):
            sa, ca, ff = layer.self_attn, layer.cross_attn, layer.ff
            # projections leave their biases to the kernel that reads their output (_unbiased)
            if pre:  # x: the residual stream; h: its normalised copy, the sublayer's input
                a = ops.self_step(*_unbiased(sa.qkv, h), ck, cv, t, scale, table)
                h, x = ops.add_norm(x, *_unbiased(sa.out, a), *_norm(layer.r2.norm), True)
                a = ops.attend_step(_linear(ca.q, h), mk, mv, state.src_mask, state.beam, scale)
                h, x = ops.add_norm(x, *_unbiased(ca.out, a), *_norm(layer.r3.norm), True)
                last = layers[i + 1].r1.norm if i + 1 < len(layers) else m.dec_norm
                h, x = ops.add_norm(x, *_ffn(ops, ff, h), *_norm(last), True)
            else:
                a = ops.self_step(*_unbiased(sa.qkv, x), ck, cv, t, scale, table)
                x = ops.add_norm(x, *_unbiased(sa.out, a), *_norm(layer.r1.norm), False)[0]
                a = ops.attend_step(_linear(ca.q, x), mk, mv, state.src_mask, state.beam, scale)
                x = ops.add_norm(x, *_unbiased(ca.out, a), *_norm(layer.r2.norm), False)[0]
                x = ops.add_norm(x, *_ffn(ops, ff, x), *_norm(layer.r3.norm), False)[0]
        state.t += 1
        return _linear(m.output, h if pre else m.dec_norm(x)), state

    def reorder_state(self, state, rows: torch.Tensor | None, batch: torch.Tensor | None = None):
        """Keep hypotheses `rows` (beam selection); keep sources `batch` (finished ones dropped)."""
        if isinstance(state, TransformerState):
            return self.model.reorder_state(state, rows, batch)
        if batch is not None:
            state.mem_kv = [(k.index_select(0, batch), v.index_select(0, batch)) for k, v in state.mem_kv]
            state.src_mask = state.src_mask.index_select(0, batch)
        if rows is None:
            return state
        if state.rows is None:
            n, max_len = state.cache[0][0].shape[0], state.cache[0][0].shape[2]
            state.rows = torch.arange(n)[:, None].repeat(1, max_len)
        # the table follows the hypotheses, the cache stays (the kernel set rows[n, t - 1] = n); with
        # sources dropped, hypothesis i writes its next positions into cache row i: no hypothesis
        # reads a row's position before its own step has written it
        state.rows = state.rows.index_select(0, rows)
        return state
