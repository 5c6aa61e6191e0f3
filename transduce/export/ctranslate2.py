"""Export our Transformer to a CTranslate2 model, and decode with it.

The spec is built with `ctranslate2.specs` directly from our weights (no
converter in between). Our layout maps one to one: fused q/k/v in
self-attention, q and fused k/v in cross-attention, sinusoidal (interleaved)
or learned positions given to CTranslate2 as an explicit table, embeddings
scaled by sqrt(d_model) or not, with or without a LayerNorm after them
(BART/BERT-style stacks), our LayerNorm epsilon, gated feed-forward blocks
(GEGLU, SwiGLU) as CTranslate2's GLU (the up-projection's gate and linear
halves). Vocabulary symbols are written as the symbols' ids ("0", "1", ...)
so any symbol, including a space, survives the round trip;
`CT2Translator` maps text to those ids and back with our codecs.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from transduce.checkpoint import CheckpointError
from transduce.data.vocab import SPECIALS, TextCodec

CT2_SPECIALS = {0: "<blank>", 1: "<unk>", 2: "<s>", 3: "</s>"}  # CTranslate2's names for ours


def _require():
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        raise RuntimeError("CTranslate2 export needs: pip install 'transduce[ctranslate2]'") from None


def ct2_symbol(i: int) -> str:
    return CT2_SPECIALS.get(i, str(i))


def _np(t: torch.Tensor):
    """A copy: CTranslate2 rewrites the arrays of a spec in place (spec.optimize), and must never
    write into the model's own parameters."""
    return t.detach().float().numpy().copy()


def _linear(spec, linear: torch.nn.Linear) -> None:
    spec.weight = _np(linear.weight)
    if linear.bias is not None:
        spec.bias = _np(linear.bias)


def _ffn(spec, ff) -> None:
    """A feed-forward block; a gated one's up-projection splits into CTranslate2's gate (linear_0,
    activated) and linear (linear_0_noact) halves."""
    if ff.gated:
        n = ff.down.in_features
        for part, half in ((spec.linear_0, slice(0, n)), (spec.linear_0_noact, slice(n, 2 * n))):
            part.weight = _np(ff.up.weight[half])
            if ff.up.bias is not None:
                part.bias = _np(ff.up.bias[half])
    else:
        _linear(spec.linear_0, ff.up)
    _linear(spec.linear_1, ff.down)


_ACTIVATIONS = {"relu": ("RELU", False), "gelu": ("GELU", False), "silu": ("SWISH", False), "geglu": ("GELU", True),
                "swiglu": ("SWISH", True)}


def _norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma = _np(norm.weight)
    spec.beta = _np(norm.bias)


def _positions(embed) -> "object":
    table = embed.positions.weight if embed.positions is not None else embed.table
    return _np(table)


def build_spec(model):
    """A ctranslate2.specs.TransformerSpec holding the weights of our Transformer."""
    _require()
    from ctranslate2.specs import common_spec, transformer_spec

    c = model.config
    if c.family != "transformer":
        raise ValueError(f"CTranslate2 export supports the transformer family, not {c.family!r}")
    activation, glu = _ACTIVATIONS[c.activation]
    spec = transformer_spec.TransformerSpec.from_config(
        (c.encoder_layers, c.decoder_layers), c.heads, pre_norm=c.norm == "pre",
        activation=getattr(common_spec.Activation, activation), ffn_glu=glu, layernorm_embedding=c.embed_norm)
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = _np(model.src_embed.tokens.weight)
    enc.position_encodings.encodings = _positions(model.src_embed)
    dec.embeddings.weight = _np(model.tgt_embed.tokens.weight)
    dec.position_encodings.encodings = _positions(model.tgt_embed)
    # tokens (times sqrt(d_model) unless embed_scale is off) plus positions, then the embedding
    # LayerNorm of BART/BERT-style stacks: the order CTranslate2 applies them in too
    enc.scale_embeddings = dec.scale_embeddings = bool(c.embed_scale)
    if c.embed_norm:
        _norm(enc.layernorm_embedding, model.src_embed.norm)
        _norm(dec.layernorm_embedding, model.tgt_embed.norm)
    if c.norm == "pre":
        _norm(enc.layer_norm, model.enc_norm)
        _norm(dec.layer_norm, model.dec_norm)
    for ours, theirs in zip(model.encoder, enc.layer):
        _linear(theirs.self_attention.linear[0], ours.attn.qkv)
        _linear(theirs.self_attention.linear[1], ours.attn.out)
        _norm(theirs.self_attention.layer_norm, ours.r1.norm)
        _ffn(theirs.ffn, ours.ff)
        _norm(theirs.ffn.layer_norm, ours.r2.norm)
    for ours, theirs in zip(model.decoder, dec.layer):
        _linear(theirs.self_attention.linear[0], ours.self_attn.qkv)
        _linear(theirs.self_attention.linear[1], ours.self_attn.out)
        _norm(theirs.self_attention.layer_norm, ours.r1.norm)
        _linear(theirs.attention.linear[0], ours.cross_attn.q)
        _linear(theirs.attention.linear[1], ours.cross_attn.kv)
        _linear(theirs.attention.linear[2], ours.cross_attn.out)
        _norm(theirs.attention.layer_norm, ours.r2.norm)
        _ffn(theirs.ffn, ours.ff)
        _norm(theirs.ffn.layer_norm, ours.r3.norm)
    _linear(dec.projection, model.output)  # with Marian's or BART's bias (model.output_bias)
    return spec


