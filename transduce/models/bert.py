"""Warm-starting from a Hugging Face BERT-style checkpoint folder.

An encoder-decoder whose encoder (and optionally decoder) starts from a
pretrained BERT, cross-attention new (Rothe et al. 2020, "Leveraging
Pre-trained Checkpoints for Sequence Generation Tasks"); the same works for
the encoder-only families. Set `model.init_encoder: FOLDER` (or
`package:NAME/sub/dir`) and a source tokenizer of kind `pretrained` from the
same folder.

The folder needs config.json (`model_type: bert`, absolute positions, exact
GELU), model.safetensors and tokenizer.json or vocab.txt. Weights are read
only from safetensors: pytorch_model.bin is a pickle and is refused.

Our stack must have BERT's shape (`required_options`: post-norm, learned
positions, GELU, `embed_scale: false`, `embed_norm: true`, BERT's width,
heads, feed-forward width and LayerNorm epsilon); a mismatch is an error
listing each option to set. `encoder_layers` may be fewer than the
checkpoint's (the first layers are used).

Mapping, BERT name -> ours (L = layer):

    embeddings.word_embeddings          -> src_embed.tokens, row of each of our symbols
                                           (ids differ: see PretrainedTokenizer)
    embeddings.position_embeddings      -> src_embed.positions, plus token_type_embeddings[0]
                                           (one segment: type 0 everywhere, folded in)
    embeddings.LayerNorm                -> src_embed.norm
    encoder.layer.L.attention.self.{query,key,value} -> encoder.L.attn.qkv (q, k, v stacked)
    encoder.layer.L.attention.output.dense     -> encoder.L.attn.out
    encoder.layer.L.attention.output.LayerNorm -> encoder.L.r1.norm
    encoder.layer.L.intermediate.dense  -> encoder.L.ff.up
    encoder.layer.L.output.dense        -> encoder.L.ff.down
    encoder.layer.L.output.LayerNorm    -> encoder.L.r2.norm

With `init_decoder`, decoder layer L takes BERT layer L's self-attention
(self_attn, r1) and feed-forward (ff, r3), and tgt_embed the embeddings;
cross-attention (cross_attn, r2) stays newly initialised. The checkpoint's
pooler and heads are not used.
"""
from __future__ import annotations

from pathlib import Path

import torch

from transduce.checkpoint import CheckpointError, load_tensors
from transduce.config import ConfigError
from transduce.data.pretrained import read_json as _json, resolve_path


