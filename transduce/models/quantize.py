"""int8 inference on CPU: a copy of a trained model whose linear layers multiply in int8.

Weights are quantized once, per output channel; activations are quantized
per call from their range (dynamic quantization, PyTorch's fbgemm kernels,
which use AVX-512 VNNI where the CPU has it). Output layers whose weight is
tied to an embedding stay in float32: they are small and the scores they
produce rank the outputs. For decoding only; the copy cannot be trained.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

QUANTIZATIONS = ("int8",)


def _tied(model: nn.Module) -> set[int]:
    """ids of the weight tensors that embeddings own."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def quantize(model: nn.Module, kind: str = "int8") -> nn.Module:
    """A quantized copy of `model` (the model itself is left as it is)."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {kind!r}; valid choices: {', '.join(QUANTIZATIONS)}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("int8 quantization needs PyTorch's fbgemm engine (x86 CPUs)")
    torch.backends.quantized.engine = "fbgemm"
    tied = _tied(model)
    names = {name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and id(m.weight) not in tied}
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # the eager-mode API warns that it moves to torchao
        warnings.simplefilter("ignore")
        out = quantize_dynamic(copy.deepcopy(model).eval(), {n: per_channel_dynamic_qconfig for n in names},
                               inplace=True)
    out.quantization = kind
    return out
