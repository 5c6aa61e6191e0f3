"""Hugging Face BART and Marian folders both ways (export/huggingface.py): our outputs equal
transformers' token for token (export), logits equal to 1e-4 (import), and bad folders are refused
naming the file and the problem. Every HF model is built offline at small sizes."""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from toyrun import records, toy_data, toy_raw, write_config  # noqa: E402
from transduce.checkpoint import CheckpointError  # noqa: E402
from transduce.cli import main  # noqa: E402
from transduce.config import Config  # noqa: E402
from transduce.data.pipeline import Batch  # noqa: E402
from transduce.data.vocab import BOS, EOS, PAD, SPECIALS, TextCodec, Vocab, WhitespaceTokenizer  # noqa: E402
from transduce.engine import build as build_engine  # noqa: E402
from transduce.engine.kernels import runs_on_kernels  # noqa: E402
from transduce.export import huggingface as hfx  # noqa: E402
from transduce.inference import LoadedRun  # noqa: E402
from transduce.models.transformer import TransformerConfig  # noqa: E402
from transduce.registry import build_model  # noqa: E402
from transduce.runs import load_run  # noqa: E402
from transduce.search import beam_search, greedy  # noqa: E402
from transduce import kernels  # noqa: E402

V = 30
SIZES = dict(d_model=16, heads=2, encoder_layers=2, decoder_layers=2, ff_dim=32, max_positions=64, dropout=0.0)
LAYOUTS = {
    "bart": dict(norm="post", positions="learned", embed_norm=True, embed_scale=False, share_embeddings=True,
                 activation="gelu", decoder_start="eos_bos", output_bias=True),
    "marian": dict(norm="post", positions="sinusoidal_halves", share_embeddings=True, activation="silu",
                   decoder_start="pad", output_bias=True),
}


def our_run(kind: str, seed: int) -> LoadedRun:
    """A random model of ours in a layout."""
    torch.manual_seed(seed)
    c = TransformerConfig(**SIZES, **LAYOUTS[kind])
    model = build_model(c, V, V)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    codec = TextCodec(WhitespaceTokenizer(), Vocab(SPECIALS + [f"w{i}" for i in range(V - 4)]))
    return LoadedRun(Config(model=c), model.eval(), codec, codec, {}, None)


@pytest.fixture(scope="module", params=["bart", "marian"])
def trained(request, tmp_path_factory):
    """(layout, run directory) of a small model of ours trained to reverse letters (its outputs end on
    their own, as a trained model's do)."""
    kind = request.param
    folder = tmp_path_factory.mktemp(f"trained-{kind}")
    raw = toy_raw(toy_data(folder, n=400), max_steps=250, save_every=0, log_every=50, lr=5e-3, warmup_steps=20)
    raw["model"].update(SIZES, **LAYOUTS[kind], dropout=0.1)
    raw["data"]["target_tokenizer"] = raw["data"]["source_tokenizer"] = {"kind": "whitespace"}
    assert main(["train", str(write_config(folder / "c.yaml", raw)), "--out", str(folder / "run")]) == 0
    return kind, folder / "run"


def hf_ids(rows: torch.Tensor, extra: int) -> list[list[int]]:
    """generate's sequences without the decoder's start (and BART's forced <s>), cut at </s>."""
    out = []
    for row in rows.tolist():
        row = row[1 + extra:]
        out.append([t for t in (row[: row.index(EOS)] if EOS in row else row) if t != PAD])
    return out


