"""Using a trained run in memory: decode, translate text, evaluate on a test set, score, generate.
(`transduce.runs.load_run` reads a run from its directory.)"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from transduce.checkpoint import CheckpointError
from transduce.config import Config
from transduce.data.pipeline import group_references, pad
from transduce.data.vocab import PAD, UNK, TextCodec
from transduce.search import Hypothesis, search


@dataclass
class LoadedRun:
    """A trained run in memory (`runs.load_run` reads one from its directory)."""
    config: Config
    model: torch.nn.Module
    source: TextCodec
    target: TextCodec
    state: dict           # training state of the loaded checkpoint
    checkpoint: Path
    task: object = None   # the run's task (transduce.tasks), what `registry.task_for` says of its config


def ensemble(runs: list[LoadedRun], names: list[str] | None = None) -> LoadedRun:
    """One run that decodes with all of the runs' models; config (decoding settings, data, metrics)
    and codecs are the first run's. The runs must share their source and target vocabularies and
    have decoders; `names` (their directories) name the one that does not.

    Runs whose target ids run the same way decode as the mean of their models (`search.Ensemble`);
    a run that reads sources the other way from the first sees them turned (`search.SourceReversed`).
    Runs of both directions (some trained with `data.target_tokenizer.reverse`) decode by n-best
    rescoring (`search.Bidirectional`): each direction's ensemble proposes, all of them score.
    """
    import dataclasses

    from transduce.search import Bidirectional, Ensemble, SourceReversed

    if len(runs) == 1:
        return runs[0]
    names = names or [str(r.checkpoint) for r in runs]
    first = runs[0]

    def plain(codec: TextCodec) -> dict:
        return {k: v for k, v in codec.to_dict().items() if k != "reverse"}

    for name, r in zip(names, runs):
        if not r.model.can_decode:
            raise CheckpointError(f"{name}: a {r.config.model.family} model has no decoder to ensemble")
        for side in ("source", "target"):
            if plain(getattr(r, side)) != plain(getattr(first, side)):
                raise CheckpointError(f"{name}: its {side} vocabulary differs from {names[0]}'s; an ensemble's "
                                      "models must share both (train them on the same data and tokenizers)")
    ways = {}
    for r in runs:  # sources are encoded as the first run reads them: a run reading them the other way turns them
        model = SourceReversed(r.model) if r.source.reverse != first.source.reverse else r.model
        ways.setdefault(r.target.reverse, []).append(model)
    if len(ways) == 1:
        return dataclasses.replace(first, model=Ensemble(next(iter(ways.values()))))
    directions = [(models[0] if len(models) == 1 else Ensemble(models), reverse) for reverse, models in ways.items()]
    return dataclasses.replace(first, model=Bidirectional(directions, out_reverse=first.target.reverse))


def decode(run: LoadedRun, sources: list[str], beam: int | None = None, nbest: int | None = None,
           batch_size: int | None = None, model=None, workers: int | None = None,
           prefixes: list[str] | None = None, constraints: list[list[str]] | None = None
           ) -> list[list[Hypothesis]]:
    """n-best hypotheses for each source, in input order. Empty sources give one empty output.

    Sources are decoded in batches of similar length; `workers` (default `decode.workers`) batches
    at a time, on threads sharing the model. The controls of `decode` (transduce/controls.py) apply;
    `prefixes` (one per source) and `constraints` (phrases per source) replace decode.prefix and
    decode.constraints.
    """
    from transduce.controls import controls_for

    model = model or run.model
    if not model.can_decode:
        command = f"`transduce {run.task.command}`" if run.task is not None else "the command of its task"
        raise ValueError(f"a {run.config.model.family} model has no decoder (encoder-only); use {command}")
    if run.config.data.task != "text":  # its sources are vectors (models/series.py)
        raise ValueError(f"a {run.config.model.family} model trained on data.task {run.config.data.task!r} reads "
                         f"vectors, not text lines; use `transduce {run.task.command}`")
    cfg = run.config.decode
    batch_size = batch_size or cfg.batch_size
    controls = controls_for(cfg, run.target, len(sources), prefixes, constraints)
    ids = [run.source.encode(s) for s in sources]
    out: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] for _ in sources]
    todo = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: len(ids[i]))

    def one(idx: list[int]) -> list[list[Hypothesis]]:
        src = pad([ids[i] for i in idx])
        return search(model, src, src != PAD, cfg, beam, nbest, controls.for_rows(idx))

    batches = [todo[k: k + batch_size] for k in range(0, len(todo), batch_size)]
    for idx, hyps in zip(batches, in_workers(one, batches, workers or cfg.workers)):
        for i, h in zip(idx, hyps):
            out[i] = h
    return out


def in_workers(fn, items: list, workers: int) -> list:
    """[fn(x) for x in items], on `workers` threads that split torch's threads between them.

    PyTorch releases the interpreter lock inside its ops, so the threads' tensor work runs in
    parallel. torch's thread count is process-wide: it is divided while the workers run and
    restored after.
    """
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    from transduce import kernels

    kernels.ops()  # loaded (built) once, before the threads
    total = torch.get_num_threads()
    torch.set_num_threads(max(1, total // workers))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="transduce-decode") as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(total)


def translate(run: LoadedRun, sources: list[str], beam: int | None = None, nbest: int | None = None,
              batch_size: int | None = None, model=None, workers: int | None = None,
              prefixes: list[str] | None = None, constraints: list[list[str]] | None = None) -> list[list[str]]:
    found = decode(run, sources, beam, nbest, batch_size, model, workers, prefixes, constraints)
    return [[output_text(run, s, h) for h in hyps] for s, hyps in zip(sources, found)]


def output_text(run: LoadedRun, source: str, hyp: Hypothesis) -> str:
    """A hypothesis as text; with decode.replace_unk, each <unk> replaced by the source symbol it
    attends to most (`Hypothesis.alignment`)."""
    if not (run.config.decode.replace_unk and hyp.alignment is not None and UNK in hyp.tokens):
        return run.target.decode(hyp.tokens)
    src = run.source.tokenizer.split(source)
    wrap, n = run.source.wrap, len(src)
    symbols = run.target.vocab.decode(hyp.tokens)
    for j, (tok, pos) in enumerate(zip(hyp.tokens, hyp.alignment)):
        if tok == UNK and n:
            p = min(max(pos - (1 if wrap else 0), 0), n - 1)   # <s> first where sources are wrapped
            symbols[j] = src[n - 1 - p if run.source.reverse else p]
    if run.target.reverse:
        symbols.reverse()
    return run.target.tokenizer.join(symbols)


def pharaoh(hyp: Hypothesis) -> str:
    """The hypothesis's alignment as Pharaoh `source-target` pairs (0-based; one per output token)."""
    return " ".join(f"{i}-{j}" for j, i in enumerate(hyp.alignment or []))


