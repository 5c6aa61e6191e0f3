"""Command line: `transduce train | translate | evaluate | average | export | import | attention | classify | tag |
generate | score | serve | info`.

A thin layer over importable functions; every option is documented in --help.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _train(args) -> int:
    from transduce.registry import load_config
    from transduce.training import distributed
    from transduce.training.trainer import train

    cfg = load_config(args.config, args.set or [])
    if args.nproc > 1 and not distributed.launched():  # re-launch as N processes through torchrun
        argv = ["-v"] * args.verbose + ["train", args.config, "--out", args.out]
        return distributed.relaunch(args.nproc, argv + [a for s in args.set or [] for a in ("--set", s)])
    state = train(cfg, args.out)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"step": state["step"], "stop_reason": state["stop_reason"],
                          "best": state["best"], "best_step": state["best_step"]}))
    return 0


def _read_inputs(args) -> list[str]:
    from transduce.data.readers import read_lines

    if args.input:
        return read_lines(Path(args.input))
    data = sys.stdin.buffer.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"<stdin>:{line}: invalid UTF-8") from None
    lines = text.split("\n")
    last = lines.pop()  # after the last LF: a line of its own unless empty; no LF ends it, so a CR there is text
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]  # one CRLF's CR; others are text
    return lines + [last] if last else lines


def _one_line(text: str) -> str:
    """An output as one line: a CR or LF inside it (possible in a character vocabulary) becomes a space."""
    return text.replace("\r", " ").replace("\n", " ")


def _translate(args) -> int:
    _threads(args.threads)
    if args.engine == "ctranslate2":
        from transduce.export.ctranslate2 import CT2Translator

        if _controls_asked(args):
            raise ValueError("decoding controls (--constraints, --prefix, --min-length, ...) need --engine torch, "
                             "kernels or auto")
        if args.attention or args.quantize in ("int8", "auto") or len(args.model) > 1:
            what = "--attention" if args.attention else "--quantize" if len(args.model) == 1 else "an ensemble"
            raise ValueError(f"{what} needs --engine torch, kernels or auto "
                             "(a CTranslate2 model is quantized by `transduce export --quantization`)")
        ct2 = CT2Translator(args.model[0], threads=args.threads or 0, workers=_workers(args) or 1)
        sources = _read_inputs(args)
        outputs = ct2.translate(sources, args.beam or ct2.decode_cfg["beam"], args.nbest or 1,
                                args.batch_size or ct2.decode_cfg["batch_size"])
    else:
        if args.attention and len(args.model) > 1:
            raise ValueError("--attention shows one model's cross-attention; an ensemble has none of its own")
        from transduce.inference import decode, output_text

        run = _decoding_run(args)
        sources = _read_inputs(args)
        prefixes, constraints = _apply_controls(args, run)
        found = decode(run, sources, args.beam, args.nbest, args.batch_size, workers=_workers(args),
                       prefixes=prefixes, constraints=constraints)
        outputs = [[output_text(run, s, h) for h in hyps] for s, hyps in zip(sources, found)]
        _write_details(args, outputs, found)
    lines = []
    for hyps in outputs:
        if args.nbest and args.nbest > 1:
            lines.append("\t".join(_one_line(h).replace("\t", " ") for h in hyps))
        else:
            lines.append(_one_line(hyps[0]))
    if args.attention:
        from transduce.attention import attention_records, write_jsonl

        write_jsonl(attention_records(run, sources, [h[0] for h in outputs]), Path(args.attention))
    text = "".join(line + "\n" for line in lines)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


# command-line option -> DecodeConfig field, for the controls of transduce/controls.py
CONTROL_OPTIONS = {"min_length": "min_length", "no_repeat_ngram": "no_repeat_ngram",
                   "repetition_penalty": "repetition_penalty", "eos_bonus": "eos_bonus", "ban": "banned",
                   "ordered_constraints": "constraints_ordered", "coverage_penalty": "coverage_penalty",
                   "alternatives": "alternatives", "replace_unk": "replace_unk", "constraint": "constraints",
                   "prefix_text": "prefix"}


def _controls_asked(args) -> bool:
    return any(getattr(args, o, None) not in (None, False, []) for o in CONTROL_OPTIONS) or any(
        getattr(args, o, None) for o in ("prefix", "constraints", "alignment", "scores"))


def _apply_controls(args, run) -> tuple[list[str] | None, list[list[str]] | None]:
    """The command's decoding controls into run.config.decode (validated); returns the per-input
    prefixes (--prefix FILE, one line per input) and constraints (--constraints FILE, one line per
    input, phrases separated by tabs; an empty line: none)."""
    import dataclasses

    from transduce.data.readers import read_lines

    cfg = run.config.decode
    changes = {field: getattr(args, o) for o, field in CONTROL_OPTIONS.items()
               if getattr(args, o, None) not in (None, False, [])}
    if getattr(args, "alignment", None):
        changes["alignments"] = True
    if getattr(args, "scores", None):
        changes["token_scores"] = True
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
        cfg.validate()
        run.config.decode = cfg
    prefixes = read_lines(Path(args.prefix)) if getattr(args, "prefix", None) else None
    constraints = None
    if getattr(args, "constraints", None):
        constraints = [[c for c in line.split("\t") if c.strip()] for line in read_lines(Path(args.constraints))]
    return prefixes, constraints


def _write_details(args, outputs: list[list[str]], found) -> None:
    """--alignment FILE: the best output's Pharaoh alignment per input; --scores FILE: per input, a
    JSON list of each output's text, score, log-probability and token log-probabilities."""
    from transduce.inference import pharaoh

    if getattr(args, "alignment", None):
        Path(args.alignment).write_text("".join(pharaoh(h[0]) + "\n" for h in found), encoding="utf-8")
    if getattr(args, "scores", None):
        lines = []
        for texts, hyps in zip(outputs, found):
            lines.append(json.dumps([{"output": t, "score": round(h.score, 6), "logprob": round(h.logprob, 6),
                                      "token_logprobs": [round(x, 6) for x in h.token_logprobs or []],
                                      **({"alignment": pharaoh(h)} if h.alignment is not None else {})}
                                     for t, h in zip(texts, hyps)], ensure_ascii=False))
        Path(args.scores).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _decoding_run(args):
    """The run of `--model`, its model quantized as `--quantize` says, or else as the run's
    decode.quantize ("none": float32 whatever the run says). Several run directories: their
    ensemble, each member quantized so, decoding with the first one's settings."""
    from transduce.runs import load_decoding_run

    return load_decoding_run(args.model, args.quantize, getattr(args, "engine", None))


