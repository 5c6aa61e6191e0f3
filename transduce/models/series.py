"""Encoder-decoders over sequences of real-valued vectors (time series, speech feature frames).

The front-end replaces the source token embedding: a linear projection of each
vector (or of `subsample` stacked vectors), or a small Conv1d with stride
`subsample` for long inputs; the Transformer adds positions. Then the
family's own encoder stack, unchanged.

- `series_transformer`, `series_rnn`: the Transformer and RNN encoder-decoders
  with the vector front-end and their token decoder: they write text (speech)
  or quantised values (data.task 'forecast'; data/series.py `ValueBins`), by
  the same search as every decoder (greedy, beam, sampling).
- `forecaster`: the Transformer encoder stack and a regression decoder: one
  learned query per forecast step, causal self-attention over the steps and
  cross-attention to the encoder, then a head with the parameters of each
  step's distribution: mean and scale (Gaussian) or quantiles. No search.

Source vectors arrive normalised (the run's `SeriesScaler`); the model's input
width is the source codec's length (its columns).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from transduce.models.base import EncoderDecoderModel, EncoderOutput
from transduce.models.layers import Dropout, init_weights, sinusoidal_table
from transduce.models.rnn import RNNConfig, RNNSeq2Seq
from transduce.models.transformer import (DecoderLayer, EncoderLayer, EncoderStack, EncoderStackConfig,
                                          Transformer, TransformerConfig, final_norm)


@dataclass
class FrontendFields:
    """How vectors become the encoder's inputs."""
    frontend: Literal["linear", "conv"] = "linear"  # conv: Conv1d(kernel_size) + GELU, for frames with local structure
    subsample: int = 1               # output positions per input vectors: long inputs (speech frames) get shorter
    kernel_size: int = 3             # conv: vectors each output position sees

    def check_frontend(self) -> None:
        if self.subsample < 1 or self.kernel_size < 1:
            raise ValueError("subsample and kernel_size must be at least 1")
        if self.frontend == "conv" and self.kernel_size < self.subsample:
            raise ValueError(f"kernel_size={self.kernel_size} < subsample={self.subsample} would skip inputs")


