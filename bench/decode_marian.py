"""Decoding speed on an imported Marian model of opus-mt-en-de's sizes (random weights): transduce
(engines torch and kernels, float32 and int8) vs Hugging Face `generate` vs CTranslate2 float32 and int8,
greedy and beam 4.

    nice python bench/decode_marian.py [--data ../shared/data/multi30k/val.en] [--lines 200] [--threads 2]

The model: MarianConfig with d_model 512, 6+6 layers, 8 heads, ff 2048, vocabulary 58,101, swish,
scaled embeddings, built offline by `transformers` with random weights, saved with a BPE tokenizer
(trained on the data's own lines, filled with unused tokens up to 58,101) and read with
`transduce import --format huggingface`. Every system decodes the same weights with at most
`source length` output tokens per sentence (random weights rarely end earlier): ours and CTranslate2 per
sentence, `generate` per batch (max_new_tokens of its longest source; its batches are sorted by length,
as ours are). Batches of `--batch` sentences. Prints sentences/s and output tokens/s per system and
ratios to CTranslate2 int8 and HF; needs the `bench` extra (transformers, ctranslate2).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 58101


def marian_folder(folder: Path, lines: list[str]) -> None:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=8000, special_tokens=["</s>", "<unk>"],
                                                      show_progress=False))
    tok.add_tokens([f"<unused{i}>" for i in range(VOCAB - 1 - tok.get_vocab_size())])
    tok.add_special_tokens(["<pad>"])  # Marian's pad is its last id
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id("<pad>") == VOCAB - 1
    torch.manual_seed(0)
    cfg = transformers.MarianConfig(vocab_size=VOCAB, d_model=512, encoder_layers=6, decoder_layers=6,
                                    encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                                    decoder_ffn_dim=2048, max_position_embeddings=512, activation_function="swish",
                                    scale_embedding=True, pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1,
                                    eos_token_id=0)
    model = transformers.MarianMTModel(cfg)
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                         eos_token="</s>").save_pretrained(folder)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    found = [p / "shared/data/multi30k/val.en" for p in Path(__file__).resolve().parents
             if (p / "shared/data/multi30k/val.en").is_file()]
    ap.add_argument("--data", default=str(found[0]) if found else None, required=not found,
                    help="sentences, one a line (default: shared/data/multi30k/val.en above this checkout)")
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf-beam", action="store_true", help="leave out HF generate with beam 4 (the slowest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transduce.export.ctranslate2 import CT2Translator, export
    from transduce.inference import decode
    from transduce.runs import import_huggingface, load_run

    lines = Path(args.data).read_text(encoding="utf-8").splitlines()
    texts = lines[: args.lines]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        marian_folder(tmp / "hf", lines)
        import_huggingface(tmp / "hf", tmp / "run")
        base = load_run(tmp / "run", engine="torch")
        base.config.decode.max_len_a, base.config.decode.max_len_b = 1.0, 0
        src = [base.source.encode(t) for t in texts]
        print(f"{len(texts)} sentences, {sum(map(len, src)) / len(src):.1f} source tokens on average; "
              f"{sum(p.numel() for p in base.model.parameters()) / 1e6:.1f}M parameters; threads {args.threads}")
        results = {}

        def report(name, seconds, outputs):
            n_tok = sum(len(o) for o in outputs)
            results[name] = seconds
            print(f"{name:32s} {seconds:7.2f} s  {len(texts) / seconds:7.1f} sent/s  {n_tok / seconds:8.1f} tok/s",
                  flush=True)

        for beam in (1, 4):
            for engine, quant in (("torch", None), ("kernels", None), ("kernels", "int8")):
                run = load_run(tmp / "run", engine=engine, quantize=quant)
                run.config.decode.max_len_a, run.config.decode.max_len_b = 1.0, 0
                decode(run, texts[:8], beam=beam, nbest=1, batch_size=args.batch)  # warm-up
                hyps, s = timed(lambda: decode(run, texts, beam=beam, nbest=1, batch_size=args.batch))
                report(f"transduce {engine} {quant or 'f32'} beam {beam}", s, [h[0].tokens for h in hyps])
            for quant in (None, "int8"):
                out = export(base, tmp / f"ct2-{quant}", quant)
                ct2 = CT2Translator(out, threads=args.threads)
                ct2.translate_ids(src[:8], beam=beam)
                hyps, s = timed(lambda: ct2.translate_ids(src, beam=beam, batch_size=args.batch))
                report(f"ctranslate2 {quant or 'f32'} beam {beam}", s, [h[0] for h in hyps])
            if beam == 4 and args.skip_hf_beam:
                continue
            hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp / "hf").eval()
            hf_tok = transformers.AutoTokenizer.from_pretrained(tmp / "hf")
            ids = [hf_tok(t).input_ids for t in texts]
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            pad = hf.config.pad_token_id

            def run_hf():
                outs = []
                with torch.no_grad():
                    for k in range(0, len(order), args.batch):
                        rows = [ids[i] for i in order[k: k + args.batch]]
                        w = max(map(len, rows))
                        x = torch.tensor([r + [pad] * (w - len(r)) for r in rows])
                        g = hf.generate(input_ids=x, attention_mask=(x != pad).long(), num_beams=beam,
                                        do_sample=False, max_new_tokens=w, bad_words_ids=[[pad]])
                        outs += [[t for t in r[1:] if t not in (pad, 0)] for r in g.tolist()]
                return outs

            outs, s = timed(run_hf)
            report(f"HF generate f32 beam {beam}", s, outs)
        print("ratios (time of the other / ours, kernels int8):")
        for beam in (1, 4):
            ours = results[f"transduce kernels int8 beam {beam}"]
            for other in ("ctranslate2 int8", "ctranslate2 f32", "HF generate f32"):
                key = f"{other} beam {beam}"
                if key in results:
                    print(f"  beam {beam}: {other}: {results[key] / ours:.2f}x")


if __name__ == "__main__":
    main()
