"""BERT's masked-language-model corruption (Devlin et al. 2019, section 3.1).

Each real symbol (not a special: <pad>, <unk>, <s>, </s>, <mask>) is
selected with probability `rate`; of the selected, a share `mask_token`
becomes <mask>, `random_token` a random symbol, and the rest stay unchanged.
Labels hold the original symbol at the selected positions and PAD (ignored
by the loss) everywhere else. A sequence with something to mask always gets
at least one selected position, so no batch is without a loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from transduce.data.vocab import PAD, SPECIALS


@dataclass(frozen=True)
class Masking:
    rate: float          # share of maskable positions selected
    mask_token: float    # of the selected: -> <mask>
    random_token: float  # of the selected: -> a random symbol (the rest: unchanged)
    mask_id: int         # id of <mask>
    vocab_size: int


def mask_tokens(ids: torch.Tensor, m: Masking, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, S), PAD-padded -> (corrupted inputs (B, S), labels (B, S))."""
    first = len(SPECIALS)
    maskable = (ids >= first) & (ids != m.mask_id)
    u = torch.rand(ids.shape, generator=generator)
    select = maskable & (u < m.rate)
    # Rows with maskable symbols but none selected: select one of them at random.
    empty = maskable.any(1) & ~select.any(1)
    if empty.any():
        pick = (torch.rand(ids.shape, generator=generator) * maskable).argmax(1)
        rows = empty.nonzero()[:, 0]
        select[rows, pick[rows]] = True
    how = torch.rand(ids.shape, generator=generator)
    to_mask = select & (how < m.mask_token)
    to_random = select & (how >= m.mask_token) & (how < m.mask_token + m.random_token)
    # Random symbols: uniform over the regular ids (first .. vocab_size - 1, <mask> left out).
    n_regular = m.vocab_size - first - (1 if m.mask_id >= first else 0)
    random = torch.randint(0, max(1, n_regular), ids.shape, generator=generator) + first
    if m.mask_id >= first:
        random = random + (random >= m.mask_id).long()
    inputs = ids.masked_fill(to_mask, m.mask_id)
    inputs = torch.where(to_random, random, inputs)
    labels = ids.masked_fill(~select, PAD)
    return inputs, labels
