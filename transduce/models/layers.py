"""Transformer building blocks shared by every attention-based family."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from transduce import kernels


def sinusoidal_table(n: int, d: int, halves: bool = False) -> torch.Tensor:
    """(n, d) fixed sinusoidal position encodings (Vaswani et al. 2017): sines and cosines of each
    frequency side by side, or (`halves`) all sines, then all cosines (Marian, fairseq)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    sines, cosines = (slice(0, (d + 1) // 2), slice((d + 1) // 2, d)) if halves else (slice(0, d, 2), slice(1, d, 2))
    table[:, sines] = torch.sin(pos * div)
    table[:, cosines] = torch.cos(pos * div[: d // 2])
    return table


class Dropout(nn.Module):
    """Inverted dropout with the mask drawn from random bytes.

    PyTorch's CPU dropout draws one float per element from a serial generator,
    a large share of a small model's training step; filling int64s gives 8
    random bytes per draw. On the CPU the
    kernel (kernels/dropout.cpp) goes further: one pass, the bytes hashed from
    a seed and the element's index, so backward recomputes the mask instead
    of storing it. The drop probability is rounded to a multiple of 1/256
    (0.1 -> 26/256).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        out = kernels.dropout(x, self.threshold)
        if out is not None:
            return out
        n = x.numel()
        bytes_ = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device).random_()
        keep = bytes_.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        return torch.where(keep, x * (256.0 / (256 - self.threshold)), 0.0)

    def extra_repr(self) -> str:
        return f"p={self.threshold}/256"


class Embedding(nn.Module):
    """Token embedding scaled by sqrt(d), plus sinusoidal or learned positions, then dropout.

    `positions`: "learned", "sinusoidal" (sines and cosines interleaved) or
    "sinusoidal_halves" (sines, then cosines: Marian's table).

    BERT-style embeddings leave the tokens unscaled (`scale=False`) and add a
    LayerNorm before the dropout (`norm=True`).
    """

    def __init__(self, vocab: int, d: int, positions: str, max_positions: int, dropout: float,
                 tokens: nn.Embedding | None = None, scale: bool = True, norm: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        self.tokens = tokens if tokens is not None else nn.Embedding(vocab, d, padding_idx=0)
        self.scale = math.sqrt(d) if scale else 1.0
        self.norm = nn.LayerNorm(d, eps=eps) if norm else nn.Identity()
        if positions == "learned":
            self.positions = nn.Embedding(max_positions, d)
        else:
            self.positions = None
            self.register_buffer("table", sinusoidal_table(max_positions, d, positions == "sinusoidal_halves"),
                                 persistent=False)
        self.max_positions = max_positions
        self.dropout = Dropout(dropout)

    def forward(self, ids: torch.Tensor, start: int = 0, pos_ids: torch.Tensor | None = None) -> torch.Tensor:
        # ids (B, T) -> (B, T, D); positions start..start+T-1, or per token from pos_ids (B, T)
        if pos_ids is not None:
            assert pos_ids.shape == ids.shape, (pos_ids.shape, ids.shape)
            n = int(pos_ids.max()) + 1 if pos_ids.numel() else 0
            if n > self.max_positions:
                raise ValueError(f"sequence of {n} positions exceeds model.max_positions={self.max_positions}")
            table = self.positions.weight if self.positions is not None else self.table
            return self.dropout(self.norm(self.tokens(ids) * self.scale + table[pos_ids]))
        t = ids.shape[1]
        if start + t > self.max_positions:
            raise ValueError(f"sequence of {start + t} positions exceeds model.max_positions={self.max_positions}")
        if self.positions is not None:
            pos = self.positions.weight[start: start + t]
        else:
            pos = self.table[start: start + t]
        return self.dropout(self.norm(self.tokens(ids) * self.scale + pos))


# Queries per row up to which inference attention uses plain matmuls instead of the fused kernel.
DECODE_QUERIES = 8


class Attention(nn.Module):
    """Multi-head attention on `F.scaled_dot_product_attention`.

    Self-attention projects q, k, v with one matmul; cross-attention projects
    k, v of the memory once (`project_kv`) and reuses them at every step.
    """

    def __init__(self, d: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        assert d % heads == 0, "d_model must be divisible by heads"
        self.h, self.dh = heads, d // heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(d, d)
            self.kv = nn.Linear(d, 2 * d)
        else:
            self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.dropout = dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, D) -> (B, H, T, dh)
        return x.view(b, t, self.h, self.dh).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = x.shape  # (B, H, T, dh) -> (B, T, D)
        return x.transpose(1, 2).reshape(b, t, self.h * self.dh)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_heads(self.kv(memory), 2, self.h)

    def project_qkv(self, x: torch.Tensor):
        return split_heads(self.qkv(x), 3, self.h)

    def attend(self, q, k, v, mask=None, causal=False, weights: list | None = None, group: int = 1) -> torch.Tensor:
        """q (N, H, Tq, dh), k/v (M, H, Tk, dh) with N = M * group: query row n reads memory row
        n // group (the beams of a source share its memory, never copied). mask broadcastable to
        (M, H, Tq, Tk), True = attend. Returns (N, H, Tq, dh).

        Inference (no dropout, no gradient, no weights asked for) runs the fused CPU kernel
        (transduce/kernels) where it applies.
        """
        p = self.dropout if self.training else 0.0
        if p == 0.0 and weights is None:
            out = kernels.attend(q, k, v, mask, group, causal, self.dh ** -0.5)
            if out is not None:
                return out
        n, h, tq, dh = q.shape
        m = n // group
        if group > 1:  # fold the group into the query axis: (M, H, group * Tq, dh)
            q = q.view(m, group, h, tq, dh).transpose(1, 2).reshape(m, h, group * tq, dh)
        out = self._attend(q, k, v, mask, causal, weights, p)
        if group > 1:
            out = out.view(m, h, group, tq, dh).transpose(1, 2).reshape(n, h, tq, dh)
            if weights is not None:
                s = weights[-1].shape[-1]
                weights[-1] = weights[-1].view(m, h, group, tq, s).transpose(1, 2).reshape(n, h, tq, s)
        return out

    def _attend(self, q, k, v, mask, causal, weights, p) -> torch.Tensor:
        if weights is not None:
            # Explicit softmax so the weights can be returned (attention inspection only).
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
            if causal:
                tq, tk = scores.shape[-2:]
                mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(-1)
            weights.append(probs)
            return probs @ v
        if p == 0.0 and torch.is_grad_enabled():
            # Training (or any pass that needs gradients) on short rows: the training kernel beats
            # PyTorch's flash kernel there (kernels.TRAIN_MAX_KEYS).
            out = kernels.attend_train(q, k, v, mask, causal, self.dh ** -0.5)
            if out is not None:
                return out
        if not self.training and not causal and q.shape[-2] <= DECODE_QUERIES:
            # A decoding step (a query or a few per row against short keys): plain matmuls beat the
            # SDPA kernel's per-row set-up.
            scores = (q @ k.transpose(-1, -2)).mul_(self.dh ** -0.5)
            if mask is not None:
                scores.masked_fill_(~mask, float("-inf"))
            return scores.softmax(-1) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)


def split_heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """A fused projection's output (B, T, parts * D) as `parts` tensors of split heads (B, H, T, dh),
    views of x. Where x needs a gradient, the split's backward pass takes the training attention
    kernel's gradients as they come, side by side in one buffer of x's shape (kernels._TrainAttention),
    instead of concatenating them (chunk's backward pass)."""
    b, t, _ = x.shape
    if x.requires_grad and x.dim() == 3:
        return _SplitHeads.apply(x, parts, heads)
    return tuple(c.view(b, t, heads, -1).transpose(1, 2) for c in x.chunk(parts, dim=-1))


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parts, heads):
        b, t, n = x.shape
        ctx.parts, ctx.shape = parts, x.shape
        return tuple(c.view(b, t, heads, -1).transpose(1, 2) for c in x.chunk(parts, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        b, t, n = ctx.shape
        d = n // ctx.parts
        if all(g is not None for g in grads):
            first = grads[0]
            h, dh = first.shape[1], first.shape[3]
            whole = (first.stride() == (t * n, dh, n, 1) and h * dh == d
                     and all(g.shape == first.shape and g.stride() == first.stride() and g.dtype == first.dtype
                             and g.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                             and g.storage_offset() == first.storage_offset() + i * d for i, g in enumerate(grads)))
            if whole:  # the columns of one (B, T, n) buffer, in order: that buffer is x's gradient
                return first.as_strided((b, t, n), (t * n, n, 1), first.storage_offset()), None, None
        like = next(g for g in grads if g is not None)
        return torch.cat([(g if g is not None else torch.zeros_like(like)).transpose(1, 2).reshape(b, t, d)
                          for g in grads], dim=-1), None, None


class GatedActivation(nn.Module):
    """A gated linear unit's activation (Shazeer 2020, "GLU Variants Improve Transformer"): the last
    dimension holds the gate's projection, then the linear one's; act(gate) * linear, half as wide.
    GEGLU (T5 v1.1's "gated-gelu") gates by GELU, SwiGLU (LLaMA's) by SiLU."""

    def __init__(self, gate: str):
        super().__init__()
        self.gate = gate  # "gelu" or "silu"
        self.fn = F.gelu if gate == "gelu" else F.silu

    def forward(self, x):
        g, lin = x.chunk(2, dim=-1)
        return self.fn(g) * lin

    def extra_repr(self) -> str:
        return f"gate={self.gate}"


GATED_ACTIVATIONS = {"geglu": "gelu", "swiglu": "silu"}  # model.activation -> the gate's function
FUSED_ACTIVATIONS = ("relu", "gelu", "geglu", "swiglu")  # those the training kernel (kernels.bias_act) fuses


class FeedForward(nn.Module):
    """down(act(up(x))). With a gated activation ("geglu", "swiglu") `up` projects to 2 * ff (the gate's
    columns, then the linear ones') and the activation gates one half by the other: at ff_dim 2/3 of
    a plain block's, the same parameters and multiplications."""

    def __init__(self, d: int, ff: int, dropout: float, activation: str):
        super().__init__()
        self.gated = GATED_ACTIVATIONS.get(activation)  # the gate's function, or None
        self.up = nn.Linear(d, 2 * ff if self.gated else ff)
        self.down = nn.Linear(ff, d)
        self.act = (GatedActivation(self.gated) if self.gated else nn.GELU() if activation == "gelu"
                    else nn.SiLU() if activation == "silu" else nn.ReLU())
        self.dropout = Dropout(dropout)
        self.kernel_act = self.gated or activation  # bias_act's name for it
        self.fused = activation in FUSED_ACTIVATIONS

    def forward(self, x):
        up = self.up
        if (torch.is_grad_enabled() and type(up) is nn.Linear and (x.requires_grad or up.weight.requires_grad)
                and self.fused):
            # training: the projection without its bias, then the bias and activation in one kernel pass
            # each way, the derivative kept in the projection's output (docs/speed.md, "Training")
            h = F.linear(x, up.weight)
            a = kernels.bias_act(h, up.bias, self.kernel_act, overwrite=True, glu=self.gated is not None)
            if a is None:
                a = self.act(h if up.bias is None else h + up.bias)
        else:
            a = self.act(self.up(x))
        return self.down(self.dropout(a))


class Residual(nn.Module):
    """x + dropout(f(norm(x))) for pre-norm, norm(x + dropout(f(x))) for post-norm."""

    def __init__(self, d: int, dropout: float, pre_norm: bool, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x, f):
        if self.pre_norm:
            return x + self.dropout(f(self.norm(x)))
        y = f(bf16_twin(x))
        if torch.is_grad_enabled():  # training: the residual, dropout and norm in one kernel call each way
            r = kernels.add_norm_train(x, y, self.norm, self.dropout.threshold if self.training else 0)
            if r is not None:
                out, out16 = r
                if out16 is not None:
                    out.bf16_twin = out16
                return out
        return self.norm(x + self.dropout(y))


def bf16_twin(x: torch.Tensor) -> torch.Tensor:
    """x's bf16 rounding where a post-norm `Residual` made one with x (under bf16 autocast, on the
    kernels) and autocast is still on, else x. A projection given it skips autocast's cast of x, and
    its gradient goes back to the kernel in bf16, which adds it to x's (kernels.add_norm_train)."""
    twin = getattr(x, "bf16_twin", None)
    return twin if twin is not None and torch.is_autocast_enabled("cpu") else x


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear weights, N(0, 1/d) embeddings (scaled up by sqrt(d) in use), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, m.embedding_dim ** -0.5)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def reorder_cache(cache: list, rows: torch.Tensor, end: int, spare: list | None = None) -> tuple[list, list | None]:
    """Per layer (k, v) buffers (N, H, T_max, dh) with rows `rows`, positions [0, end) kept.

    Returns (cache, spare). Same row count (beam selection): the rows are
    gathered into `spare`, preallocated buffers of the same shape (made on the
    first call), in one pass; the old buffers become the next spare. Fewer
    rows (finished sources dropped): new buffers, and no spare. Only the
    positions written so far are copied.
    """
    n = rows.numel()
    if n == cache[0][0].shape[0]:
        if spare is None:
            spare = [(torch.empty_like(k), torch.empty_like(v)) for k, v in cache]
        for (k, v), (k2, v2) in zip(cache, spare):
            torch.index_select(k[:, :, :end], 0, rows, out=k2[:, :, :end])
            torch.index_select(v[:, :, :end], 0, rows, out=v2[:, :, :end])
        return spare, cache
    out = []
    for k, v in cache:
        k2, v2 = k.new_empty((n,) + k.shape[1:]), v.new_empty((n,) + v.shape[1:])
        torch.index_select(k[:, :, :end], 0, rows, out=k2[:, :, :end])
        torch.index_select(v[:, :, :end], 0, rows, out=v2[:, :, :end])
        out.append((k2, v2))
    return out, None