def evaluate_pairs(run: LoadedRun, pairs, metrics: list[str], beam: int | None = None,
                   batch_size: int | None = None, model=None, workers: int | None = None,
                   prefixes: list[str] | None = None, constraints: list[list[str]] | None = None
                   ) -> tuple[dict, list[str], list[str]]:
    """Metrics over `pairs` (targets of one source grouped as references; `prefixes` and
    `constraints`, if given, one per distinct source in order of first appearance)."""
    from transduce import metrics as M

    sources, refs = group_references(pairs)
    decoded = [m for m in metrics if m != "ppl"]
    hyps = ([h[0] for h in translate(run, sources, beam, 1, batch_size, model, workers, prefixes, constraints)]
            if decoded else [])
    result = M.compute(decoded, hyps, refs) if decoded else {}
    if "ppl" in metrics:
        result["ppl"] = round(perplexity(run, pairs, model), 4)
    return {m: result[m] for m in metrics}, sources, hyps


@torch.no_grad()
def perplexity(run: LoadedRun, pairs, model=None) -> float:
    """exp(mean negative log-likelihood per target token, </s> included) under teacher forcing.

    Every pair counts (not grouped by source); pairs over the data length
    limits are skipped with a warning. No label smoothing.
    """
    import dataclasses
    import math

    import torch.nn.functional as F

    from transduce.data.pipeline import encode_pairs, epoch_batches

    model = model or run.model
    cfg = run.config
    data = encode_pairs(pairs, run.source, run.target, dataclasses.replace(cfg.data, skip_invalid=True), "eval")
    nll, n = 0.0, 0
    for _, batch in epoch_batches(data, cfg.train.batch_tokens, cfg.train.max_batch_pairs, 0, 0):
        logits = model(batch)
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.labels.reshape(-1),
                                     ignore_index=PAD, reduction="sum"))
        n += batch.n_tgt_tokens
    if n == 0:
        raise ValueError("perplexity: no pairs to score")
    return math.exp(nll / n)


