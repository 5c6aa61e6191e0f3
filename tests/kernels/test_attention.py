"""Cross-attention inspection: weights are distributions over the source, recording them changes
nothing, and the command writes a heatmap and JSONL."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model
from conftest import fake_run
from transduce.attention import attention_records, cross_attention, plot_attention, select
from transduce.data.pipeline import pad
from transduce.data.vocab import BOS, PAD

ATTENDING = ["transformer-prenorm", "transformer-postnorm-learned", "lstm-bahdanau", "lstm-luong-general-feed",
             "gru-luong-dot"]


@pytest.mark.parametrize("name", ATTENDING)
def test_weights_are_distributions_and_recording_changes_nothing(name):
    model = make_model(name, seed=4)
    src_ids, out_ids = [5, 6, 7, 8, 9], [4, 5, 6]
    att = cross_attention(model, src_ids, out_ids)
    layers, heads, t, s = att.shape
    assert (t, s) == (len(out_ids) + 1, len(src_ids))
    torch.testing.assert_close(att.sum(-1), torch.ones(layers, heads, t))
    # Logits with and without recording are the same.
    src = pad([src_ids])
    with torch.no_grad():
        logits = []
        for record in (False, True):
            state = model.init_state(model.encode(src, src != PAD), 1, 8, record_attention=record)
            out = []
            for tok in [BOS] + out_ids:
                lg, state = model.step(torch.tensor([tok]), state)
                out.append(lg)
            logits.append(torch.cat(out))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-4)


def test_family_without_attention_says_so():
    with pytest.raises(ValueError, match="no cross-attention"):
        cross_attention(make_model("gru-none"), [5, 6], [4])


def test_select_layers_and_heads():
    att = torch.rand(3, 4, 2, 5)
    m, label = select(att, "-1", "mean")
    torch.testing.assert_close(m, att[-1].mean(0))
    assert label == "layer 2, heads averaged"
    m, _ = select(att, "mean", "1")
    torch.testing.assert_close(m, att.mean(0)[1])
    with pytest.raises(ValueError, match="has 4 heads"):
        select(att, "0", "7")


def test_records_and_plot(tmp_path):
    run = fake_run("transformer-prenorm", seed=3)
    records = attention_records(run, ["abc", ""], ["P1 P2", ""])
    assert records[0]["source_tokens"] == ["a", "b", "c"]
    assert records[0]["output_tokens"] == ["P1", "P2", "</s>"]
    a = torch.tensor(records[0]["attention"])
    assert a.shape == (2, 4, 3, 3) and records[1]["attention"] == []
    json.dumps(records)  # JSON-ready
    out = tmp_path / "att.png"
    plot_attention(a[-1].mean(0), records[0]["source_tokens"], records[0]["output_tokens"], "t", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