def test_export_loads_in_transformers_and_generates_ours(tmp_path, trained):
    kind, run_dir = trained
    assert main(["export", "--format", "huggingface", "--model", str(run_dir), str(tmp_path / "hf")]) == 0
    run = load_run(run_dir, engine="torch")
    out = tmp_path / "hf"
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(hf).__name__ == ("BartForConditionalGeneration" if kind == "bart" else "MarianMTModel")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("a b c h").input_ids == run.source.encode("a b c h")
    assert tok.decode(run.target.encode("h g a"), skip_special_tokens=True) == "h g a"
    g = random.Random(3)
    texts = [" ".join(g.choice("abcdefgh") for _ in range(g.randint(2, 8))) for _ in range(24)]
    ids = [run.source.encode(t) for t in texts]
    width = max(map(len, ids))
    src = torch.tensor([i + [PAD] * (width - len(i)) for i in ids])
    mask = src != PAD
    extra = len(run.model.start) - 1
    tgt_in = torch.tensor([[BOS] + i[:3] for i in ids if len(i) >= 3])
    rows = [k for k, i in enumerate(ids) if len(i) >= 3]
    with torch.no_grad():
        ours = run.model(Batch(src[rows], mask[rows], tgt_in, tgt_in))
        theirs = hf(input_ids=src[rows], attention_mask=mask[rows].long(),
                    decoder_input_ids=run.model.decoder_input(tgt_in)[0]).logits[:, extra:]
    assert (ours - theirs).abs().max() < 1e-4
    hf.generation_config.length_penalty = 0.0
    n = 20
    for beam in (1, 4):
        mine = ([h[0].tokens for h in greedy(run.model, src, mask, 0.0, n)] if beam == 1 else
                [h[0].tokens for h in beam_search(run.model, src, mask, beam, 1, 0.0, 0.0, n)])
        gen = hf.generate(input_ids=src, attention_mask=mask.long(), num_beams=beam, do_sample=False,
                          max_new_tokens=n + 1 + extra)
        assert all(0 < len(m) < n for m in mine) and len({tuple(m) for m in mine}) > 10, "outputs should vary"
        assert mine == hf_ids(gen, extra), (kind, beam)


def test_export_of_a_trained_subword_run(tmp_path):
    """A run trained by the CLI with a BPE vocabulary: the folder's tokenizer gives our ids and text."""
    g = random.Random(0)
    words = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "big", "ran"]
    lines = [" ".join(g.choice(words) for _ in range(g.randint(2, 6))) for _ in range(200)]
    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{s}\t{' '.join(reversed(s.split()))}\n" for s in lines))
    tok = {"kind": "bpe", "vocab_size": 60}
    raw = {"model": dict(family="transformer", **{k: v for k, v in SIZES.items()},
                         **dict(LAYOUTS["bart"], output_bias=False)),
           "data": {"train": str(data), "dev": str(data), "source_tokenizer": tok, "target_tokenizer": tok},
           "train": {"batch_tokens": 400, "lr": 3e-3, "warmup_steps": 5, "max_steps": 30, "eval_every": 0,
                     "threads": 1, "eval_max_items": 10},
           "eval": {"metrics": ["bleu"]}, "decode": {"beam": 2, "length_penalty": 0.0}}
    run_dir = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw)), "--out", str(run_dir)]) == 0
    assert main(["export", "--format", "huggingface", "--model", str(run_dir), str(tmp_path / "hf")]) == 0
    run = load_run(run_dir, engine="torch")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    for text in lines[:20]:
        ids = run.source.encode(text)
        assert tok(text).input_ids == ids
        assert tok.decode(run.target.encode(text), skip_special_tokens=True) == text
        src = torch.tensor([ids])
        tgt = torch.tensor([[BOS] + ids[:3]])
        ours = run.model(Batch(src, src != PAD, tgt, tgt))
        assert (ours - hf(input_ids=src, decoder_input_ids=run.model.decoder_input(tgt)[0]).logits[:, 1:]
                ).abs().max() < 1e-4


@pytest.mark.parametrize("change, named", [
    (dict(norm="pre"), "model.norm 'pre'"),
    (dict(positions="sinusoidal"), "model.positions 'sinusoidal'"),
    (dict(activation="swiglu"), "model.activation 'swiglu'"),
    (dict(share_embeddings=False), "model.share_embeddings"),
    (dict(embed_norm=False), "model.embed_norm"),
    (dict(norm_eps=1e-12), "model.norm_eps"),
])
def test_export_refuses_what_maps_onto_neither(change, named):
    c = TransformerConfig(**SIZES, **dict(LAYOUTS["bart"], **change))
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        hfx.hf_model_type(c)


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------

