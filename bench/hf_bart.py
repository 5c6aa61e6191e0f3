"""The Hugging Face peer of the benchmarks: a BART of a transduce Transformer config's sizes."""
from __future__ import annotations

from transduce.data.vocab import BOS, EOS, PAD


def bart(model_cfg, vocab: int, dropout: float | None = None):
    """`BartForConditionalGeneration`, random init, with model_cfg's sizes and our special ids. BART's
    feed-forward blocks are not gated: for a gated model (`model.activation` geglu or swiglu) it is
    the plain GELU block of the same parameters and multiplications, 3/2 x ff_dim wide (`plain_ff`)."""
    from transformers import BartConfig, BartForConditionalGeneration

    c = model_cfg
    ff, act = plain_ff(c), "gelu" if c.activation in GATED else c.activation
    if act not in ("gelu", "relu"):
        raise ValueError(f"model.activation {c.activation!r} has no BART counterpart")
    return BartForConditionalGeneration(BartConfig(
        activation_function=act,
        vocab_size=vocab, d_model=c.d_model, encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
        encoder_attention_heads=c.heads, decoder_attention_heads=c.heads, encoder_ffn_dim=ff,
        decoder_ffn_dim=ff, max_position_embeddings=c.max_positions,
        dropout=c.dropout if dropout is None else dropout, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        decoder_start_token_id=BOS, forced_eos_token_id=None))


GATED = ("geglu", "swiglu")


def plain_ff(model_cfg) -> int:
    """BART's feed-forward width for model_cfg: ff_dim, or for a gated block (up projects to 2 x ff_dim)
    3/2 x ff_dim, the plain block with as many parameters and multiplications."""
    c = model_cfg
    return c.ff_dim * 3 // 2 if c.activation in GATED else c.ff_dim


def describe(model_cfg) -> str:
    """How BART's feed-forward block stands to model_cfg's, for a bench's table."""
    c = model_cfg
    if c.activation in GATED:
        return (f"HF BART: GELU feed-forward {plain_ff(c)} wide for our {c.activation} at ff_dim {c.ff_dim} "
                "(the same parameters and multiplications)")
    return f"HF BART: {c.activation} feed-forward {c.ff_dim} wide, as ours"
