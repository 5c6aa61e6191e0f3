"""Decoding engines: how a trained model runs when it decodes.

A model is plain PyTorch modules, the reference that trains, exports and
decodes anywhere. An engine is built from a trained model when a run is
loaded (as CTranslate2 converts one) and is what search steps:

- `torch`: the modules themselves.
- `kernels`: the CPU kernels (transduce/kernels) for Transformer encoders and
  decoders, float32 or int8 (engine/kernels.py): a decoding step in a few
  fused calls instead of hundreds of small tensor ops (docs/speed.md).
- `auto` (the default): `kernels` where they are built and the model is one they
  run, `torch` otherwise.

Both engines give the same outputs (tests/kernels/test_engine.py runs the
shared model checks on each).
"""
from __future__ import annotations

import logging

from torch import nn

ENGINES = ("auto", "kernels", "torch")

log = logging.getLogger("transduce")


def build(model: nn.Module, engine: str = "auto"):
    """The engine `engine` of a trained `model` (in eval mode): an object with the model's search
    interface (encode, init_state, step, reorder_state, max_output_len, forward)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid choices: {', '.join(ENGINES)}")
    if engine == "torch":
        return model
    from transduce import kernels
    from transduce.engine.kernels import KernelEncoderHead, KernelTransformer, runs_on_kernels

    why = runs_on_kernels(model)
    if why is None and kernels.ops() is None:
        why = "the CPU kernels are not built here (pip install 'transduce[fast]'; see transduce/kernels)"
    if why is not None:
        if engine == "kernels":
            raise ValueError(f"engine 'kernels': {why}; use engine 'torch' (or 'auto')")
        return model
    return KernelTransformer(model) if model.can_decode else KernelEncoderHead(model)
