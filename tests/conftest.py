"""Shared fixtures: tiny seeded models of every family and toy data."""
from __future__ import annotations

import os
import random

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: one thread per worker, and in what it launches
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from transduce.data.pipeline import Batch, pad
from transduce.config import Config
from transduce.data.vocab import BOS, EOS, PAD, SPECIALS, CharTokenizer, TextCodec, Vocab, WhitespaceTokenizer
from transduce.inference import LoadedRun
from transduce.registry import build_model
from transduce.models.encoder import EncoderClassifierConfig, EncoderMLMConfig, EncoderTaggerConfig
from transduce.models.lm import DecoderOnlyConfig, PrefixLMConfig
from transduce.models.rnn import RNNConfig
from transduce.models.transformer import TransformerConfig

SRC_V, TGT_V = 13, 11


def tiny_transformer(**kw):
    c = dict(d_model=32, heads=4, encoder_layers=2, decoder_layers=2, ff_dim=64, dropout=0.0,
             max_positions=64)
    c.update(kw)
    return TransformerConfig(**c)


def tiny_rnn(**kw):
    c = dict(embedding_dim=16, encoder_hidden=16, hidden_size=24, encoder_layers=2, decoder_layers=2,
             dropout=0.0, attention_dim=20)
    c.update(kw)
    return RNNConfig(**c)


def tiny_stack(config, **kw):
    c = dict(d_model=32, heads=4, layers=2, ff_dim=64, dropout=0.0, max_positions=64)
    c.update(kw)
    return config(**c)


def tiny_encoder(config, **kw):
    c = dict(d_model=32, heads=4, encoder_layers=2, ff_dim=64, dropout=0.0, max_positions=64)
    c.update(kw)
    return config(**c)


BERT_STYLE = dict(norm="post", positions="learned", activation="gelu", embed_scale=False, embed_norm=True,
                  norm_eps=1e-12)

# name -> config factory; every family added to transduce gets an entry here
# so the shared model checks in test_models.py run on it (the decoding checks
# on the families that decode: DECODING_MODELS).
TINY_MODELS = {
    "transformer-prenorm": lambda: tiny_transformer(),
    "transformer-postnorm-learned": lambda: tiny_transformer(norm="post", positions="learned"),
    "transformer-shared": lambda: tiny_transformer(share_embeddings=True),
    "transformer-postnorm-geglu": lambda: tiny_transformer(norm="post", positions="learned", activation="geglu"),
    "transformer-swiglu": lambda: tiny_transformer(activation="swiglu"),
    "lstm-bahdanau": lambda: tiny_rnn(cell="lstm", attention="bahdanau"),
    "gru-none": lambda: tiny_rnn(cell="gru", attention="none", bidirectional=False, decoder_layers=1),
    "lstm-luong-general-feed": lambda: tiny_rnn(cell="lstm", attention="luong_general", input_feeding=True),
    "gru-luong-dot": lambda: tiny_rnn(cell="gru", attention="luong_dot", encoder_hidden=12, hidden_size=24),
    "decoder-only": lambda: tiny_stack(DecoderOnlyConfig),
    "decoder-only-postnorm-sinusoidal": lambda: tiny_stack(DecoderOnlyConfig, norm="post", positions="sinusoidal"),
    "decoder-only-swiglu": lambda: tiny_stack(DecoderOnlyConfig, activation="swiglu"),
    "prefix-lm": lambda: tiny_stack(PrefixLMConfig),
    "prefix-lm-untied-relu": lambda: tiny_stack(PrefixLMConfig, tie_output=False, activation="relu"),
    "transformer-bert-style": lambda: tiny_transformer(**BERT_STYLE),
    "encoder-mlm": lambda: tiny_encoder(EncoderMLMConfig),
    "encoder-mlm-bert-style": lambda: tiny_encoder(EncoderMLMConfig, **BERT_STYLE),
    "encoder-classifier-mean": lambda: tiny_encoder(EncoderClassifierConfig),
    "encoder-classifier-first-postnorm": lambda: tiny_encoder(EncoderClassifierConfig, pooling="first", norm="post"),
    "encoder-tagger": lambda: tiny_encoder(EncoderTaggerConfig, activation="gelu"),
}


