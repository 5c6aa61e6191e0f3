"""Our Transformer as a Hugging Face BART or Marian checkpoint folder, and such a folder as a run.

    transduce export --format huggingface --model RUN_DIR OUT_DIR   (`export`)
    transduce import --format huggingface HF_DIR OUT_RUN_DIR        (`import_run`)

A folder is config.json, model.safetensors and the tokenizer (tokenizer.json,
tokenizer_config.json, special_tokens_map.json); `transformers` loads it with
`AutoModelForSeq2SeqLM` and `AutoTokenizer`. The two layouts map one to one:

- BART: post-norm, learned positions (HF's table has 2 unused rows in front,
  its "offset"), a LayerNorm on the embeddings, one embedding table for both
  sides, GELU (or ReLU/SiLU), the decoder starting from </s> and forced to
  write <s> first (our `decoder_start: eos_bos`).
- Marian: post-norm, sinusoidal positions with the sines in the first half
  (`positions: sinusoidal_halves`), embeddings times sqrt(d_model), SiLU
  ("swish"), the decoder starting from <pad> (`decoder_start: pad`).

Both keep a bias on the output (`final_logits_bias`: `model.output_bias`).
Fused projections split (q, k, v) and join on the way back. Ids: our
vocabularies start with <pad> <unk> <s> </s>; an imported checkpoint's rows
are permuted into that order (a Marian vocabulary has no <s>: it gets a new
row whose output bias keeps it at probability zero), and an exported one keeps
our ids, its config naming them. What maps onto neither is refused, naming the
option. Nothing is unpickled: weights must be safetensors.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from transduce.checkpoint import CheckpointError, load_tensors, read_json, save_checkpoint, save_tensors
from transduce.data.vocab import BOS, EOS, PAD, SPECIALS, UNK, PretrainedTokenizer, TextCodec, Vocab

MODEL_TYPES = ("bart", "marian")
# HF activation_function -> model.activation
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "swish": "silu", "silu": "silu"}
HF_ACTIVATION = {"gelu": "gelu", "relu": "relu", "silu": "swish"}
HF_EPS = 1e-5                 # BART's and Marian's LayerNorm epsilon (not configurable there)
BART_OFFSET = 2               # rows in front of BART's learned position table
# output bias of a row the checkpoint lacks (Marian's <s>): exp() of it is 0 in float32, and it stays
# finite for label smoothing when the run is fine-tuned
NEVER = -1e4


# ---------------------------------------------------------------------------
# Which of our configurations map onto which layout
# ---------------------------------------------------------------------------

def hf_model_type(c) -> str:
    """'bart' or 'marian' for a Transformer config that maps onto one exactly; ValueError naming the
    option that does not."""
    if getattr(c, "family", None) != "transformer":
        raise ValueError(f"Hugging Face export takes the transformer family, not {getattr(c, 'family', None)!r}")
    common = []
    if c.norm != "post":
        common.append(f"model.norm {c.norm!r} (BART and Marian are post-norm)")
    if c.activation not in HF_ACTIVATION:
        common.append(f"model.activation {c.activation!r} (BART and Marian take relu, gelu or silu)")
    if abs(c.norm_eps - HF_EPS) > 1e-12:
        common.append(f"model.norm_eps {c.norm_eps} (their LayerNorms use {HF_EPS})")
    if common:
        raise ValueError("maps onto neither BART nor Marian: " + "; ".join(common))
    if c.positions == "learned":
        if not c.embed_norm:
            raise ValueError("learned positions map onto BART, which needs model.embed_norm: true (its "
                             "layernorm_embedding); Marian needs positions: sinusoidal_halves")
        if not c.share_embeddings:
            raise ValueError("BART has one embedding table for both sides: needs model.share_embeddings: true")
        return "bart"
    if c.positions == "sinusoidal_halves":
        if c.embed_norm:
            raise ValueError("model.embed_norm: true maps onto BART (learned positions), not Marian "
                             "(positions: sinusoidal_halves)")
        return "marian"
    raise ValueError(f"model.positions {c.positions!r} maps onto neither: BART needs 'learned', Marian "
                     "'sinusoidal_halves' (sines, then cosines; ours interleaves them)")


def _layer_pairs(c):
    """(our tensor name, [HF names], HF prefix-free) per layer weight: several HF names are joined
    along dimension 0 into ours (fused projections)."""
    out = []
    for part in ("weight", "bias"):
        for i in range(c.encoder_layers):
            o, h = f"encoder.{i}.", f"encoder.layers.{i}."
            out += [(f"{o}attn.qkv.{part}", [f"{h}self_attn.{p}_proj.{part}" for p in "qkv"]),
                    (f"{o}attn.out.{part}", [f"{h}self_attn.out_proj.{part}"]),
                    (f"{o}r1.norm.{part}", [f"{h}self_attn_layer_norm.{part}"]),
                    (f"{o}ff.up.{part}", [f"{h}fc1.{part}"]),
                    (f"{o}ff.down.{part}", [f"{h}fc2.{part}"]),
                    (f"{o}r2.norm.{part}", [f"{h}final_layer_norm.{part}"])]
        for i in range(c.decoder_layers):
            o, h = f"decoder.{i}.", f"decoder.layers.{i}."
            out += [(f"{o}self_attn.qkv.{part}", [f"{h}self_attn.{p}_proj.{part}" for p in "qkv"]),
                    (f"{o}self_attn.out.{part}", [f"{h}self_attn.out_proj.{part}"]),
                    (f"{o}r1.norm.{part}", [f"{h}self_attn_layer_norm.{part}"]),
                    (f"{o}cross_attn.q.{part}", [f"{h}encoder_attn.q_proj.{part}"]),
                    (f"{o}cross_attn.kv.{part}", [f"{h}encoder_attn.{p}_proj.{part}" for p in "kv"]),
                    (f"{o}cross_attn.out.{part}", [f"{h}encoder_attn.out_proj.{part}"]),
                    (f"{o}r2.norm.{part}", [f"{h}encoder_attn_layer_norm.{part}"]),
                    (f"{o}ff.up.{part}", [f"{h}fc1.{part}"]),
                    (f"{o}ff.down.{part}", [f"{h}fc2.{part}"]),
                    (f"{o}r3.norm.{part}", [f"{h}final_layer_norm.{part}"])]
        if c.embed_norm:
            out += [(f"src_embed.norm.{part}", [f"encoder.layernorm_embedding.{part}"]),
                    (f"tgt_embed.norm.{part}", [f"decoder.layernorm_embedding.{part}"])]
    return out


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------

def _one_codec(run) -> TextCodec:
    """The codec an HF folder's one tokenizer stands for: source and target must agree."""
    s, t = run.source, run.target
    if s.vocab.itos != t.vocab.itos:
        raise ValueError("source and target vocabularies differ; a Hugging Face folder holds one tokenizer "
                         "and vocabulary (train with model.share_embeddings: true)")
    if s.tokenizer.to_dict() != t.tokenizer.to_dict():
        raise ValueError("source and target tokenizers differ; a Hugging Face folder holds one tokenizer")
    if s.reverse or t.reverse:
        raise ValueError("a reversed codec (data.*_tokenizer.reverse) has no Hugging Face equivalent")
    return s