def hf_folder(kind: str, path: Path, vocab: int = 40, seed: int = 0, **config):
    """A random BART or Marian model of transformers saved with a word-level tokenizer, as
    save_pretrained writes them (config.json, model.safetensors, tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    if kind == "bart":
        words = ["<s>", "<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 5)] + ["<mask>"]
        model = transformers.BartForConditionalGeneration(
            transformers.BartConfig(**sizes, forced_bos_token_id=0, **config))
    else:  # opus-mt's layout: </s> 0, <unk> 1, ..., <pad> last; no <s>
        words = ["</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)] + ["<pad>"]
        model = transformers.MarianMTModel(transformers.MarianConfig(
            **sizes, pad_token_id=vocab - 1, decoder_start_token_id=vocab - 1, eos_token_id=0,
            activation_function="swish", scale_embedding=True, **config))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # not Marian's fixed sinusoidal table
                p.add_(torch.randn_like(p) * 0.1)
        model.final_logits_bias.normal_()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
        **({"bos_token": "<s>"} if kind == "bart" else {}))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()


def to_hf(codec: TextCodec, ids) -> list[int]:
    return [codec.tokenizer.checkpoint_id(codec.vocab.itos[i]) for i in ids]


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_import_gives_transformers_logits(tmp_path, kind):
    hf = hf_folder(kind, tmp_path / "hf")
    assert main(["import", "--format", "huggingface", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    engines = ["torch"] + (["kernels"] if kind == "marian" and kernels.ops() is not None else [])
    texts = ["w1 w5 w7 w3", "w30 w2", "w9 w9 w9 w9 w9 w8"]
    for engine in engines:
        run = load_run(tmp_path / "run", engine=engine)
        assert run.model.config.decoder_start == ("eos_bos" if kind == "bart" else "pad")
        for text in texts:
            ids = run.source.encode(text)
            # BART's tokenizer frames a source as <s> ... </s>, Marian's as ... </s>
            assert ids[-1] == EOS and (ids[0] == BOS) == (kind == "bart")
            src = torch.tensor([ids])
            tgt_in = torch.tensor([[BOS] + run.target.encode("w2 w9 w4 w11")])
            dec, extra = run.model.decoder_input(tgt_in)
            with torch.no_grad():
                ours = run.model(Batch(src, src != PAD, tgt_in, tgt_in))
                theirs = hf(input_ids=torch.tensor([to_hf(run.source, ids)]),
                            decoder_input_ids=torch.tensor([to_hf(run.target, dec[0])])).logits[:, extra:]
            rows = [i for i, s in enumerate(run.target.vocab.itos) if run.target.tokenizer.checkpoint_id(s) is not None
                    and run.target.tokenizer.checkpoint_id(s) < theirs.shape[-1]]
            assert len(rows) == theirs.shape[-1]
            cols = [run.target.tokenizer.checkpoint_id(run.target.vocab.itos[i]) for i in rows]
            assert (ours[..., rows] - theirs[..., cols]).abs().max() < 1e-4
            if kind == "marian":  # the <s> Marian lacks is never predicted
                assert ours.softmax(-1)[..., BOS].max() == 0
            # decoding step by step (the engine's path) gives the same next-token logits
            memory = run.model.encode(src, src != PAD)
            state = run.model.init_state(memory, 1, 8)
            for t in range(tgt_in.shape[1]):
                step, state = run.model.step(tgt_in[:, t], state)
                assert (step[0, rows] - theirs[0, t, cols]).abs().max() < 1e-4


def test_kernels_decline_a_two_token_decoder_start(tmp_path):
    run = our_run("bart", 0)
    assert "decoder_start 'eos_bos'" in runs_on_kernels(run.model)
    assert build_engine(run.model, "auto") is run.model  # auto: the torch engine
    if kernels.ops() is not None:
        with pytest.raises(ValueError, match="decoder_start"):
            build_engine(run.model, "kernels")
        marian = our_run("marian", 0)
        assert runs_on_kernels(marian.model) is None
        fast = build_engine(marian.model, "kernels")
        src = torch.randint(4, V, (5, 6), generator=torch.Generator().manual_seed(1))
        mask = src != PAD
        for beam in (1, 3):
            want = beam_search(marian.model, src, mask, beam, 1, 0.0, 0.0, 12)
            got = beam_search(fast, src, mask, beam, 1, 0.0, 0.0, 12)
            assert [h[0].tokens for h in got] == [h[0].tokens for h in want]


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_imported_run_translates_evaluates_exports_and_fine_tunes(tmp_path, kind, capsys):
    hf = hf_folder(kind, tmp_path / "hf")
    run_dir = tmp_path / "run"
    assert main(["import", "--format", "huggingface", str(tmp_path / "hf"), str(run_dir)]) == 0
    run = load_run(run_dir, engine="torch")
    sources = ["w1 w5 w7 w3", "w3 w2", "w9 w8 w7 w6 w5"]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    capsys.readouterr()
    assert main(["translate", "--model", str(run_dir), "--beam", "1", "--input", str(tmp_path / "in.txt")]) == 0
    outputs = capsys.readouterr().out.splitlines()
    # greedy generate of transformers, its length limit ours: a * source length + b tokens
    d = run.config.decode
    hf.generation_config.length_penalty = 0.0
    for text, line in zip(sources, outputs):
        ids = run.source.encode(text)
        limit = int(d.max_len_a * len(ids) + d.max_len_b)
        extra = len(run.model.start) - 1
        banned = [[run.target.tokenizer.checkpoint_id(s)] for s in SPECIALS[:3] if s != "<unk>"
                  and run.target.tokenizer.checkpoint_id(s) < hf.config.vocab_size]
        gen = hf.generate(input_ids=torch.tensor([to_hf(run.source, ids)]), num_beams=1, do_sample=False,
                          max_new_tokens=limit + 1 + extra, bad_words_ids=banned,
                          forced_bos_token_id=run.target.tokenizer.checkpoint_id("<s>") if extra else None)
        hf_out = gen[0].tolist()[1 + extra:]
        eos = run.target.tokenizer.checkpoint_id("</s>")
        hf_out = hf_out[: hf_out.index(eos)] if eos in hf_out else hf_out
        assert line == run.target.tokenizer.hf.decode(hf_out, skip_special_tokens=True)
    # evaluate
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{s}\t{' '.join(reversed(s.split()))}\n" for s in sources))
    assert main(["evaluate", "--model", str(run_dir), "--data", str(pairs), "--beam", "2"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert "bleu" in result and "chrf" in result
    # CTranslate2 (BART's <s> after its start token </s> goes as a target prefix)
    pytest.importorskip("ctranslate2")
    from transduce.export.ctranslate2 import CT2Translator
    from transduce.inference import decode

    assert main(["export", "--format", "ctranslate2", "--model", str(run_dir), str(tmp_path / "ct2")]) == 0
    ct2 = CT2Translator(tmp_path / "ct2", threads=1)
    for beam in (1, 2):
        ours = [h[0].tokens for h in decode(run, sources, beam=beam, nbest=1, batch_size=4)]
        assert ours == [h[0] for h in ct2.translate_ids([run.source.encode(s) for s in sources], beam=beam)]
    # back to Hugging Face: the same logits as the folder it came from
    assert main(["export", "--format", "huggingface", "--model", str(run_dir), str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "back").eval()
    ids = run.source.encode(sources[0])
    src = torch.tensor([ids])
    tgt = torch.tensor([[BOS, 5, 6]])
    dec = run.model.decoder_input(tgt)[0]
    ours = run.model(Batch(src, src != PAD, tgt, tgt))
    assert (ours - back(input_ids=src, decoder_input_ids=dec).logits[:, dec.shape[1] - 3:]).abs().max() < 1e-4
    # fine-tuning: from the run directory, and from the folder itself
    raw = {"model": dataclasses.asdict(run.model.config),
           "data": {"train": str(pairs), "dev": str(pairs)},
           "train": {"batch_tokens": 200, "lr": 1e-3, "warmup_steps": 2, "max_steps": 3, "eval_every": 0,
                     "threads": 1, "log_every": 1},
           "eval": {"metrics": ["bleu"]}, "decode": {"beam": 1}}
    for start in (run_dir, tmp_path / "hf"):
        raw["train"]["init_from"] = str(start)
        out = tmp_path / f"tuned-{start.name}"
        assert main(["train", str(write_config(tmp_path / "t.yaml", raw)), "--out", str(out)]) == 0
        first = next(r for r in records(out) if "loss_exact" in r)
        assert first["step"] == 1 and first["loss_exact"] == first["loss_exact"]  # finite, trained
        assert json.loads((out / "target_codec.json").read_text())["symbols"] == run.target.vocab.itos
    # a model config other than the checkpoint's is refused, naming the option
    raw["model"]["norm"] = "pre"
    assert main(["train", str(write_config(tmp_path / "t.yaml", raw)), "--out",
                 str(tmp_path / "bad")]) == 2
    assert "model.norm: 'pre'" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Bad folders: each refused, naming the file and the problem
# ---------------------------------------------------------------------------

def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_bad_folders(tmp_path):
    good = tmp_path / "good"
    hf_folder("bart", good)

    def copy(name: str) -> Path:
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    def refused(folder: Path, *parts: str) -> None:
        with pytest.raises(CheckpointError) as e:
            hfx.read_folder(folder)
        for part in parts:
            assert part in str(e.value), (part, str(e.value))

    refused(tmp_path / "nowhere", "no such checkpoint folder")
    f = copy("noconfig")
    (f / "config.json").unlink()
    refused(f, str(f / "config.json"), "missing")
    f = copy("t5")
    _edit_config(f, model_type="t5")
    refused(f, "config.json", "model_type 't5' is not supported", "bart, marian")
    f = copy("prenorm")
    _edit_config(f, normalize_before=True)
    refused(f, "config.json", "normalize_before=True")
    f = copy("gelu_new")
    _edit_config(f, activation_function="gelu_new")
    refused(f, "config.json", "activation_function 'gelu_new'")
    f = copy("heads")
    _edit_config(f, decoder_attention_heads=4)
    refused(f, "config.json", "decoder_attention_heads=4")
    f = copy("vocab")
    _edit_config(f, vocab_size=41)
    refused(f, str(f / "model.safetensors"), "vocab_size 41")
    f = copy("pickled")
    (f / "model.safetensors").unlink()
    (f / "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")
    refused(f, str(f / "model.safetensors"), "pytorch_model.bin", "never loads")
    f = copy("noweights")
    (f / "model.safetensors").unlink()
    refused(f, str(f / "model.safetensors"), "missing")
    f = copy("garbled")
    (f / "model.safetensors").write_bytes(b"\x00" * 16)
    refused(f, str(f / "model.safetensors"))
    f = copy("notok")
    (f / "tokenizer.json").unlink()
    (f / "source.spm").write_bytes(b"spm")
    refused(f, str(f / "tokenizer.json"), "missing", "source.spm")
    f = copy("badtok")
    (f / "tokenizer.json").write_text("{not json")
    refused(f, str(f / "tokenizer.json"), "not a readable tokenizer")
    f = copy("smalltok")  # a tokenizer of another vocabulary than the weights'
    hf_folder("bart", tmp_path / "other", vocab=30)
    shutil.copy(tmp_path / "other" / "tokenizer.json", f / "tokenizer.json")
    refused(f, str(f / "tokenizer.json"), "30 tokens", "40 rows")
    # the CLI says it in one line and exits 2
    assert main(["import", "--format", "huggingface", str(tmp_path / "t5"), str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