@torch.no_grad()
def sequence_nll(model, srcs: list[list[int]], tgts: list[list[int]], batch_size: int) -> list[float]:
    """Mean negative log-likelihood per target token (</s> included) of each (source, target) of ids,
    teacher-forced, no label smoothing; in input order. Batched by length (padding changes no
    real position)."""
    import torch.nn.functional as F

    from transduce.data.pipeline import EncodedPairs, TokenArray

    out = [0.0] * len(srcs)
    order = sorted(range(len(srcs)), key=lambda i: (len(srcs[i]), len(tgts[i])))
    for k in range(0, len(order), batch_size):
        idx = order[k: k + batch_size]
        batch = EncodedPairs(TokenArray([srcs[i] for i in idx]), TokenArray([tgts[i] for i in idx])) \
            .collate(list(range(len(idx))))
        logits = model(batch).float()                                    # (B, T, V)
        nll = F.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=PAD, reduction="none")  # (B, T)
        per_token = nll.sum(1) / (batch.labels != PAD).sum(1)
        for j, i in enumerate(idx):
            out[i] = float(per_token[j])
    return out


def generate(run: LoadedRun, prompt: str, beam: int = 1, num: int = 1, sampling: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             max_len: int | None = None) -> list[str]:
    """`num` outputs for one prompt, best (or first drawn) first.

    A run trained on plain text (`data.format: text`) continues the prompt:
    it is the start of the target, and the outputs include it. A run trained
    on pairs reads the prompt as the source and writes targets. `max_len`
    caps the tokens generated (default: decode.max_len_a/b of the run).
    """
    from transduce.controls import controls_for
    from transduce.search import ForcedPrefix, beam_search, greedy, sample

    if num < 1 or beam < 1:
        raise ValueError(f"need num >= 1 and beam >= 1 (got {num}, {beam})")
    if sampling and beam > 1:
        raise ValueError("sampling draws each output on its own; it takes no beam")
    cfg = run.config.decode
    if run.config.data.format == "text" and run.config.data.objective != "denoise":
        src_ids, prefix = [], run.target.encode(prompt)
    else:
        src_ids, prefix = run.source.encode(prompt), []
        if not src_ids:
            raise ValueError("--prompt is empty, but this run was trained on pairs: the prompt is its source")
    model = ForcedPrefix(run.model, prefix) if prefix else run.model
    a, b = (0.0, max_len) if max_len else (cfg.max_len_a, cfg.max_len_b)
    src = torch.tensor([src_ids], dtype=torch.long)
    mask = torch.ones_like(src, dtype=torch.bool)
    ctl = controls_for(cfg, run.target, num if sampling else 1)  # decode's controls, after the prompt
    if sampling:
        g = torch.Generator()
        g.manual_seed(seed) if seed is not None else g.seed()
        hyps = [h[0] for h in sample(model, src.repeat(num, 1), mask.repeat(num, 1), a, b, temperature,
                                     top_k, top_p, g, ctl)]
    elif beam == 1 and num == 1 and not ctl.active:
        hyps = greedy(model, src, mask, a, b)[0]
    else:
        hyps = beam_search(model, src, mask, max(beam, num), num, cfg.length_penalty, a, b, ctl)[0]
    return [run.target.decode(prefix + h.tokens) for h in hyps]


def dumps_result(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False)