def _evaluate(args) -> int:
    from transduce.data.pipeline import load_splits
    from transduce.data.readers import read_pairs
    from transduce.inference import evaluate_pairs
    from transduce.registry import task_for

    run = _decoding_run(args)
    _threads(args.threads)
    if not run.model.can_decode or task_for(run.config).name != "seq2seq":  # the task reads and scores
        if len(args.model) > 1:
            raise ValueError(f"{args.model[0]}: ensembles evaluate sequence-to-sequence models only, "
                             f"not a {task_for(run.config).name} task")
        return _evaluate_labels(args, run)
    if args.data:
        pairs, _ = read_pairs(args.data, format=run.config.data.format)
        name = args.data
    else:
        splits = load_splits(run.config.data)
        pairs = getattr(splits, args.split)
        name = f"{run.config.data.dataset or 'data'}:{args.split}"
    metrics = args.metrics.split(",") if args.metrics else run.config.eval.metrics
    prefixes, constraints = _apply_controls(args, run)
    result, sources, hyps = evaluate_pairs(run, pairs, metrics, args.beam, args.batch_size, workers=_workers(args),
                                           prefixes=prefixes, constraints=constraints)
    from transduce.data.pipeline import group_references
    from transduce.metrics import sacrebleu_scores

    _, refs = group_references(pairs)
    shown = 0
    for s, h, r in zip(sources, hyps, refs):
        if shown >= args.show:
            break
        print(f"{s}\t{h}\t{'OK' if h in r else 'ref: ' + ' | '.join(r)}")
        shown += 1
    result = {"data": name, "items": len(sources), "beam": args.beam or run.config.decode.beam, **result}
    signatures = {m: sig for m, (_, sig) in sacrebleu_scores(metrics, hyps, refs).items()}
    if signatures:  # how BLEU and chrF were computed, as sacreBLEU reports it
        result["signature"] = signatures
    print(json.dumps(result))
    return 0


