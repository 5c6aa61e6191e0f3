"""Encoder-only families (BERT; Devlin et al. 2019): the Transformer encoder stack and a head, no decoder.

- `encoder_mlm`: masked-language-model pretraining. Logits over the source
  vocabulary at every position, (B, S, V); the MLM task's batches label only
  the selected positions, so the loss is on those alone.
- `encoder_classifier`: one label per text. Pooled states -> (B, 1, C).
- `encoder_tagger`: one label per token. (B, S, C); the tagging task labels
  each word's first piece.

All three build the encoder under the Transformer's names (`src_embed`,
`encoder`, `enc_norm`; see `EncoderStack`), so an MLM run, or a
Transformer's encoder, starts a classifier or tagger through
`train.init_from`, and `model.init_encoder` warm-starts any of them from a
BERT checkpoint. What they read and how they predict is their task's
business (transduce/tasks.py); they set `can_decode = False`, so search
never sees them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from transduce.models.layers import Dropout, init_weights
from transduce.models.transformer import EncoderLayer, EncoderStack, EncoderStackConfig, final_norm, stack_embedding


@dataclass
class EncoderMLMConfig(EncoderStackConfig):
    family: Literal["encoder_mlm"] = "encoder_mlm"
    mask_rate: float = 0.15          # share of real symbols (not specials) selected for prediction
    mask_token: float = 0.8          # of the selected: replaced by <mask> ...
    random_token: float = 0.1        # ... or by a random symbol; the rest stay unchanged (BERT 80/10/10)

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError("mask_rate must be in (0, 1)")
        if min(self.mask_token, self.random_token) < 0 or self.mask_token + self.random_token > 1.0:
            raise ValueError("mask_token and random_token must be >= 0 with mask_token + random_token <= 1")


@dataclass
class EncoderClassifierConfig(EncoderStackConfig):
    family: Literal["encoder_classifier"] = "encoder_classifier"
    # The text's vector: the mean of its states, or the state of the first
    # position (BERT's [CLS]; use with data.source_tokenizer.wrap: true).
    pooling: Literal["mean", "first"] = "mean"


@dataclass
class EncoderTaggerConfig(EncoderStackConfig):
    family: Literal["encoder_tagger"] = "encoder_tagger"


class EncoderWithHead(EncoderStack):
    """The encoder stack; subclasses add a head in `head_logits`."""

    can_decode = False

    def __init__(self, c: EncoderStackConfig, src_vocab: int):
        super().__init__()
        self.config = c
        self.src_embed = stack_embedding(c, src_vocab)
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.enc_norm = final_norm(c)

    def forward(self, batch) -> torch.Tensor:
        return self.scores(batch.src, batch.src_mask)

    def scores(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """src (B, S), src_mask (B, S) -> the head's logits (see the family)."""
        return self.head_logits(self.encode(src, src_mask))

    def head_logits(self, memory) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        c = self.config
        return {"family": c.family, "d_model": c.d_model, "heads": c.heads, "ff_dim": c.ff_dim,
                "encoder_layers": c.encoder_layers, "parameters": sum(p.numel() for p in self.parameters())}


class EncoderMLM(EncoderWithHead):
    """BERT's MLM head: dense + GELU + LayerNorm, then an output layer tied to the token embeddings."""

    def __init__(self, c: EncoderMLMConfig, src_vocab: int, tgt_vocab: int | None = None):
        # The MLM predicts source symbols: its target codec is the source codec.
        super().__init__(c, src_vocab)
        d = c.d_model
        self.transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=c.norm_eps))
        self.output = nn.Linear(d, src_vocab)
        init_weights(self)
        self.output.weight = self.src_embed.tokens.weight

    def head_logits(self, memory) -> torch.Tensor:
        return self.output(self.transform(memory.states))  # (B, S, V)


class EncoderClassifier(EncoderWithHead):
    def __init__(self, c: EncoderClassifierConfig, src_vocab: int, n_labels: int):
        super().__init__(c, src_vocab)
        self.dropout = Dropout(c.dropout)
        self.head = nn.Linear(c.d_model, n_labels)
        init_weights(self)

    def head_logits(self, memory) -> torch.Tensor:
        states, mask = memory.states, memory.mask  # (B, S, D), (B, S)
        if self.config.pooling == "first":
            pooled = states[:, 0]
        else:
            m = mask[..., None].to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))[:, None, :]  # (B, 1, C)


class EncoderTagger(EncoderWithHead):
    def __init__(self, c: EncoderTaggerConfig, src_vocab: int, n_labels: int):
        super().__init__(c, src_vocab)
        self.dropout = Dropout(c.dropout)
        self.head = nn.Linear(c.d_model, n_labels)
        init_weights(self)

    def head_logits(self, memory) -> torch.Tensor:
        return self.head(self.dropout(memory.states))  # (B, S, C)