def hf_config(run) -> dict:
    c, model = run.model.config, run.model
    kind = hf_model_type(c)
    v = len(run.target.vocab)
    cfg = {
        "model_type": kind, "architectures": ["BartForConditionalGeneration" if kind == "bart" else "MarianMTModel"],
        "vocab_size": v, "d_model": c.d_model, "max_position_embeddings": c.max_positions,
        "encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers,
        "encoder_attention_heads": c.heads, "decoder_attention_heads": c.heads,
        "encoder_ffn_dim": c.ff_dim, "decoder_ffn_dim": c.ff_dim,
        "activation_function": HF_ACTIVATION[c.activation], "dropout": c.dropout,
        "attention_dropout": c.attention_dropout, "activation_dropout": c.activation_dropout,
        "scale_embedding": bool(c.embed_scale), "tie_word_embeddings": bool(c.tie_output),
        "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS,
        "decoder_start_token_id": model.start[0], "forced_eos_token_id": EOS,
        "is_encoder_decoder": True,
    }
    if len(model.start) > 1:
        cfg["forced_bos_token_id"] = model.start[1]
    if kind == "marian":
        cfg["share_encoder_decoder_embeddings"] = bool(c.share_embeddings)
        cfg["decoder_vocab_size"] = v
    return cfg