def _evaluate_labels(args, run) -> int:
    from transduce.data.pipeline import load_splits
    from transduce.data.readers import read_pairs
    from transduce.registry import task_for

    task = task_for(run.config)
    if args.data:
        pairs, _ = (task.read or read_pairs)(args.data)
        name = args.data
    else:
        pairs = getattr(load_splits(run.config.data, task.read), args.split)
        name = f"data:{args.split}"
    metrics = args.metrics.split(",") if args.metrics else run.config.eval.metrics
    for m in metrics:
        if m not in task.metrics:
            raise ValueError(f"--metrics: {m!r} does not apply to a {run.config.model.family} model; valid "
                             "choices: " + ", ".join(task.metrics))
    result, rows = task.evaluate(run, pairs, metrics, beam=args.beam, batch_size=args.batch_size)
    for s, h, r in rows[: args.show]:
        print(f"{s}\t{h}\t{'OK' if h in r else 'ref: ' + ' | '.join(r)}")
    print(json.dumps({"data": name, "items": len(rows), **result}))
    return 0


def _labelling_run(args):
    """The run of `transduce classify` / `tag`, checked to be of that task."""
    from transduce.runs import load_run
    from transduce.registry import task_for

    run = load_run(args.model)
    task = task_for(run.config)
    if task.command != args.command:
        raise ValueError(f"{args.model}: a {run.config.model.family} model; use `transduce {task.command}`")
    _threads(args.threads)
    return run, task