def vocab_sizes(name: str) -> tuple[int, int]:
    shared = getattr(TINY_MODELS[name](), "share_embeddings", False)
    return (TGT_V if shared else SRC_V), TGT_V


def make_model(name: str, seed: int = 0, tgt_v: int | None = None):
    torch.manual_seed(seed)
    cfg = TINY_MODELS[name]()
    src_v, default_tgt = vocab_sizes(name)
    tgt_v = tgt_v or default_tgt
    model = build_model(cfg, tgt_v if getattr(cfg, "share_embeddings", False) else src_v, tgt_v)
    # Random, non-trivial weights everywhere (fresh init zeroes biases).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(params=list(TINY_MODELS))
def model_name(request):
    return request.param


# Families with a decoder (encoder-only ones set can_decode = False).
DECODING_MODELS = [name for name in TINY_MODELS if make_model(name).can_decode]


@pytest.fixture(params=DECODING_MODELS)
def decoding_model_name(request):
    return request.param


def make_engine(name: str, engine: str, seed: int = 0):
    """make_model's model as `engine` runs it (transduce.engine): "torch" the modules, "kernels" the
    CPU kernels' engine, which must apply to it."""
    from transduce import engine as engines

    return engines.build(make_model(name, seed), engine)


def _on_kernels(name: str) -> bool:
    from transduce import kernels
    from transduce.engine.kernels import runs_on_kernels

    return kernels.ops() is not None and runs_on_kernels(make_model(name)) is None


# (family, engine) for the shared decoding checks: every decoding family on the PyTorch modules, and
# those the kernels run on the kernels' engine too
DECODING_CASES = [(n, "torch") for n in DECODING_MODELS] + [(n, "kernels") for n in DECODING_MODELS if _on_kernels(n)]


@pytest.fixture(params=DECODING_CASES, ids=[f"{n}-{e}" for n, e in DECODING_CASES])
def decoding_case(request):
    return request.param


def random_batch(b: int = 4, seed: int = 0, src_v: int = SRC_V, tgt_v: int = TGT_V) -> Batch:
    g = random.Random(seed)
    srcs = [[g.randrange(4, src_v) for _ in range(g.randint(2, 9))] for _ in range(b)]
    tgts = [[g.randrange(4, tgt_v) for _ in range(g.randint(1, 8))] for _ in range(b)]
    src = pad(srcs)
    return Batch(src, src != PAD, pad([[BOS] + t for t in tgts]), pad([t + [EOS] for t in tgts]))


def member(name: str, seed: int, vocab: int = 11):
    """A tiny model of `name` with random weights, reading and writing one `vocab`-symbol vocabulary
    (a single-stack model has only one)."""
    torch.manual_seed(seed)
    model = build_model(TINY_MODELS[name](), vocab, vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def token_logprobs(model, src, mask, tokens: list[int]) -> torch.Tensor:
    """(len(tokens) + 1, V) teacher-forced log-probabilities after <s> and each token."""
    with torch.no_grad():
        logits = model(Batch(src, mask, torch.tensor([[BOS] + tokens]), torch.tensor([tokens + [EOS]])))
    return torch.log_softmax(logits[0].float(), -1)


def fake_run(name: str, seed: int) -> LoadedRun:
    model = make_model(name, seed=seed)
    src_v = model.src_embed.tokens.num_embeddings
    tgt_v = model.tgt_embed.tokens.num_embeddings
    src = TextCodec(CharTokenizer(), Vocab(SPECIALS + [chr(ord("a") + i) for i in range(src_v - 4)]))
    tgt = TextCodec(WhitespaceTokenizer(), Vocab(SPECIALS + [f"P{i}" for i in range(tgt_v - 4)]))
    cfg = Config(model=model.config)
    cfg.decode.max_len_a, cfg.decode.max_len_b = 1.0, 4
    return LoadedRun(cfg, model, src, tgt, {}, None)


def stepwise_logits(model, batch) -> torch.Tensor:
    """(B, T, V) logits of `batch`'s targets decoded one step at a time from the model's cache."""
    state = model.init_state(model.encode(batch.src, batch.src_mask), 1, batch.tgt_in.shape[1])
    steps = []
    for t in range(batch.tgt_in.shape[1]):
        logits, state = model.step(batch.tgt_in[:, t], state)
        steps.append(logits)
    return torch.stack(steps, 1)
