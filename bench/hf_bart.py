"""The Hugging Face peer of the benchmarks: a BART of a transduce Transformer config's sizes."""
from __future__ import annotations

from transduce.data.vocab import BOS, EOS, PAD


def bart(model_cfg, vocab: int, dropout: float | None = None):
    """`BartForConditionalGeneration`, random init, with model_cfg's sizes and our special ids."""
    from transformers import BartConfig, BartForConditionalGeneration

    c = model_cfg
    if c.activation not in ("gelu", "relu"):
        raise ValueError(f"BART's feed-forward blocks are not gated: model.activation {c.activation!r} has no "
                         "BART of the same sizes (--set model.activation=gelu)")
    return BartForConditionalGeneration(BartConfig(
        activation_function=c.activation,
        vocab_size=vocab, d_model=c.d_model, encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
        encoder_attention_heads=c.heads, decoder_attention_heads=c.heads, encoder_ffn_dim=c.ff_dim,
        decoder_ffn_dim=c.ff_dim, max_position_embeddings=c.max_positions,
        dropout=c.dropout if dropout is None else dropout, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        decoder_start_token_id=BOS, forced_eos_token_id=None))