def read_bert_config(folder: Path) -> dict:
    """config.json of a supported checkpoint (BERT layout, absolute positions, exact GELU)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint folder has config.json)")
    hf = _json(path)
    problems = []
    if hf.get("model_type") != "bert":
        problems.append(f"model_type {hf.get('model_type')!r} (supported: 'bert')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {hf['position_embedding_type']!r} (supported: 'absolute')")
    if hf.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (supported: 'gelu', the exact erf form)")
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                           "max_position_embeddings") if k not in hf]
    if missing:
        problems.append(f"no {', '.join(missing)}")
    if problems:
        raise CheckpointError(f"{path}: unsupported checkpoint: " + "; ".join(problems))
    return hf


def required_options(hf: dict) -> dict:
    """Model options a BERT checkpoint with config `hf` needs."""
    return {"d_model": hf["hidden_size"], "heads": hf["num_attention_heads"], "ff_dim": hf["intermediate_size"],
            "activation": "gelu", "norm": "post", "positions": "learned", "embed_scale": False,
            "embed_norm": True, "norm_eps": hf.get("layer_norm_eps", 1e-12)}


def check_options(c, hf: dict, folder: Path) -> None:
    wrong = [f"model.{k}: {v!r} (is {getattr(c, k)!r})" for k, v in required_options(hf).items()
             if getattr(c, k) != v]
    n = hf["num_hidden_layers"]
    if c.encoder_layers > n:
        wrong.append(f"model.encoder_layers: at most {n} (is {c.encoder_layers})")
    if getattr(c, "init_decoder", False) and c.decoder_layers > n:
        wrong.append(f"model.decoder_layers: at most {n} with init_decoder (is {c.decoder_layers})")
    if c.max_positions > hf["max_position_embeddings"]:
        wrong.append(f"model.max_positions: at most {hf['max_position_embeddings']} (is {c.max_positions})")
    if wrong:
        raise ConfigError(f"model.init_encoder {folder}: the model does not have the checkpoint's shape; set "
                          + "; ".join(wrong))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, never a pickle; BertFor* checkpoints' `bert.` prefix removed."""
    path = folder / "model.safetensors"
    if not path.is_file():
        found = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        extra = (f"; it has only {', '.join(sorted(found))}, a pickle format that transduce never loads "
                 "(unpickling can run code). Convert trusted weights to safetensors") if found else ""
        raise CheckpointError(f"{path}: missing{extra}")
    tensors = load_tensors(path)
    if "bert.embeddings.word_embeddings.weight" in tensors:
        tensors = {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
    return tensors


class _Weights:
    def __init__(self, tensors: dict, where: Path):
        self.tensors, self.where = tensors, where

    def __call__(self, name: str) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None and name.endswith(("LayerNorm.weight", "LayerNorm.bias")):  # old gamma/beta names
            t = self.tensors.get(name.replace(".weight", ".gamma").replace(".bias", ".beta"))
        if t is None:
            raise CheckpointError(f"{self.where}: no tensor {name!r} (not a BERT checkpoint?)")
        return t.float()

    def linear(self, name: str) -> dict:
        return {"weight": self(name + ".weight"), "bias": self(name + ".bias")}


def _token_rows(table: torch.Tensor, words: torch.Tensor, codec, side: str) -> int:
    """Copy each of our symbols' checkpoint row into `table`; returns how many were found."""
    tok = codec.tokenizer
    if getattr(tok, "kind", None) != "pretrained":
        raise ConfigError(f"model.init_encoder needs data.{side}_tokenizer.kind: pretrained (the checkpoint's "
                          f"vocabulary; path: the same folder), not {tok.kind!r}")
    if len(codec.vocab) != table.shape[0]:
        raise ValueError(f"the {side} vocabulary has {len(codec.vocab)} symbols, the model {table.shape[0]}")
    found = 0
    for i, symbol in enumerate(codec.vocab.itos):
        cid = tok.checkpoint_id(symbol)
        if cid is not None and cid < words.shape[0]:
            table[i] = words[cid]
            found += 1
    return found


def _embedding(w: _Weights, emb, prefix: str, codec, side: str, sd: dict) -> str:
    tokens = emb.tokens.weight.detach().clone()
    found = _token_rows(tokens, w("embeddings.word_embeddings.weight"), codec, side)
    n = emb.max_positions
    positions = w("embeddings.position_embeddings.weight")[:n]
    if "embeddings.token_type_embeddings.weight" in w.tensors:
        positions = positions + w("embeddings.token_type_embeddings.weight")[0]
    sd[f"{prefix}.tokens.weight"] = tokens
    sd[f"{prefix}.positions.weight"] = positions
    sd[f"{prefix}.norm.weight"] = w("embeddings.LayerNorm.weight")
    sd[f"{prefix}.norm.bias"] = w("embeddings.LayerNorm.bias")
    return f"{prefix}: {found} of {len(codec.vocab)} {side} symbols' rows from the checkpoint"


def _self_attention(w: _Weights, bert: str, ours: str, sd: dict) -> None:
    q, k, v = (w.linear(f"{bert}.attention.self.{n}") for n in ("query", "key", "value"))
    sd[f"{ours}.weight"] = torch.cat([q["weight"], k["weight"], v["weight"]])
    sd[f"{ours}.bias"] = torch.cat([q["bias"], k["bias"], v["bias"]])


def _put(sd: dict, prefix: str, params: dict) -> None:
    for k, v in params.items():
        sd[f"{prefix}.{k}"] = v


def load_bert(model, c, source, target) -> list[str]:
    """Copy the checkpoint at `c.init_encoder` into `model` (a Transformer or an encoder-only family)."""
    folder = resolve_path(c.init_encoder)
    hf = read_bert_config(folder)
    check_options(c, hf, folder)
    w = _Weights(read_weights(folder), folder / "model.safetensors")
    sd: dict[str, torch.Tensor] = {}
    log = [f"model.init_encoder {folder}: encoder from {c.encoder_layers} of {hf['num_hidden_layers']} "
           "BERT layers", _embedding(w, model.src_embed, "src_embed", source, "source", sd)]
    for i in range(c.encoder_layers):
        bert, ours = f"encoder.layer.{i}", f"encoder.{i}"
        _self_attention(w, bert, f"{ours}.attn.qkv", sd)
        _put(sd, f"{ours}.attn.out", w.linear(f"{bert}.attention.output.dense"))
        _put(sd, f"{ours}.r1.norm", w.linear(f"{bert}.attention.output.LayerNorm"))
        _put(sd, f"{ours}.ff.up", w.linear(f"{bert}.intermediate.dense"))
        _put(sd, f"{ours}.ff.down", w.linear(f"{bert}.output.dense"))
        _put(sd, f"{ours}.r2.norm", w.linear(f"{bert}.output.LayerNorm"))
    if getattr(c, "init_decoder", False):
        log.append(_embedding(w, model.tgt_embed, "tgt_embed", target, "target", sd))
        for i in range(c.decoder_layers):
            bert, ours = f"encoder.layer.{i}", f"decoder.{i}"
            _self_attention(w, bert, f"{ours}.self_attn.qkv", sd)
            _put(sd, f"{ours}.self_attn.out", w.linear(f"{bert}.attention.output.dense"))
            _put(sd, f"{ours}.r1.norm", w.linear(f"{bert}.attention.output.LayerNorm"))
            _put(sd, f"{ours}.ff.up", w.linear(f"{bert}.intermediate.dense"))
            _put(sd, f"{ours}.ff.down", w.linear(f"{bert}.output.dense"))
            _put(sd, f"{ours}.r3.norm", w.linear(f"{bert}.output.LayerNorm"))
        log.append(f"decoder: self-attention and feed-forward of {c.decoder_layers} BERT layers; "
                   "cross-attention new")
    own = model.state_dict()
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{folder / 'model.safetensors'}: {k} would get shape {tuple(v.shape)}, "
                                  f"the model has {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)
    return log
