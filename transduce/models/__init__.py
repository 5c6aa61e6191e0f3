"""Model families. Each family is a config dataclass plus a builder; the
config's `family` field picks the pair from the tables below."""
from __future__ import annotations

from transduce.models.encoder import (EncoderClassifier, EncoderClassifierConfig, EncoderMLM, EncoderMLMConfig,
                                      EncoderTagger, EncoderTaggerConfig)
from transduce.models.lm import DecoderOnly, DecoderOnlyConfig, PrefixLM, PrefixLMConfig
from transduce.models.rnn import RNNConfig, RNNSeq2Seq
from transduce.models.transformer import Transformer, TransformerConfig

# family name -> config dataclass (read by the config loader)
MODEL_CONFIGS = {
    "transformer": TransformerConfig,
    "rnn": RNNConfig,
    "decoder_only": DecoderOnlyConfig,
    "prefix_lm": PrefixLMConfig,
    "encoder_mlm": EncoderMLMConfig,          # encoder-only (no decoder, a head): see models/encoder.py
    "encoder_classifier": EncoderClassifierConfig,
    "encoder_tagger": EncoderTaggerConfig,
}


def build_model(cfg, src_vocab_size: int, tgt_vocab_size: int):
    """Build the model for `cfg` (a family config) with fresh weights."""
    builders = {
        "transformer": Transformer,
        "rnn": RNNSeq2Seq,
        "decoder_only": DecoderOnly,
        "prefix_lm": PrefixLM,
        "encoder_mlm": EncoderMLM,            # target vocabulary = source vocabulary
        "encoder_classifier": EncoderClassifier,  # target vocabulary = the labels
        "encoder_tagger": EncoderTagger,
    }
    return builders[cfg.family](cfg, src_vocab_size, tgt_vocab_size)
