"""int8 decoding (models/quantize.py): a quantized copy that decodes like the float32 model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_model, random_batch, vocab_sizes
from transduce import engine as engines
from transduce.models.quantize import Int8Linear, quantize
from transduce.search import beam_search, greedy


def test_quantized_copy_leaves_the_model_alone_and_keeps_tied_outputs_float():
    model = make_model("transformer-prenorm", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    int8 = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == len(linears) - 1          # all but the output layer, tied to the embedding
    assert all(m.qweight.dtype == torch.int8 and m.qweight.abs().max() == 127 for m in int8)
    assert type(q.output) is nn.Linear and q.output.weight is q.tgt_embed.tokens.weight
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(model, "int4")


def test_a_tied_output_layer_over_a_subword_vocabulary_gets_its_own_int8_copy():
    from transduce.models.quantize import TIED_INT8_ROWS

    model = make_model("transformer-prenorm", seed=3, tgt_v=TIED_INT8_ROWS)
    q = quantize(model)
    assert type(q.output) is Int8Linear and q.output.out_features == TIED_INT8_ROWS
    assert type(q.tgt_embed.tokens) is nn.Embedding and q.tgt_embed.tokens.weight.dtype == torch.float32
    batch = random_batch(4, seed=3, tgt_v=TIED_INT8_ROWS)
    with torch.no_grad():
        want, got = model.eval()(batch), q(batch)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_quantized_logits_stay_close(decoding_model_name):
    model = make_model(decoding_model_name, seed=4)
    src_v, tgt_v = vocab_sizes(decoding_model_name)
    batch = random_batch(6, 4, src_v, tgt_v)
    with torch.no_grad():
        ref, out = model(batch), quantize(model)(batch)
    real = batch.labels != 0
    err = (out - ref)[real].abs() / ref[real].std()
    assert 0 < err.mean() < 0.05 and err.max() < 0.3, (err.mean(), err.max())  # different (int8), but close


def test_quantized_model_decodes_like_float(decoding_case):
    name, engine = decoding_case
    model = make_model(name, seed=6)
    src_v, tgt_v = vocab_sizes(name)
    batch = random_batch(16, 6, src_v, tgt_v)
    q = engines.build(quantize(model), engine)
    for search in (lambda m: greedy(m, batch.src, batch.src_mask, 1.0, 4),
                   lambda m: beam_search(m, batch.src, batch.src_mask, beam=3, nbest=1, max_len_a=1.0,
                                         max_len_b=4)):
        ref, out = [h[0].tokens for h in search(model)], [h[0].tokens for h in search(q)]
        same = sum(a == b for a, b in zip(ref, out))
        assert same >= 12, (same, ref, out)   # near-ties may flip in int8


def test_int8_on_a_cpu_without_native_int8_is_auto_float32_and_warned(monkeypatch, caplog):
    import logging

    from transduce import precision
    from transduce.models.quantize import native_int8, resolve

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not native_int8()
    with caplog.at_level(logging.INFO, logger="transduce"):
        assert resolve("auto") is None and resolve("none") is None and resolve(None) is None
        assert resolve("int8") == "int8"
    assert any(r.levelno == logging.WARNING and "without VNNI" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transduce"):
        assert native_int8() and resolve("auto") == "int8" and resolve("int8") == "int8"
    assert not any(r.levelno == logging.WARNING for r in caplog.records)