class VectorFrontend(nn.Module):
    """(B, S, F) vectors, (B, S) mask -> (B, S', D), (B, S') mask with S' = ceil(S / subsample) (linear)
    or the Conv1d's output length. Padded vectors are zeroed first, so a sequence's outputs do not
    depend on the padding after it."""

    def __init__(self, n_features: int, d: int, c: FrontendFields):
        super().__init__()
        self.n_features, self.kind, self.s, self.k = n_features, c.frontend, c.subsample, c.kernel_size
        if c.frontend == "conv":
            self.conv = nn.Conv1d(n_features, d, c.kernel_size, stride=c.subsample, padding=c.kernel_size // 2)
        else:
            self.proj = nn.Linear(n_features * c.subsample, d)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return (lengths + 2 * (self.k // 2) - self.k) // self.s + 1
        return (lengths + self.s - 1) // self.s

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[:2] != mask.shape:
            raise ValueError(f"expected vectors (batch, steps, features) with a (batch, steps) mask, got "
                             f"{tuple(x.shape)} and {tuple(mask.shape)}")
        if x.shape[2] != self.n_features:
            raise ValueError(f"vectors of width {x.shape[2]}; the model reads {self.n_features} features")
        x = x.masked_fill(~mask[..., None], 0.0)
        b, s, f = x.shape
        if self.kind == "conv":
            y = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)       # (B, S', D)
        else:
            pad = (-s) % self.s
            if pad:
                x = F.pad(x, (0, 0, 0, pad))
            y = self.proj(x.reshape(b, (s + pad) // self.s, f * self.s))  # (B, S', D)
        n = self.out_lengths(mask.sum(1))
        out_mask = torch.arange(y.shape[1], device=y.device)[None, :] < n[:, None]
        return y, out_mask


class VectorEmbedding(nn.Module):
    """The front-end, then positions (sinusoidal or learned) and dropout: the vector twin of
    `layers.Embedding` for the Transformer stacks."""

    def __init__(self, n_features: int, c, positions: str, max_positions: int):
        super().__init__()
        self.frontend = VectorFrontend(n_features, c.d_model, c)
        self.max_positions = max_positions
        if positions == "learned":
            self.positions = nn.Embedding(max_positions, c.d_model)
        else:
            self.positions = None
            self.register_buffer("table", sinusoidal_table(max_positions, c.d_model), persistent=False)
        self.dropout = Dropout(c.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, out_mask = self.frontend(x, mask)
        t = y.shape[1]
        if t > self.max_positions:
            raise ValueError(f"input of {t} positions (after subsampling) exceeds model.max_positions="
                             f"{self.max_positions}")
        pos = self.positions.weight[:t] if self.positions is not None else self.table[:t]
        return self.dropout(y + pos), out_mask


def _no_tokens(c) -> None:
    if getattr(c, "share_embeddings", False):
        raise ValueError("share_embeddings: the source is vectors, not tokens; set share_embeddings: false")
    if getattr(c, "init_encoder", None):
        raise ValueError("init_encoder: a BERT encoder reads tokens, not vectors; remove it")


# ---------------------------------------------------------------------------
# Token decoders over vector inputs
# ---------------------------------------------------------------------------

@dataclass
class SeriesTransformerConfig(TransformerConfig, FrontendFields):
    family: Literal["series_transformer"] = "series_transformer"
    tie_output: bool = True

    def validate(self) -> None:
        super().validate()
        self.check_frontend()
        _no_tokens(self)


class SeriesTransformer(Transformer):
    """The Transformer with the vector front-end: `src` (B, S, F) floats."""

    def __init__(self, c: SeriesTransformerConfig, n_features: int, tgt_vocab: int):
        super().__init__(c, 1, tgt_vocab)
        self.src_embed = VectorEmbedding(n_features, c, c.positions, c.max_positions)
        init_weights(self.src_embed)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        x, mask = self.src_embed(src, src_mask)
        return self.encode_embedded(x, mask)


@dataclass
class SeriesRNNConfig(RNNConfig, FrontendFields):
    family: Literal["series_rnn"] = "series_rnn"

    def validate(self) -> None:
        super().validate()
        self.check_frontend()


class SeriesRNN(RNNSeq2Seq):
    """The RNN encoder-decoder with the vector front-end (projection to embedding_dim)."""

    def __init__(self, c: SeriesRNNConfig, n_features: int, tgt_vocab: int):
        super().__init__(c, 1, tgt_vocab)
        self.src_embed = VectorFrontend(n_features, c.embedding_dim, c)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        x, mask = self.src_embed(src, src_mask)
        return self.encode_embedded(x, mask)


# ---------------------------------------------------------------------------
# Regression decoder
# ---------------------------------------------------------------------------

@dataclass
class ForecasterConfig(EncoderStackConfig, FrontendFields):
    family: Literal["forecaster"] = "forecaster"
    decoder_layers: int = 2          # layers over the forecast steps' queries
    # gaussian: a mean and a scale per step (NLL loss); quantile: the `quantiles` per step (pinball loss)
    loss: Literal["gaussian", "quantile"] = "quantile"
    quantiles: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    # > 0: the last `lags` values of each target also feed a linear forecast of every step, added to
    # the decoder's (a linear autoregression beside the network, as DLinear/NLinear do; it gets trend
    # and seasonality right from few windows); the first target columns of the source are the targets
    lags: int = 0

    def validate(self) -> None:
        super().validate()
        self.check_frontend()
        _no_tokens(self)
        if self.decoder_layers < 1 or self.lags < 0:
            raise ValueError("decoder_layers must be at least 1 and lags >= 0")
        q = self.quantiles
        if self.loss == "quantile" and (not q or sorted(set(q)) != q or not all(0.0 < x < 1.0 for x in q)):
            raise ValueError(f"quantiles must be increasing, distinct and in (0, 1) (got {q})")

    @property
    def n_params(self) -> int:
        return 2 if self.loss == "gaussian" else len(self.quantiles)


class Forecaster(EncoderStack):
    """Vector front-end and Transformer encoder stack; `forward(batch)` -> (B, H, T, P) distribution
    parameters of each of H = batch.labels.shape[1] steps and T targets (see ForecasterConfig.loss).
    Steps attend causally to earlier steps, so the first h steps of a longer horizon are the
    forecast of horizon h."""

    can_decode = False

    def __init__(self, c: ForecasterConfig, n_features: int, n_targets: int):
        super().__init__()
        self.config = c
        self.n_targets = n_targets
        self.src_embed = VectorEmbedding(n_features, c, c.positions, c.max_positions)
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.enc_norm = final_norm(c)
        self.queries = nn.Embedding(c.max_positions, c.d_model)
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        self.dec_norm = final_norm(c)
        self.head = nn.Linear(c.d_model, n_targets * c.n_params)
        init_weights(self)
        self.ar = nn.Linear(c.lags, c.max_positions) if c.lags else None  # (steps, lags) shared by the targets
        if self.ar is not None:
            nn.init.zeros_(self.ar.weight)
            nn.init.zeros_(self.ar.bias)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        x, mask = self.src_embed(src, src_mask)
        return self.encode_embedded(x, mask)

    def forward(self, batch) -> torch.Tensor:
        return self.predict(batch.src, batch.src_mask, batch.labels.shape[1])

    def predict(self, src: torch.Tensor, src_mask: torch.Tensor, horizon: int) -> torch.Tensor:
        """src (B, S, F) -> (B, H, T, P); gaussian P = (mean, scale > 0), quantile P = the quantiles."""
        if horizon > self.config.max_positions:
            raise ValueError(f"horizon {horizon} exceeds model.max_positions={self.config.max_positions}")
        memory = self.encode(src, src_mask)
        b = src.shape[0]
        x = self.queries.weight[:horizon].expand(b, horizon, -1)           # (B, H, D)
        mask = memory.mask[:, None, None, :]
        for layer in self.decoder:
            k, v = layer.cross_attn.project_kv(memory.states)
            x = layer(x, k, v, mask)
        out = self.head(self.dec_norm(x)).view(b, horizon, self.n_targets, self.config.n_params)
        if self.ar is not None:
            lin = self.autoregression(src, src_mask, horizon)                # (B, H, T)
            out = out + (lin[..., None] if self.config.loss == "quantile"
                         else torch.stack([lin, torch.zeros_like(lin)], -1))
        if self.config.loss == "gaussian":
            out = torch.stack([out[..., 0], F.softplus(out[..., 1]) + 1e-3], -1)
        return out.float()

    def autoregression(self, src: torch.Tensor, src_mask: torch.Tensor, horizon: int) -> torch.Tensor:
        """(B, H, T): the linear forecast from each source's last `lags` real steps of the targets."""
        lags, t = self.config.lags, self.n_targets
        n = src_mask.sum(1)
        if int(n.min()) < lags:
            raise ValueError(f"a context of {int(n.min())} steps, shorter than model.lags={lags}")
        idx = n[:, None] - lags + torch.arange(lags, device=src.device)     # (B, L)
        past = src[:, :, :t].gather(1, idx[..., None].expand(-1, -1, t))    # (B, L, T)
        return torch.einsum("blt,hl->bht", past, self.ar.weight[:horizon]) + self.ar.bias[:horizon, None]

    def describe(self) -> dict:
        c = self.config
        return {"family": c.family, "d_model": c.d_model, "heads": c.heads, "encoder_layers": c.encoder_layers,
                "decoder_layers": c.decoder_layers, "loss": c.loss, "frontend": c.frontend,
                "subsample": c.subsample, "parameters": sum(p.numel() for p in self.parameters())}


def gaussian_nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of y (B, H, T) under N(out[..., 0], out[..., 1]^2), constant dropped."""
    mu, sigma = out[..., 0], out[..., 1]
    return (torch.log(sigma) + 0.5 * ((y - mu) / sigma) ** 2).sum()


def pinball(out: torch.Tensor, y: torch.Tensor, quantiles: list[float]) -> torch.Tensor:
    """Summed quantile (pinball) loss of y (B, H, T) for out (B, H, T, Q), averaged over the Q levels."""
    q = torch.tensor(quantiles, dtype=out.dtype, device=out.device)
    diff = y[..., None] - out
    return torch.maximum(q * diff, (q - 1) * diff).mean(-1).sum()
