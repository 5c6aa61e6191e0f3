"""The interface every model family implements.

Training calls `forward(batch) -> logits (B, T, V)` aligned with
`batch.labels`. Search calls, without knowing the family:

    memory = model.encode(src, src_mask)                 # once per batch
    state = model.init_state(memory, beam, max_len)      # rows = B * beam
    logits, state = model.step(tokens, state)            # one new position per row
    state = model.reorder_state(state, rows, batch)      # after beam selection / dropping finished

and caps output lengths at `model.max_output_len(src_mask)` (positions).

A family without a decoder (encoder-only with a head) sets `can_decode = False`;
what it is trained on and how it predicts is its task's business (transduce/tasks.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EncoderOutput:
    states: torch.Tensor  # (B, S, D)
    mask: torch.Tensor    # (B, S) True at real source positions
    final: torch.Tensor | None = None  # (B, D') summary for decoders that start from it (RNNs)


class EncoderDecoderModel(nn.Module):
    can_decode = True

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor):
        raise NotImplementedError

    def init_state(self, memory, beam: int, max_len: int, record_attention: bool = False):
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state):
        raise NotImplementedError

    def reorder_state(self, state, rows: torch.Tensor | None, batch: torch.Tensor | None = None):
        raise NotImplementedError

    def max_output_len(self, src_mask: torch.Tensor) -> torch.Tensor | None:
        """(B,) the most tokens the decoder can output for each source before its positions run
        out (search stops there, whatever decode.max_len_a/b allow); None: no limit."""
        return None

    def init_pretrained(self, source, target) -> list[str]:
        """Load weights the config names outside transduce (e.g. `model.init_encoder`) into a
        fresh model, given the run's source/target codecs; returns lines for the log."""
        return []

    def describe(self) -> dict:
        """Sizes and counts for `transduce info`."""
        n = sum(p.numel() for p in self.parameters())
        return {"parameters": n}