def _write_lines(args, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _classify(args) -> int:
    run, task = _labelling_run(args)
    _write_lines(args, task.predict(run, _read_inputs(args), args.batch_size))
    return 0


def _tag(args) -> int:
    run, task = _labelling_run(args)
    lines = _read_inputs(args)
    tags = task.predict(run, lines, args.batch_size)
    _write_lines(args, [" ".join(line.split()) + "\t" + " ".join(t) if t else "" for line, t in zip(lines, tags)])
    return 0


def _forecast(args) -> int:
    from transduce.data.series import read_series
    from transduce.runs import load_run
    from transduce.tasks.forecast import forecast_rows

    run = load_run(args.model)
    _threads(args.threads)
    if run.config.data.task != "forecast":
        raise ValueError(f"{args.model}: a {run.config.model.family} model trained on "
                         f"data.task {run.config.data.task!r}, not a forecasting run")
    series = read_series(args.input, run.config.data.forecast, list(run.source.columns))
    rows = forecast_rows(run, series, args.horizon)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        keys = list(rows[0])
        out.write(",".join(keys) + "\n")
        for r in rows:
            out.write(",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _generate(args) -> int:
    from transduce.inference import generate
    from transduce.runs import load_run

    run = load_run(args.model)
    _threads(args.threads)
    _apply_controls(args, run)
    outputs = generate(run, args.prompt, beam=args.beam, num=args.num, sampling=args.sample,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       max_len=args.max_len)
    sys.stdout.write("".join(o + "\n" for o in outputs))
    return 0


def _score(args) -> int:
    from transduce.runs import load_run
    from transduce.registry import task_for

    run = load_run(args.model)
    task = task_for(run.config)
    if not run.model.can_decode:
        raise ValueError(f"{args.model}: a {run.config.model.family} model has no decoder to score with")
    _threads(args.threads)
    scores = task.score(run, _read_inputs(args), args.batch_size)
    _write_lines(args, ["" if v is None else f"{v:.6f}" for v in scores])
    return 0


def _serve(args) -> int:
    try:
        from transduce.serve.app import Limits, serve
    except ImportError as e:
        raise ValueError(f"serve needs the 'serve' extra (pip install 'transduce[serve]'): {e}") from None
    from transduce.serve.run import load_models

    _threads(args.threads)
    models = load_models(args.model, args.quantize, args.engine)
    workers = _workers(args) or next(iter(models.values())).run.config.decode.workers
    limits = Limits(max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                    timeout_s=args.timeout_s, max_inputs=args.max_inputs, max_chars=args.max_chars,
                    max_input_tokens=args.max_input_tokens, max_beam=args.max_beam, workers=workers)
    return serve(models, limits, args.host, args.port, args.threads)


def _info(args) -> int:
    from transduce.checkpoint import checkpoint_dir, read_json
    from transduce.runs import load_run

    run = load_run(args.run_dir, engine="torch")
    last = read_json(checkpoint_dir(Path(args.run_dir), "last") / "state.json")
    info = {
        **run.model.describe(),
        "source_vocab": len(run.source.vocab), "target_vocab": len(run.target.vocab),
        # a series run's codecs are its normalisation (or value bins), named by their kind
        **{f"{side}_tokenizer": getattr(getattr(run, side), "tokenizer", getattr(run, side)).kind
           for side in ("source", "target")},
        "best_checkpoint": str(run.checkpoint),
        "training": {k: last.get(k) for k in ("step", "epoch", "elapsed_s", "tokens", "best", "best_step")},
    }
    for side in ("source", "target"):  # ids that run last symbol first (data.*_tokenizer.reverse)
        if getattr(getattr(run, side), "reverse", False):
            info[f"{side}_order"] = "right to left"
    averaged = read_json(run.checkpoint / "state.json").get("averaged_from")
    if averaged:  # the weights `translate` uses are a mean (transduce average, train.average_last)
        info["averaged_from"] = averaged
    print(json.dumps(info, indent=1))
    return 0


def _attention(args) -> int:
    from transduce.attention import cross_attention, plot_attention, select
    from transduce.runs import load_run
    from transduce.inference import translate

    run = load_run(args.model)
    output = args.target if args.target is not None else translate(run, [args.input], args.beam, 1)[0][0]
    src_ids, out_ids = run.source.encode(args.input), run.target.encode(output)
    if not src_ids:
        raise ValueError("--input is empty")
    att = cross_attention(run.model, src_ids, out_ids)
    matrix, label = select(att, args.layer, args.head)
    plot_attention(matrix, [run.source.vocab.itos[i] for i in src_ids],
                   [run.target.vocab.itos[i] for i in out_ids] + ["</s>"],
                   f"{args.input} -> {output}\n{run.config.model.family}: {label}", Path(args.output))
    print(json.dumps({"input": args.input, "output": output, "plot": args.output, "shown": label,
                      "layers": att.shape[0], "heads": att.shape[1]}))
    return 0


def _export(args) -> int:
    from transduce.runs import load_run

    run = load_run(args.model, engine="torch")
    if args.format == "huggingface":
        from transduce.export.huggingface import export

        if args.quantization:
            raise ValueError("--quantization applies to --format ctranslate2 only")
        out = export(run, args.out_dir)
        print(json.dumps({"format": args.format, "path": str(out)}))
        return 0
    from transduce.export.ctranslate2 import export

    out = export(run, args.out_dir, args.quantization)
    print(json.dumps({"format": args.format, "quantization": args.quantization or "float32", "path": str(out)}))
    return 0


def _import(args) -> int:
    from transduce.runs import import_huggingface

    out = import_huggingface(args.hf_dir, args.out_dir)
    print(json.dumps({"format": args.format, "path": str(out)}))
    return 0


def _average(args) -> int:
    from transduce.checkpoint import average_run

    names = average_run(Path(args.model), Path(args.out_dir), args.last)
    print(json.dumps({"averaged": names, "path": args.out_dir}))
    return 0


def _workers(args) -> int | None:
    n = getattr(args, "workers", None)
    if n is not None and n < 1:
        raise ValueError(f"--workers must be at least 1 (got {n})")
    return n


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transduce", description="Train and use encoder-decoder models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (resumes if RUN_DIR has a checkpoint)",
                       description="Train a model from a YAML config. Re-running with the same --out "
                                   "resumes from the last checkpoint.")
    t.add_argument("config", help="YAML config file (see recipes/)")
    t.add_argument("--out", required=True, help="run directory for config, vocabularies, checkpoints, metrics")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=5e-4 (repeatable; value is YAML)")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine (DistributedDataParallel; gloo on CPU, nccl "
                        "with train.device=cuda); shortcut for torchrun --standalone --nproc-per-node N "
                        "-m transduce train ... (see docs/distributed.md for several machines)")
    t.set_defaults(func=_train)

    def decoding(q, ctranslate2: bool = False):
        q.add_argument("--engine", choices=["auto", "kernels", "torch"] + (["ctranslate2"] if ctranslate2 else []),
                       help="what runs the model: the CPU kernels, the PyTorch modules, or 'auto' (kernels "
                            "where they apply; default: the run's decode.engine)"
                            + ("; ctranslate2: --model EXPORT_DIR written by `transduce export`" if ctranslate2
                               else ""))
        q.add_argument("--beam", type=int, help="beam size (1 = greedy); default from the run's config")
        q.add_argument("--batch-size", type=int, help="inputs decoded together; default from config")
        q.add_argument("--threads", type=int, help="torch threads (default: all cores)")
        q.add_argument("--workers", type=int, metavar="N",
                       help="decode N batches at a time, each on threads/N threads (default: the run's "
                            "decode.workers, 1); 2 on 2 cores is faster for a file of many batches")
        q.add_argument("--quantize", choices=["int8", "auto", "none"],
                       help="decode with the linear layers in int8 (CPU; weights per channel, activations "
                            "per row); 'auto': int8 where the CPU multiplies int8 natively (VNNI or AMX), "
                            "float32 elsewhere; 'none' for float32 (default: the run's decode.quantize)")

    def controls(q, per_input: bool = True):
        g = q.add_argument_group("controlling the output (docs/decoding.md)")
        g.add_argument("--min-length", type=int, metavar="N", help="no </s> before N output tokens")
        g.add_argument("--no-repeat-ngram", type=int, metavar="N", help="no n-gram of N tokens twice in an output")
        g.add_argument("--repetition-penalty", type=float, metavar="P",
                       help="a written token's log-probability times P (CTRL; > 1 discourages repeats)")
        g.add_argument("--eos-bonus", type=float, metavar="B",
                       help="added to </s>'s log-probability (< 0: longer outputs, > 0: shorter)")
        g.add_argument("--ban", action="append", metavar="PHRASE",
                       help="a phrase (target symbols) no output contains (repeatable)")
        if per_input:
            g.add_argument("--prefix", metavar="FILE",
                           help="one line per input: the start of its output, which decoding continues (with "
                                "--scores, its tokens' log-probabilities score a given output: forced decoding)")
            g.add_argument("--constraints", metavar="FILE",
                           help="one line per input: phrases separated by tabs that its outputs must contain "
                                "(lexically constrained beam search; an empty line: none)")
        else:
            g.add_argument("--prefix", dest="prefix_text", metavar="TEXT",
                           help="the output's start, which decoding continues")
            g.add_argument("--constraint", action="append", metavar="PHRASE",
                           help="a phrase the outputs must contain (repeatable; beam search)")
        g.add_argument("--ordered-constraints", action="store_true", help="constraints appear in the given order")
        g.add_argument("--coverage-penalty", type=float, metavar="BETA",
                       help="Wu et al. 2016's coverage penalty (attention models): favours outputs that attend to "
                            "the whole source")
        g.add_argument("--alternatives", type=int, metavar="K",
                       help="the K most probable tokens after the prefix, each continued (one output each)")
        g.add_argument("--replace-unk", action="store_true",
                       help="an output <unk> becomes the source symbol it attends to most (attention models)")

    tr = sub.add_parser("translate", help="decode lines from stdin or a file",
                        description="Read one source per line, write one output per line, order preserved. "
                                    "Empty input lines give empty output lines.")
    tr.add_argument("--model", required=True, nargs="+", metavar="RUN_DIR",
                    help="run directory; several: decode with their ensemble (the mean of their next-token "
                         "probabilities; same vocabularies; decoding settings from the first); runs of both "
                         "directions (data.target_tokenizer.reverse): each direction proposes its n-best, all "
                         "rescore")
    decoding(tr, ctranslate2=True)
    tr.add_argument("--nbest", type=int, help="hypotheses per input, written tab-separated")
    tr.add_argument("--input", help="input file (default: stdin)")
    tr.add_argument("--output", help="output file (default: stdout)")
    tr.add_argument("--attention", metavar="FILE.jsonl",
                    help="also write each output's cross-attention (tokens and weights[layer][head][t][s])")
    controls(tr)
    tr.add_argument("--alignment", metavar="FILE",
                    help="also write the best output's word alignment per input line, Pharaoh `source-target` "
                         "pairs (0-based; each output token's most attended source position)")
    tr.add_argument("--scores", metavar="FILE.jsonl",
                    help="also write, per input line, a JSON list of its outputs with their score, "
                         "log-probability and per-token log-probabilities (</s>'s last)")
    tr.set_defaults(func=_translate)

    ev = sub.add_parser("evaluate", help="decode a test set and print metrics",
                        description="Print the task's metrics; the last line is JSON.")
    ev.add_argument("--model", required=True, nargs="+", metavar="RUN_DIR",
                    help="run directory; several: evaluate their ensemble (data and metrics from the first; "
                         "runs of both directions rescore each other's n-best)")
    ev.add_argument("--data", help="test pairs (.tsv, .jsonl or src|tgt); default: the run's test split")
    ev.add_argument("--split", default="test", choices=["dev", "test"],
                    help="split of the run's configured data when --data is not given")
    ev.add_argument("--metrics", help="comma-separated metrics (default: eval.metrics of the run)")
    ev.add_argument("--show", type=int, default=0, help="print this many examples before the metrics")
    decoding(ev)
    controls(ev)
    ev.set_defaults(func=_evaluate)

    at = sub.add_parser("attention", help="draw the cross-attention of one decoded example",
                        description="Decode --input (or use --target) and draw its cross-attention as a "
                                    "heatmap: source tokens across, output tokens down. Needs matplotlib.")
    at.add_argument("--model", required=True, help="run directory")
    at.add_argument("--input", required=True, help="source text")
    at.add_argument("--output", required=True, help="image file to write (.png, .svg, .pdf)")
    at.add_argument("--target", help="show attention for this output instead of the decoded one")
    at.add_argument("--layer", default="-1", help="decoder layer index (negative counts from the top) or 'mean'")
    at.add_argument("--head", default="mean", help="attention head index or 'mean'")
    at.add_argument("--beam", type=int, help="beam size for decoding --input")
    at.set_defaults(func=_attention)

    ex = sub.add_parser("export", help="export a trained model for another runtime",
                        description="Write the model in another runtime's format, with the vocabularies: "
                                    "ctranslate2 (use it with `translate --engine ctranslate2`), or "
                                    "huggingface (a BART or Marian folder for transformers' "
                                    "AutoModelForSeq2SeqLM and AutoTokenizer; docs/huggingface.md).")
    ex.add_argument("--model", required=True, help="run directory")
    ex.add_argument("--format", required=True, choices=["ctranslate2", "huggingface"], help="target format")
    ex.add_argument("--quantization", choices=["int8", "int8_float32", "int16", "float16", "bfloat16"],
                    help="weight quantization (default: none, float32)")
    ex.add_argument("out_dir", help="output directory (replaced if it exists)")
    ex.set_defaults(func=_export)

    im = sub.add_parser("import", help="make a run directory of another toolkit's model",
                        description="Read a Hugging Face BART or Marian checkpoint folder (config.json, "
                                    "model.safetensors, tokenizer.json; never a pickled pytorch_model.bin) "
                                    "into a run directory for translate, evaluate, export and "
                                    "train.init_from (docs/huggingface.md).")
    im.add_argument("--format", required=True, choices=["huggingface"], help="source format")
    im.add_argument("hf_dir", help="checkpoint folder")
    im.add_argument("out_dir", help="new run directory (must not exist, or be empty)")
    im.set_defaults(func=_import)

    av = sub.add_parser("average", help="average the weights of a run's last checkpoints into a new run directory",
                        description="Write the elementwise mean of the weights of RUN_DIR's last N step "
                                    "checkpoints as a run directory of its own, for translate, evaluate, "
                                    "export or train.init_from (train.average_last does it during training, "
                                    "scored on dev).")
    av.add_argument("--model", required=True, help="run directory")
    av.add_argument("--last", type=int, default=5, metavar="N",
                    help="how many of the newest step checkpoints (default 5; train.keep_checkpoints must have "
                         "kept them)")
    av.add_argument("out_dir", help="new run directory to write (must not exist, or be empty)")
    av.set_defaults(func=_average)

    def labelling(q):
        q.add_argument("--model", required=True, help="run directory")
        q.add_argument("--input", help="input file (default: stdin)")
        q.add_argument("--output", help="output file (default: stdout)")
        q.add_argument("--batch-size", type=int, help="inputs scored together; default from the run's config")
        q.add_argument("--threads", type=int, help="torch threads (default: all cores)")

    cl = sub.add_parser("classify", help="label each line (encoder_classifier runs)",
                        description="Read one text per line, write its label, order preserved. Empty input "
                                    "lines give empty output lines.")
    labelling(cl)
    cl.set_defaults(func=_classify)

    tg = sub.add_parser("tag", help="tag each token of each line (encoder_tagger runs)",
                        description="Read whitespace-separated tokens per line; write `tokens<TAB>labels`, "
                                    "one label per token (the training format), order preserved. Empty "
                                    "input lines give empty output lines.")
    labelling(tg)
    tg.set_defaults(func=_tag)

    ge = sub.add_parser("generate", help="continue a prompt (language models) or decode one input",
                        description="Greedy, beam or sampled outputs for one --prompt, one per line. A run "
                                    "trained on plain text (data.format: text) continues the prompt and "
                                    "prints it with its continuation; a run trained on pairs reads it as "
                                    "the source and prints targets.")
    ge.add_argument("--model", required=True, help="run directory")
    ge.add_argument("--prompt", default="", help="text to continue, or the source (default: empty)")
    ge.add_argument("--beam", type=int, default=1, help="beam size without --sample (1 = greedy)")
    ge.add_argument("--num", type=int, default=1, help="outputs to print: samples, or the n best of the beam")
    ge.add_argument("--sample", action="store_true", help="draw tokens at random instead of searching")
    ge.add_argument("--temperature", type=float, default=1.0,
                    help="with --sample: <1 sharpens, >1 flattens the distribution; 0 = greedy")
    ge.add_argument("--top-k", type=int, default=0, help="with --sample: draw among the k most probable (0 = all)")
    ge.add_argument("--top-p", type=float, default=1.0,
                    help="with --sample: draw among the most probable tokens covering this mass (1 = all)")
    ge.add_argument("--seed", type=int, help="with --sample: random seed; the same seed gives the same outputs")
    ge.add_argument("--max-len", type=int, help="most tokens to generate (default: decode.max_len_a/b of the run)")
    ge.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    controls(ge, per_input=False)
    ge.set_defaults(func=_generate)

    fo = sub.add_parser("forecast", help="forecast the steps after a series (data.task forecast runs)",
                        description="Read a CSV series (the run's timestamp and value columns) and write, as CSV, "
                                    "each of the next --horizon steps' forecast of each target column with the "
                                    "bounds of the run's data.forecast.interval.")
    fo.add_argument("--model", required=True, help="run directory")
    fo.add_argument("--input", required=True, help="CSV series; the forecast starts after its last row")
    fo.add_argument("--horizon", type=int, help="steps to forecast (default: the trained data.forecast.horizon)")
    fo.add_argument("--output", help="output file (default: stdout)")
    fo.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    fo.set_defaults(func=_forecast)

    sc = sub.add_parser("score", help="reconstruction loss of each line (anomaly score)",
                        description="Write, for each input line, the mean negative log-likelihood per target "
                                    "token (</s> included; teacher-forced, no label smoothing): of the line "
                                    "reconstructed from itself without noise for data.objective 'denoise' "
                                    "runs (autoencoders: higher = less like the training data), of the line "
                                    "for plain-text language models, of `source<TAB>target` otherwise. "
                                    "Order preserved; empty lines give empty lines.")
    sc.add_argument("--model", required=True, help="run directory")
    sc.add_argument("--input", help="input file (default: stdin)")
    sc.add_argument("--output", help="output file (default: stdout)")
    sc.add_argument("--batch-size", type=int, help="lines scored together; default decode.batch_size of the run")
    sc.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    sc.set_defaults(func=_score)

    from transduce.serve.defaults import LIMITS

    se = sub.add_parser("serve", help="serve runs over HTTP (needs the 'serve' extra; docs/serving.md)",
                        description="Serve trained runs over HTTP: POST /v1/translate (and /v1/generate, "
                                    "/v1/classify, /v1/tag, /v1/score by family), GET /health, /ready, "
                                    "/v1/models, /metrics and a page at /. Requests that arrive together are "
                                    "decoded in one batch. SIGTERM: stop accepting, finish, exit 0.")
    se.add_argument("--model", required=True, action="append", metavar="[NAME=]RUN_DIR[,RUN_DIR...]",
                    help="a run to serve, named NAME (default: the directory's name); several directories "
                         "joined by commas: their ensemble, as `translate --model A B`; repeatable")
    se.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    se.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    se.add_argument("--engine", choices=["auto", "kernels", "torch"], help="as for translate")
    se.add_argument("--quantize", choices=["int8", "auto", "none"], help="as for translate")
    se.add_argument("--threads", type=int, help="torch threads in all (default: all cores)")
    se.add_argument("--workers", type=int, metavar="N",
                    help="batches decoded at once, each on threads/N threads (default: the first run's "
                         "decode.workers)")
    for flag, kind, what in (
            ("max-batch-tokens", int, "source tokens per batch, padded (inputs x the longest); 0 decodes each "
                                      "request alone"),
            ("max-wait-ms", float, "longest an input waits for others to join its batch"),
            ("max-queue", int, "requests waiting for a batch; beyond it 503 with Retry-After"),
            ("timeout-s", float, "deadline of a request; past it 504 and its inputs not yet decoding are dropped"),
            ("max-inputs", int, "inputs per request (beyond: 413)"),
            ("max-chars", int, "characters per input (beyond: 413)"),
            ("max-input-tokens", int, "source tokens per input (beyond: 413)"),
            ("max-beam", int, "largest beam, nbest or generate num (beyond: 422)")):
        default = LIMITS[flag.replace("-", "_")]
        se.add_argument(f"--{flag}", type=kind, default=default, help=f"{what} (default {default:g})")
    se.set_defaults(func=_serve)

    info = sub.add_parser("info", help="describe a trained run",
                          description="Family, sizes, parameter count, vocabularies and training state.")
    info.add_argument("run_dir", help="run directory")
    info.set_defaults(func=_info)
    return p


# commands that decode or score many batches with the model (transduce/allocator.py)
DECODING = ("translate", "evaluate", "classify", "tag", "generate", "score", "serve", "forecast")


def main(argv: list[str] | None = None) -> int:
    from transduce.checkpoint import CheckpointError
    from transduce.config import ConfigError
    from transduce.data.readers import DataError

    args = build_parser().parse_args(argv)
    if args.command in DECODING:
        from transduce.allocator import keep_freed_memory

        keep_freed_memory()  # decoding's tensors change size every step: reuse freed memory
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, FloatingPointError, OSError) as e:
        print(f"transduce {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"transduce {args.command}: error: {e}", file=sys.stderr)
        return 2