def hf_tensors(model) -> dict[str, torch.Tensor]:
    """Our Transformer's weights under BART's or Marian's names (ids unchanged)."""
    c = model.config
    kind = hf_model_type(c)
    sd = model.state_dict()
    out = {}
    for ours, theirs in _layer_pairs(c):
        for name, part in zip(theirs, sd[ours].chunk(len(theirs), 0)):
            out[f"model.{name}"] = part.clone()
    src, tgt = model.src_embed.tokens.weight, model.tgt_embed.tokens.weight
    if kind == "bart" or c.share_embeddings:
        out["model.shared.weight"] = tgt
    else:
        out["model.encoder.embed_tokens.weight"] = src
        out["model.decoder.embed_tokens.weight"] = tgt
    for side, embed in (("encoder", model.src_embed), ("decoder", model.tgt_embed)):
        if kind == "bart":
            table = embed.positions.weight
            out[f"model.{side}.embed_positions.weight"] = torch.cat([table.new_zeros(BART_OFFSET, c.d_model), table])
        else:
            out[f"model.{side}.embed_positions.weight"] = embed.table
    if not c.tie_output:
        out["lm_head.weight"] = model.output.weight
    bias = model.output.bias
    out["final_logits_bias"] = (bias if bias is not None else torch.zeros(model.output.out_features))[None].detach()
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def _tokenizer_json(codec: TextCodec) -> str:
    """A tokenizers-library tokenizer with our ids: the codec's own (subword or pretrained) with its
    vocabulary renumbered, or a word-level one for character and whitespace codecs."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok, itos = codec.tokenizer, codec.vocab.itos
    if tok.kind in ("char", "whitespace"):
        hf = Tokenizer(models.WordLevel({s: i for i, s in enumerate(itos)}, unk_token=SPECIALS[UNK]))
        if tok.kind == "char":
            hf.pre_tokenizer = pre_tokenizers.Split(Regex("(?s)."), "isolated")
            hf.decoder = decoders.Fuse()
        else:
            hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        data = json.loads(hf.to_str())
        names = {s: s for s in itos}
    else:
        data = json.loads(tok.hf.to_str())
        unrename = getattr(tok, "unrename", {})
        names = {s: unrename.get(s, s) for s in itos}
        m = data["model"]
        if m["type"] in ("BPE", "WordPiece", "WordLevel"):
            m["vocab"] = {names[s]: i for i, s in enumerate(itos)}
        elif m["type"] == "Unigram":
            scores = {p: sc for p, sc in m["vocab"]}
            m["vocab"] = [[names[s], scores.get(names[s], -100.0)] for s in itos]
            m["unk_id"] = UNK
        else:
            raise ValueError(f"tokenizer model {m['type']!r} cannot be renumbered for export")
    ids = {names[s]: i for i, s in enumerate(itos)}
    added = {a["content"]: a for a in data.get("added_tokens") or []}
    for s in SPECIALS:
        added.setdefault(names[s], {"content": names[s], "single_word": False, "lstrip": False, "rstrip": False,
                                    "normalized": False, "special": True})
    data["added_tokens"] = [dict(a, id=ids[a["content"]]) for a in added.values() if a["content"] in ids]
    data["padding"] = data["truncation"] = None
    if getattr(tok, "lowercase", False):
        data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Lowercase"}] + (
            [data["normalizer"]] if data.get("normalizer") else [])}
    b, e = names[SPECIALS[BOS]], names[SPECIALS[EOS]]
    if codec.wrap or getattr(codec, "eos", False):
        single = f"{b}:0 $A:0 {e}:0" if codec.wrap else f"$A:0 {e}:0"
        proc = processors.TemplateProcessing(single=single, pair=single + " $B:1 " + e + ":1",
                                             special_tokens=[(b, BOS), (e, EOS)])
        data["post_processor"] = json.loads(proc.__getstate__())
    else:
        data["post_processor"] = None
    return json.dumps(data, ensure_ascii=False)


def export(run, out_dir: str | Path) -> Path:
    """Write `run` (a LoadedRun on the torch engine) as a Hugging Face BART or Marian folder."""
    model = run.model
    cfg = hf_config(run)
    codec = _one_codec(run)
    tokenizer = _tokenizer_json(codec)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    save_tensors(hf_tensors(model), tmp / "model.safetensors")
    (tmp / "tokenizer.json").write_text(tokenizer, encoding="utf-8")
    names = getattr(codec.tokenizer, "unrename", {})
    specials = {f"{k}_token": names.get(SPECIALS[i], SPECIALS[i])
                for k, i in (("pad", PAD), ("unk", UNK), ("bos", BOS), ("eos", EOS))}
    (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=1), encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps(dict(
        specials, tokenizer_class="PreTrainedTokenizerFast", model_max_length=model.config.max_positions,
        clean_up_tokenization_spaces=False), indent=1), encoding="utf-8")
    d = run.config.decode
    (tmp / "generation_config.json").write_text(json.dumps({
        "decoder_start_token_id": cfg["decoder_start_token_id"], "bos_token_id": BOS, "eos_token_id": EOS,
        "pad_token_id": PAD, "forced_eos_token_id": EOS, "num_beams": d.beam, "length_penalty": d.length_penalty,
        **({"forced_bos_token_id": cfg["forced_bos_token_id"]} if "forced_bos_token_id" in cfg else {}),
        # ours never writes <pad> or <s> (search.py); BART's forced <s> comes after this ban in generate
        "bad_words_ids": [[PAD], [BOS]],
    }, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
