"""int8 inference on CPU: a copy of a trained model whose linear layers multiply in int8.

Weights are quantized once, per output channel (symmetric: the largest
magnitude of a row maps to 127); activations are quantized per row at each
call from their own largest magnitude, as CTranslate2 does. The product runs
in int8 with int32 sums (`torch._int_mm`: oneDNN's AVX-512 VNNI kernels where
the CPU has them), then is scaled back to float32. With the CPU kernels
built, quantizing, multiplying and scaling back are one op
(transduce/kernels/linear.cpp); otherwise PyTorch's ops do the same
arithmetic. An output layer whose weight is tied to an embedding stays in
float32 while its vocabulary is small (the embedding keeps its float32 table
either way): there it costs little and its scores rank the outputs; over a
subword vocabulary it is the largest product of a decoding step, and it gets
an int8 copy of its own, as CTranslate2 quantizes it. For decoding only; the
copy cannot be trained.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from transduce import kernels, precision

QUANTIZATIONS = ("int8",)
# CPU flags of native int8 dot products: AVX-512 VNNI, AVX-VNNI (VEX), AMX int8 tiles
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

log = logging.getLogger("transduce")


def native_int8() -> bool:
    """Whether this CPU multiplies int8 natively. Without VNNI or AMX, `torch._int_mm` falls back to
    a slow path, much slower than float32 (docs/speed.md, "int8")."""
    return bool(set(INT8_FLAGS) & precision.cpu_flags())


def resolve(kind: str | None) -> str | None:
    """`decode.quantize` for this machine: "auto" is "int8" where the CPU multiplies int8 natively
    and None (float32) elsewhere; "none" is None; "int8" stays, with a warning where it is slow."""
    if kind in (None, "none"):
        return None
    if kind == "auto":
        chosen = "int8" if native_int8() else None
        log.info("decode.quantize auto: %s", "int8 (the CPU has VNNI or AMX int8)" if chosen else
                 "float32 (the CPU has no VNNI or AMX int8, where int8 products are slower than float32)")
        return chosen
    if kind == "int8" and not native_int8():
        log.warning("int8 decoding on a CPU without VNNI or AMX int8 (flags %s): PyTorch's int8 products are "
                    "slow here, float32 decodes faster; decode.quantize: auto chooses by the hardware",
                    "/".join(INT8_FLAGS))
    return kind

_EMPTY = torch.empty(0)
# Tied output layers with at least this many rows (vocabulary entries) are quantized too.
TIED_INT8_ROWS = 1024


def _tied(model: nn.Module) -> set[int]:
    """ids of the weight tensors that embeddings own."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (int8 (M, K), scale (M,)) with x ~ q * scale[:, None]; a zero row gives zeros."""
    top = x.abs().amax(1)
    inv = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    return (x * inv[:, None]).round().to(torch.int8), top / 127.0


class Int8Linear(nn.Module):
    """An nn.Linear's inference in int8: y = dequantize(q(x) @ q(W)^T) + b.

    qweight (out, in) int8 and scale (out,) hold the weight; bias stays
    float32. `unbiased(x)` returns the product and the bias apart, for a
    kernel that adds the bias in its own pass (models/transformer.py).
    `packed` holds (the kernels' weight, scale, bias or an empty tensor)
    as a plain attribute: the kernel paths read it once per call, where a
    buffer goes through nn.Module's attribute lookup. The kernels' weight
    is qweight, or on a CPU with AMX int8 tiles its copy in the tiles'
    layout (`int8_pack`, 3-D; the buffers and checkpoints keep qweight).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight.detach().float())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self._pack()

    def _pack(self):
        ops = kernels.ops() if kernels.int8_tiles() and self.qweight.device.type == "cpu" else None
        weight = self.qweight if ops is None else ops.int8_pack(self.qweight)  # the tiles' layout (AMX)
        self.packed = (weight, self.scale, _EMPTY if self.bias is None else self.bias)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cpu(), ...: the buffers are new tensors
        out = super()._apply(fn, *args, **kwargs)
        self._pack()
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, self.bias)

    def unbiased(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._product(x, None), (_EMPTY if self.bias is None else self.bias)

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        ops = kernels.ops() if x.device.type == "cpu" else None
        if ops is not None:
            if x.stride(1) != 1:
                x = x.contiguous()
            y = ops.int8_linear(x, self.packed[0], self.scale, _EMPTY if bias is None else bias)
        else:
            q, rows = quantize_rows(x)
            y = torch._int_mm(q, self.qweight.t()).float() * (rows[:, None] * self.scale)
            if bias is not None:
                y = y + bias
        return y.view(*lead, self.out_features)


def quantize(model: nn.Module, kind: str = "int8") -> nn.Module:
    """A quantized copy of `model` (the model itself is left as it is)."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {kind!r}; valid choices: {', '.join(QUANTIZATIONS)}")
    out = copy.deepcopy(model).eval()
    tied = _tied(out)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and (id(child.weight) not in tied or child.out_features >= TIED_INT8_ROWS):
                setattr(parent, name, Int8Linear(child))
    out.quantization = kind
    return out