def export(run, out_dir: str | Path, quantization: str | None = None) -> Path:
    """Write a CTranslate2 model of `run` (a LoadedRun) plus our codecs into `out_dir`."""
    spec = build_spec(run.model)
    spec.config.layer_norm_epsilon = run.model.config.norm_eps
    # the decoder's first input (model.decoder_start); BART's second, <s>, is a target prefix (CT2Translator)
    spec.config.decoder_start_token = ct2_symbol(run.model.start[0])
    spec.register_source_vocabulary([ct2_symbol(i) for i in range(len(run.source.vocab))])
    spec.register_target_vocabulary([ct2_symbol(i) for i in range(len(run.target.vocab))])
    spec.validate()
    spec.optimize(quantization=quantization)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    spec.save(str(tmp))
    (tmp / "source_codec.json").write_text(run.source.dumps(), encoding="utf-8")
    (tmp / "target_codec.json").write_text(run.target.dumps(), encoding="utf-8")
    (tmp / "transduce.json").write_text(json.dumps({
        "format": "ctranslate2", "quantization": quantization or "float32",
        "decode": run.config.decode.__dict__, "source_run": str(run.checkpoint),
        "max_output_len": run.model.config.max_positions - len(run.model.start),
        "decoder_prefix": [ct2_symbol(t) for t in run.model.start[1:]]}, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


class CT2Translator:
    """Decode with an exported CTranslate2 model, mirroring our search settings."""

    def __init__(self, path: str | Path, threads: int = 0, compute_type: str = "default", workers: int = 1):
        """`threads` in all (0: every core), split between `workers` batches decoded at once
        (CTranslate2's inter_threads; intra_threads = threads / workers)."""
        _require()
        import ctranslate2

        path = Path(path)
        meta_path = path / "transduce.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{meta_path}: missing (not a transduce CTranslate2 export)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.source = TextCodec.from_dict(json.loads((path / "source_codec.json").read_text(encoding="utf-8")))
        self.target = TextCodec.from_dict(json.loads((path / "target_codec.json").read_text(encoding="utf-8")))
        if workers < 1:
            raise ValueError(f"workers must be at least 1 (got {workers})")
        intra = max(1, (threads or os.cpu_count() or 1) // workers)
        self.translator = ctranslate2.Translator(str(path), device="cpu", compute_type=compute_type,
                                                 intra_threads=intra, inter_threads=workers)
        self.decode_cfg = self.meta["decode"]

    def translate_ids(self, sources: list[list[int]], beam: int, nbest: int = 1, batch_size: int = 200,
                      per_source_limit: bool = True) -> list[list[list[int]]]:
        """Output ids per source. `per_source_limit` applies our a*len+b limit exactly (one call per
        length group); otherwise one limit per batch (faster, for long inputs it can differ)."""
        a, b = self.decode_cfg["max_len_a"], self.decode_cfg["max_len_b"]
        lp = self.decode_cfg["length_penalty"]
        out: list[list[list[int]]] = [[[]] for _ in sources]
        todo = sorted((i for i in range(len(sources)) if sources[i]), key=lambda i: len(sources[i]))
        groups: list[list[int]] = []
        for i in todo:
            same = groups and len(groups[-1]) < batch_size and (
                not per_source_limit or len(sources[groups[-1][0]]) == len(sources[i]))
            if same:
                groups[-1].append(i)
            else:
                groups.append([i])
        prefix = self.meta.get("decoder_prefix", [])  # BART's <s> after its start token </s>
        pending = []  # submitted at once: the translator's workers (inter_threads) take them in turn
        for idx in groups:
            limit = max(1, min(int(a * max(len(sources[i]) for i in idx) + b),
                               self.meta.get("max_output_len", 1 << 30)))  # as our search: positions
            pending.append((idx, self.translator.translate_batch(
                [[ct2_symbol(t) for t in sources[i]] for i in idx], beam_size=beam, num_hypotheses=nbest,
                # min_decoding_length: CTranslate2's default (1) forbids the end token at the first
                # step, where ours allows an empty output
                target_prefix=[prefix] * len(idx) if prefix else None,
                max_decoding_length=limit + len(prefix), min_decoding_length=0,
                length_penalty=lp if beam > 1 else 0.0,
                suppress_sequences=[[CT2_SPECIALS[0]], [CT2_SPECIALS[2]]], return_end_token=False,
                asynchronous=True)))
        for idx, results in pending:
            for i, r in zip(idx, results):
                out[i] = [[int(t) if t not in ("<unk>",) else 1 for t in hyp[len(prefix):]]
                          for hyp in r.result().hypotheses]
        return out

    def translate(self, texts: list[str], beam: int = 1, nbest: int = 1, batch_size: int = 200) -> list[list[str]]:
        ids = [self.source.encode(t) for t in texts]
        return [[self.target.decode(h) for h in hyps] for hyps in self.translate_ids(ids, beam, nbest, batch_size)]
