"""Our Transformer as a Hugging Face BART or Marian checkpoint folder, and such a folder as a run.

    transduce export --format huggingface --model RUN_DIR OUT_DIR   (`export`)
    transduce import --format huggingface HF_DIR OUT_RUN_DIR        (`read_folder`; runs.import_huggingface)

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
import os
import shutil
from pathlib import Path

import torch

from transduce.checkpoint import CheckpointError, load_tensors, read_json, save_tensors
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


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------

# What transformers assumes where a config.json leaves a key out (BartConfig, MarianConfig).
HF_DEFAULTS = {
    "bart": {"activation_function": "gelu", "scale_embedding": False, "pad_token_id": 1, "bos_token_id": 0,
             "eos_token_id": 2, "decoder_start_token_id": 2, "tie_word_embeddings": True,
             "max_position_embeddings": 1024, "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0},
    "marian": {"activation_function": "gelu", "scale_embedding": False, "pad_token_id": 58100, "bos_token_id": None,
               "eos_token_id": 0, "decoder_start_token_id": 58100, "tie_word_embeddings": True,
               "max_position_embeddings": 1024, "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0,
               "share_encoder_decoder_embeddings": True},
}
SIZES = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "vocab_size")
# Options of BART- and Marian-like configs (mBART, fairseq conversions) that change the computation
# and have no equivalent here: key -> the value that matches what we compute.
NEUTRAL = {"normalize_before": False, "add_final_layer_norm": False, "add_bias_logits": False,
           "static_position_embeddings": None, "normalize_embedding": None, "layernorm_variant": None}


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face checkpoint folder rather than a run directory: config.json, no config.yaml."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "config.yaml").is_file()


class Imported:
    """A Hugging Face checkpoint read as ours: the Transformer config, codecs, tensors (our names)."""

    def __init__(self, folder: Path, model_config, source: TextCodec, target: TextCodec,
                 tensors: dict[str, torch.Tensor], decode: dict):
        self.folder, self.model_config, self.source, self.target = folder, model_config, source, target
        self.tensors, self.decode = tensors, decode


def _refuse(folder: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{folder / 'config.json'}: {problem}")


def _model_config(folder: Path, hf: dict):
    from transduce.models.transformer import TransformerConfig

    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise _refuse(folder, f"model_type {kind!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
    get = lambda k: hf.get(k, HF_DEFAULTS[kind].get(k))  # noqa: E731
    missing = [k for k in SIZES if not isinstance(hf.get(k), int)]
    if missing:
        raise _refuse(folder, f"needs integer {', '.join(missing)}")
    for key, neutral in NEUTRAL.items():
        if key in hf and hf[key] not in (neutral, None) and not (key == "static_position_embeddings"
                                                                 and kind == "marian" and hf[key]):
            raise _refuse(folder, f"option {key}={hf[key]!r} is not supported (no equivalent in our Transformer)")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(b, hf[a]) != hf[a]:
            raise _refuse(folder, f"{a}={hf[a]} and {b}={hf[b]} differ; our Transformer has one value for both")
    act = get("activation_function")
    if act not in ACTIVATIONS:
        raise _refuse(folder, f"activation_function {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    if kind == "marian":
        if not get("share_encoder_decoder_embeddings"):
            raise _refuse(folder, "share_encoder_decoder_embeddings=false (separate target vocabulary) is not "
                                  "supported")
        if hf.get("decoder_vocab_size") not in (None, hf["vocab_size"]):
            raise _refuse(folder, f"decoder_vocab_size={hf['decoder_vocab_size']} differs from vocab_size="
                                  f"{hf['vocab_size']}; a separate target vocabulary is not supported")
        if get("decoder_start_token_id") != get("pad_token_id"):
            raise _refuse(folder, f"decoder_start_token_id={get('decoder_start_token_id')} is not pad_token_id="
                                  f"{get('pad_token_id')}: Marian decoders start from <pad>")
        start = "pad"
    else:
        if get("decoder_start_token_id") != get("eos_token_id"):
            raise _refuse(folder, f"decoder_start_token_id={get('decoder_start_token_id')} is not eos_token_id="
                                  f"{get('eos_token_id')}: BART decoders start from </s>")
        if hf.get("forced_bos_token_id") not in (None, get("bos_token_id")):
            raise _refuse(folder, f"forced_bos_token_id={hf['forced_bos_token_id']} is not bos_token_id "
                                  "(a language code, as in mBART, is not supported)")
        start = "eos_bos"
    return TransformerConfig(
        d_model=hf["d_model"], heads=hf["encoder_attention_heads"], encoder_layers=hf["encoder_layers"],
        decoder_layers=hf["decoder_layers"], ff_dim=hf["encoder_ffn_dim"], dropout=float(get("dropout")),
        attention_dropout=float(get("attention_dropout")), activation_dropout=float(get("activation_dropout")),
        activation=ACTIVATIONS[act], norm="post", positions="learned" if kind == "bart" else "sinusoidal_halves",
        max_positions=int(get("max_position_embeddings")), embed_scale=bool(get("scale_embedding")),
        embed_norm=kind == "bart", norm_eps=HF_EPS, share_embeddings=True, tie_output=bool(get("tie_word_embeddings")),
        output_bias=False, decoder_start=start), get


def _weights_file(folder: Path) -> Path:
    path = folder / "model.safetensors"
    if path.is_file():
        return path
    if (folder / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"{folder / 'model.safetensors.index.json'}: sharded weights are not supported; "
                              "save them as one model.safetensors (save_pretrained(..., max_shard_size='100GB'))")
    pickled = [p.name for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled:
        raise CheckpointError(f"{path}: missing; found {', '.join(pickled)}, pickle-based PyTorch files that "
                              "transduce never loads (unpickling can run arbitrary code). Convert trusted weights "
                              "with transformers: model.save_pretrained(DIR, safe_serialization=True)")
    raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint folder needs config.json, "
                          "model.safetensors and tokenizer.json)")


def _tokenizer(folder: Path, kind: str):
    """The folder's tokenizer.json as a PretrainedTokenizer (Marian's gets the <s> ours needs)."""
    from tokenizers import AddedToken, Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        spm = [n for n in ("source.spm", "target.spm", "spiece.model", "sentencepiece.bpe.model")
               if (folder / n).is_file()]
        hint = (f"; the folder has {', '.join(spm)} (a sentencepiece tokenizer): save it as tokenizer.json "
                "(transformers' PreTrainedTokenizerFast, or tokenizers' SentencePieceUnigramTokenizer.from_spm)"
                if spm else "")
        raise CheckpointError(f"{path}: missing{hint}")
    try:
        hf = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exceptions for malformed files
        raise CheckpointError(f"{path}: not a readable tokenizer ({e})") from None
    size = hf.get_vocab_size(with_added_tokens=True)  # the checkpoint's own tokens
    if kind == "marian" and hf.token_to_id(SPECIALS[BOS]) is None:
        hf.add_special_tokens([AddedToken(SPECIALS[BOS], special=True)])
    try:
        return PretrainedTokenizer(hf.to_str()), size
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_folder(folder: str | Path) -> Imported:
    """A BART or Marian checkpoint folder as our Transformer config, codecs and tensors; a
    CheckpointError naming the file and the problem where it does not fit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    hf = read_json(folder / "config.json")
    if not isinstance(hf, dict):
        raise _refuse(folder, "not a JSON object")
    mc, get = _model_config(folder, hf)
    kind = hf["model_type"]
    wpath = _weights_file(folder)
    tok, tok_size = _tokenizer(folder, kind)
    raw = {k.removeprefix("model."): v.float() for k, v in load_tensors(wpath).items()}

    def tensor(name: str, rows: int | None = None) -> torch.Tensor:
        if name not in raw:
            raise CheckpointError(f"{wpath}: no tensor {name!r} (a {kind} checkpoint has it)")
        t = raw[name]
        if rows is not None and t.shape[0] != rows:
            raise CheckpointError(f"{wpath}: tensor {name!r} has {t.shape[0]} rows, config.json says {rows}")
        return t

    emb_name = next((n for n in ("shared.weight", "encoder.embed_tokens.weight") if n in raw), "shared.weight")
    emb = tensor(emb_name)
    rows, d = emb.shape
    if rows != hf["vocab_size"] or d != mc.d_model:
        raise CheckpointError(f"{wpath}: tensor {emb_name!r} is {rows} x {d}, but {folder / 'config.json'} says "
                              f"vocab_size {hf['vocab_size']}, d_model {mc.d_model}")
    if tok_size != rows:
        raise CheckpointError(f"{folder / 'tokenizer.json'}: {tok_size} tokens, but the embeddings in {wpath.name} "
                              f"have {rows} rows (vocab_size {hf['vocab_size']}): vocabulary and weights disagree")
    # our ids 0..3 are <pad> <unk> <s> </s>; the config's ids must name those tokens
    for key, ours in (("pad_token_id", PAD), ("eos_token_id", EOS), ("bos_token_id", BOS)):
        want = get(key)
        if want is None:
            continue
        got = tok.checkpoint_id(SPECIALS[ours])
        if got != want:
            raise CheckpointError(f"{folder / 'config.json'}: {key}={want}, but {SPECIALS[ours]!r} is id {got} "
                                  f"in {folder / 'tokenizer.json'}")
    vocab = Vocab(tok.symbols())
    index = [tok.checkpoint_id(s) for s in vocab.itos]
    new = [i for i, j in enumerate(index) if j is None or j >= rows]
    take = torch.tensor([0 if i in new else j for i, j in zip(range(len(index)), index)])

    def permuted(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        out = t.index_select(0, take)
        if new:
            out[new] = fill
        return out

    sd = {}
    for ours, theirs in _layer_pairs(mc):
        sd[ours] = torch.cat([tensor(n) for n in theirs], 0)
    sd["src_embed.tokens.weight"] = sd["tgt_embed.tokens.weight"] = permuted(emb)
    for side, ours in (("encoder", "src_embed"), ("decoder", "tgt_embed")):
        name = f"{side}.embed_positions.weight"
        if kind == "bart":
            sd[f"{ours}.positions.weight"] = tensor(name, mc.max_positions + BART_OFFSET)[BART_OFFSET:]
        elif name in raw:
            from transduce.models.layers import sinusoidal_table

            table = raw[name]
            expect = sinusoidal_table(mc.max_positions, mc.d_model, halves=True)
            if table.shape != expect.shape or (table - expect).abs().max() > 1e-4:
                raise CheckpointError(f"{wpath}: tensor {name!r} is not Marian's sinusoidal table for "
                                      f"max_position_embeddings {mc.max_positions}, d_model {mc.d_model}")
    if not mc.tie_output:
        sd["output.weight"] = permuted(tensor("lm_head.weight", rows))
    bias = raw.get("final_logits_bias")
    bias = torch.zeros(rows) if bias is None else bias.reshape(-1)
    if bias.shape[0] != rows:
        raise CheckpointError(f"{wpath}: final_logits_bias has {bias.shape[0]} entries, the vocabulary {rows}")
    if new or bias.abs().max() > 0:
        mc.output_bias = True
        sd["output.bias"] = permuted(bias[:, None], NEVER)[:, 0]
    source = TextCodec(tok, vocab, wrap=kind == "bart", eos=kind == "marian")
    target = TextCodec(tok, vocab)
    gen = {}
    if (folder / "generation_config.json").is_file():
        gen = read_json(folder / "generation_config.json")
    decode = {"beam": int(gen.get("num_beams", hf.get("num_beams", 4)) or 4),
              "length_penalty": float(gen.get("length_penalty", hf.get("length_penalty", 1.0)))}
    return Imported(folder, mc, source, target, sd, decode)


def imported_model(imp: Imported):
    """Our Transformer holding an imported checkpoint's weights."""
    from transduce.checkpoint import load_model_tensors, model_tensors
    from transduce.registry import build_model

    v = len(imp.target.vocab)
    model = build_model(imp.model_config, v, v)
    expected = model_tensors(model)
    load_model_tensors(model, {k: imp.tensors[k] for k in expected}, imp.folder / "model.safetensors")
    return model.eval()
