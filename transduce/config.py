"""Typed, validated configuration.

A config is a tree of dataclasses. `load_config` reads YAML, applies `--set`
overrides and checks every section: unknown keys, wrong types and invalid
choices are errors that name the file, the key and the valid choices.
Model sections are chosen by `model.family`; each family's dataclass lives
next to its code (see `transduce.models`), and `transduce.registry` (the one module
that knows every family) hands them to `parse_config`. This module imports no other
of the package.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A config that does not validate; the message names the file and key."""


# ---------------------------------------------------------------------------
# Sections shared by every family
# ---------------------------------------------------------------------------

@dataclass
class TokenizerConfig:
    # how text splits into symbols; "pretrained": a Hugging Face checkpoint's own tokenizer
    kind: Literal["char", "whitespace", "bpe", "unigram", "pretrained"] = "char"
    lowercase: bool = False          # fold case before splitting (G2P spellings are case-insensitive)
    vocab_size: int = 8000           # target size for trained subword vocabularies (bpe/unigram)
    min_frequency: int = 1           # symbols seen fewer times map to <unk> (char/whitespace)
    # kind pretrained: checkpoint folder with tokenizer.json or vocab.txt, or
    # `package:NAME/sub/dir` inside an installed Python package
    path: Optional[str] = None
    wrap: bool = False               # encode each text as <s> ... </s> (BERT's [CLS] ... [SEP]); sources only
    # ids run last symbol first: on the target a right-to-left decoder (outputs come back in reading order;
    # `--model L2R R2L` rescores each direction's n-best with both), on the source a reversed input
    reverse: bool = False

    def validate(self) -> None:
        if self.kind == "pretrained" and not self.path:
            raise ValueError("kind 'pretrained' needs path (the checkpoint folder with tokenizer.json or vocab.txt)")
        if self.path and self.kind != "pretrained":
            raise ValueError(f"path applies to kind 'pretrained' only (kind is {self.kind!r})")


@dataclass
class CmudictConfig:
    stress: bool = True              # keep stress digits on vowels (AH0/AH1); False strips them
    dev_fraction: float = 0.02       # share of words held out for dev (split by word, never by entry)
    test_fraction: float = 0.05      # share of words held out for test
    lowercase: bool = True           # spellings are lower-case in the source data already
    max_words: int = 0               # use only this many words (0 = all); for quick runs and tests


@dataclass
class NoiseConfig:
    """How data.objective 'denoise' corrupts each source (BART; Lewis et al. 2020), in this order
    (transduce/data/noise.py); all zero: no noise, a sequence autoencoder."""
    shuffle_distance: int = 0        # local shuffle: each symbol moves at most this many places (0 = off)
    delete_rate: float = 0.0         # each symbol is deleted with this probability (one always stays)
    mask_rate: float = 0.0           # share of the symbols inside masked spans (text infilling)
    span_lambda: float = 3.0         # span lengths ~ Poisson(lambda); a span -> one <mask> (length 0: inserted)

    def validate(self) -> None:
        if self.shuffle_distance < 0:
            raise ValueError("shuffle_distance must be >= 0")
        if not (0.0 <= self.delete_rate < 1.0 and 0.0 <= self.mask_rate < 1.0):
            raise ValueError("delete_rate and mask_rate must be in [0, 1)")
        if self.span_lambda <= 0:
            raise ValueError("span_lambda must be positive")


@dataclass
class MixTaskConfig:
    """One task of data.dataset 'multitask' (transduce/data/multitask.py)."""
    name: str = ""                   # prefix of its sources ("g2p" -> "g2p: hello"); groups evaluation
    # cmudict: spelling -> phonemes (data.cmudict settings); num2words: "LANG DIGITS" -> number
    # in words, generated with the num2words package; files: pairs in train/dev/test
    dataset: Literal["cmudict", "num2words", "files"] = "cmudict"
    inverse: bool = False            # swap source and target (cmudict inverse: phonemes -> spelling)
    weight: float = 1.0              # share of each epoch's training examples (relative to the others)
    langs: list[str] = field(default_factory=list)  # num2words languages (e.g. en, fr, de, es)
    numbers: int = 3000              # num2words: how many numbers per language
    max_number: int = 100000         # num2words: numbers drawn from 0..max_number
    train: Optional[str] = None      # files: pairs (.tsv, .jsonl or src|tgt), as data.train
    dev: Optional[str] = None
    test: Optional[str] = None

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"name {self.name!r}: give a task name of letters, digits, _ or -")
        if self.weight <= 0:
            raise ValueError(f"task {self.name!r}: weight must be positive")
        if self.dataset == "num2words":
            if not self.langs:
                raise ValueError(f"task {self.name!r}: dataset 'num2words' needs langs (e.g. [en, fr])")
            if self.numbers < 1 or self.max_number < self.numbers:
                raise ValueError(f"task {self.name!r}: need 1 <= numbers <= max_number")
        elif self.langs:
            raise ValueError(f"task {self.name!r}: langs applies to dataset 'num2words' only")
        if self.dataset == "files" and not self.train:
            raise ValueError(f"task {self.name!r}: dataset 'files' needs train")
        if self.dataset != "files" and (self.train or self.dev or self.test):
            raise ValueError(f"task {self.name!r}: train/dev/test apply to dataset 'files' only")


@dataclass
class MultitaskConfig:
    tasks: list[MixTaskConfig] = field(default_factory=list)  # the mixed tasks; each source gets "name: "
    epoch_examples: int = 0          # training examples per epoch, shared by weight (0 = all tasks' total)

    def validate(self) -> None:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: task names must differ ({', '.join(names)})")
        if self.epoch_examples < 0:
            raise ValueError("epoch_examples must be >= 0")


@dataclass
class ForecastConfig:
    """Windows of a time series (data.task 'forecast'; transduce/data/series.py): `context` past steps
    of every value column in, the next `horizon` steps of the target columns out."""
    timestamp: str = "timestamp"     # the time column of the CSV (kept as read: rows must be in time order)
    targets: list[str] = field(default_factory=list)  # columns to forecast; empty = every value column
    inputs: list[str] = field(default_factory=list)   # more columns read as inputs only (covariates)
    context: int = 48                # past steps each forecast reads
    horizon: int = 12                # future steps each forecast writes
    stride: int = 1                  # steps between the origins of training windows
    eval_stride: int = 0             # steps between forecast origins in evaluation (0 = horizon)
    season: int = 1                  # seasonal period (12: monthly data); the scale of MASE
    # "window": each window's inputs and targets relative to the mean of its context (after the
    # per-feature normalisation), so a trending level is not out of the training range; "global":
    # the normalisation alone
    scale: Literal["window", "global"] = "window"
    interval: float = 0.8            # central interval printed and scored (coverage) around the forecast
    bins: int = 64                   # decoders over quantised values: bins fitted on training values
    samples: int = 100               # decoders over quantised values: paths sampled per forecast

    def validate(self) -> None:
        if min(self.context, self.horizon, self.stride, self.season) < 1:
            raise ValueError("context, horizon, stride and season must be at least 1")
        if self.eval_stride < 0:
            raise ValueError("eval_stride must be >= 0 (0 = horizon)")
        if not 0.0 < self.interval < 1.0:
            raise ValueError(f"interval must be in (0, 1) (got {self.interval})")
        if self.bins < 2 or self.samples < 2:
            raise ValueError("bins and samples must be at least 2")
        if set(self.targets) & set(self.inputs):
            raise ValueError("a column is in both targets and inputs: " + ", ".join(sorted(set(self.targets) & set(self.inputs))))


@dataclass
class DataConfig:
    # A built-in dataset instead of files; "multitask": the tasks of data.multitask, mixed (T5).
    dataset: Optional[Literal["cmudict", "multitask"]] = None
    cmudict: CmudictConfig = field(default_factory=CmudictConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    # What a family with a decoder learns: "seq2seq", each source's target; "denoise",
    # each line of plain text (format: text) back from a copy corrupted by data.noise
    # (BART pretraining; without noise, a sequence autoencoder). See transduce/tasks.py.
    objective: Literal["seq2seq", "denoise"] = "seq2seq"
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    # What an example is: "text", pairs of texts (or plain text); "forecast", windows of a time
    # series read from CSV files (data.forecast; transduce/tasks/forecast.py); "frames", arrays of
    # feature frames (.npy) listed in a TSV with their transcripts (transduce/tasks/frames.py)
    task: Literal["text", "forecast", "frames"] = "text"
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    # Files: a .tsv (source<TAB>target), a .jsonl ({"source":..,"target":..}),
    # or a pair "src_file|tgt_file" of line-aligned files.
    train: Optional[str] = None
    dev: Optional[str] = None
    test: Optional[str] = None
    # "text": the files are plain text, one document per line, for a language
    # model: the source is empty and the whole line is the target.
    format: Literal["pairs", "text"] = "pairs"
    skip_invalid: bool = False       # skip (and count) bad lines instead of stopping
    max_source_len: int = 256        # longer training pairs are an error unless skip_invalid
    max_target_len: int = 256
    source_tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    target_tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # One tokenizer and vocabulary fitted on both sides' training text (source_tokenizer's settings;
    # target_tokenizer may differ only in wrap and reverse): joint BPE for translation, with
    # model.share_embeddings.
    joint_tokenizer: bool = False

    def validate(self) -> None:
        if self.forecast != ForecastConfig() and self.task != "forecast":
            raise ValueError("forecast applies to task 'forecast' only")
        if self.task != "text" and (self.dataset or self.objective != "seq2seq" or self.format != "pairs"):
            raise ValueError(f"task {self.task!r} reads the files in data.train/dev/test: remove dataset, "
                             "objective and format")
        if self.joint_tokenizer:
            s, g = self.source_tokenizer, self.target_tokenizer
            differ = [k for k in ("kind", "lowercase", "vocab_size", "min_frequency", "path")
                      if getattr(s, k) != getattr(g, k)]
            if differ:
                raise ValueError("joint_tokenizer: one tokenizer for both sides, but target_tokenizer."
                                 + ", target_tokenizer.".join(differ) + " differ from source_tokenizer's; "
                                 "give them the same values (or only source_tokenizer's and copy them)")
        if self.dataset == "multitask" and not self.multitask.tasks:
            raise ValueError("dataset 'multitask' needs multitask.tasks")
        if self.multitask.tasks and self.dataset != "multitask":
            raise ValueError("multitask.tasks applies to dataset 'multitask' only")
        if self.objective == "denoise" and self.format != "text":
            raise ValueError("objective 'denoise' reads plain text: set format: text")
        if self.noise != NoiseConfig() and self.objective != "denoise":
            raise ValueError("noise applies to objective 'denoise' only")
        if self.format == "text" and self.dataset:
            raise ValueError(f"format 'text' reads the files in data.train/dev/test; it does not apply "
                             f"to dataset {self.dataset!r}")
        if self.format == "text" and any("|" in (f or "") for f in (self.train, self.dev, self.test)):
            raise ValueError("format 'text' takes one plain-text file per split, not 'src_file|tgt_file'")


# Schedules that decay to a floor over a planned number of updates or a time budget.
DECAYS = ("cosine", "linear")


@dataclass
class TrainConfig:
    seed: int = 1                    # seeds init, dropout and data order
    threads: int = 0                 # torch intra-op threads; 0 = all cores
    batch_tokens: int = 4096         # token budget per batch (source + target, padded)
    max_batch_pairs: int = 512       # cap on pairs per batch whatever the budget
    accum_steps: int = 1             # gradient accumulation: batches per optimizer update
    max_steps: int = 0               # stop after this many updates (0 = no limit)
    max_epochs: int = 0              # stop after this many passes over the data (0 = no limit)
    max_minutes: float = 0.0         # wall-clock budget for training (0 = no limit)
    lr: float = 1e-3                 # peak learning rate after warmup
    # cosine and linear decay to max_steps; with max_minutes alone, from the end of warmup to
    # the end of the time budget, by the clock
    schedule: Literal["inverse_sqrt", "cosine", "linear", "constant"] = "inverse_sqrt"
    warmup_steps: int = 1000         # linear warmup from 0 to lr
    min_lr_ratio: float = 0.0        # cosine/linear floor as a fraction of lr
    weight_decay: float = 0.01       # AdamW decoupled weight decay (not on norms/biases)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-9
    label_smoothing: float = 0.1     # mass spread over the vocabulary in the loss
    clip_norm: float = 1.0           # max global gradient norm (0 = no clipping)
    # bf16 autocast for matmuls (fp32 master weights); "auto": where the hardware multiplies bf16
    # natively (a CPU with AMX or AVX512-BF16, a CUDA GPU), fp32 elsewhere (transduce/precision.py)
    bf16: Union[bool, Literal["auto"]] = False
    log_every: int = 50              # steps between metrics.jsonl lines
    eval_every: int = 1000           # steps between dev evaluations (0 = only at the end)
    eval_max_items: int = 1000       # dev examples decoded per evaluation (0 = all)
    patience: int = 0                # stop after this many evaluations without improvement (0 = off)
    keep_checkpoints: int = 2        # step checkpoints kept besides best
    # At the end, the mean of the weights of the last N step checkpoints (Vaswani et al. 2017),
    # scored on dev and made "best" if it beats every single checkpoint (0 = off; keeps at least
    # N checkpoints). `transduce average` does it afterwards, into a run directory of its own.
    average_last: int = 0
    save_every: int = 0              # steps between checkpoints besides evaluations (0 = at evals only)
    max_bad_steps: int = 20          # consecutive non-finite updates tolerated before stopping
    init_from: Optional[str] = None  # start from another run's best weights (fine-tuning)
    deterministic: bool = False      # torch deterministic algorithms (bitwise-reproducible resume)
    device: Literal["cpu", "cuda"] = "cpu"  # where to train; cuda under torchrun: one GPU per process, nccl

    def validate(self) -> None:
        if self.schedule in DECAYS and self.max_steps <= 0 and self.max_minutes <= 0:
            raise ValueError(f"schedule '{self.schedule}' needs max_steps > 0 (it decays to max_steps) or "
                             "max_minutes > 0 (it decays from the end of warmup to the end of the time, by the clock)")
        if self.batch_tokens <= 0 or self.max_batch_pairs <= 0 or self.accum_steps <= 0:
            raise ValueError("batch_tokens, max_batch_pairs and accum_steps must be positive")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.average_last < 0 or self.average_last == 1:
            raise ValueError(f"average_last must be 0 (off) or at least 2 checkpoints (got {self.average_last})")


@dataclass
class DecodeConfig:
    beam: int = 5                    # beam size (1 = greedy)
    nbest: int = 1                   # hypotheses returned per input
    length_penalty: float = 1.0      # GNMT alpha; 0 ranks by raw log-probability
    max_len_a: float = 1.5           # max output length = a * source length + b
    max_len_b: int = 10
    batch_size: int = 200            # inputs per decoding batch
    # Batches decoded at once, each on its own thread with torch threads / workers threads (as
    # CTranslate2's inter_threads): one batch's small ops leave cores idle, so 2 workers on 2 cores
    # decode a file faster than one batch on 2 threads (docs/speed.md, "Workers").
    workers: int = 1
    # How `translate` and `evaluate` run the model (`--quantize` overrides): null = float32, "int8" =
    # linear layers in int8 (models/quantize.py; CPU), "auto" = int8 where the CPU multiplies int8
    # natively (VNNI or AMX), float32 elsewhere. Dev evaluation during training stays float32.
    quantize: Optional[Literal["int8", "auto"]] = None
    # What runs the model when it decodes (`--engine` overrides; transduce/engine): "kernels" the CPU
    # kernels (Transformer stacks), "torch" the PyTorch modules (the reference), "auto" kernels where
    # they are built and apply. Dev evaluation during training follows it ("kernels" as "auto").
    engine: Literal["auto", "kernels", "torch"] = "auto"
    # Controls of the output (transduce/controls.py; docs/decoding.md). Phrases are target text, in
    # the target tokenizer's symbols.
    min_length: int = 0              # output tokens before </s> may come (a prefix counts)
    no_repeat_ngram: int = 0         # no n-gram of this size twice in an output (0 = off)
    repetition_penalty: float = 1.0  # CTRL-style: a written token's log-probability times this (1 = off)
    eos_bonus: float = 0.0           # added to </s>'s log-probability: < 0 longer outputs, > 0 shorter
    banned: list[str] = field(default_factory=list)       # phrases that never appear in an output
    prefix: str = ""                 # every output starts with this (decoding continues it)
    constraints: list[str] = field(default_factory=list)  # phrases every output contains (beam search)
    constraints_ordered: bool = False  # ... in the given order
    coverage_penalty: float = 0.0    # Wu et al. 2016's beta: favour outputs attending to all the source
    alternatives: int = 0            # k > 0: the k most probable tokens after the prefix, each continued
    token_scores: bool = False       # keep each output token's log-probability
    alignments: bool = False         # keep each output token's most attended source position
    replace_unk: bool = False        # an output <unk> becomes its most attended source symbol

    def validate(self) -> None:
        if self.beam < 1 or self.nbest < 1 or self.nbest > self.beam:
            raise ValueError(f"need 1 <= nbest <= beam (beam={self.beam}, nbest={self.nbest})")
        if self.workers < 1:
            raise ValueError(f"decode.workers must be at least 1 (got {self.workers})")
        for name in ("min_length", "no_repeat_ngram", "alternatives"):
            if getattr(self, name) < 0:
                raise ValueError(f"decode.{name} must be >= 0 (got {getattr(self, name)})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"decode.repetition_penalty must be positive (got {self.repetition_penalty})")
        if self.coverage_penalty < 0:
            raise ValueError(f"decode.coverage_penalty must be >= 0 (got {self.coverage_penalty})")
        if self.alternatives and self.constraints:
            raise ValueError("decode.alternatives and decode.constraints do not combine")


@dataclass
class EvalConfig:
    # Metrics computed by `evaluate` and on dev during training; the first is
    # the one early stopping and `best` follow. Valid choices and the default
    # depend on the family's task (transduce/tasks.py).
    metrics: list[str] = field(default_factory=lambda: ["wer", "per"])
    dev_beam: int = 1                # beam during training-time dev evaluation (greedy is cheap)


METRIC_CHOICES = ("wer", "per", "wer_nostress", "per_nostress", "seq_acc", "cer", "bleu", "chrf", "ppl")


@dataclass
class Config:
    model: Any = None                # family dataclass, chosen by model.family
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Generic dict -> dataclass conversion with checks
# ---------------------------------------------------------------------------

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: invalid choice {value!r}; valid choices: "
                              + ", ".join(repr(c) for c in choices))
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}"
                          + ("" if len(errors) > 1 else f" ({errors[0]})"))
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {convert(k, key_tp, where): convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def from_dict(cls, data: dict, where: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key; valid keys here: " + ", ".join(sorted(fields)))
    kwargs = {k: convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where or 'config'}: {e}") from None
    return obj


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def parse_config(raw: dict, source: str, families: dict[str, type]) -> Config:
    """The config tree of `raw`, its model section built by the dataclass `families[model.family]`.
    Checks what the sections say of each other; the family's task checks the rest
    (`registry.config_from_dict`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections")
    raw = dict(raw)
    model_raw = raw.pop("model", None)
    if not isinstance(model_raw, dict) or "family" not in model_raw:
        raise ConfigError(f"{source}: key 'model.family' is required; valid choices: " + ", ".join(families))
    family = model_raw["family"]
    if family not in families:
        raise ConfigError(f"{source}: key 'model.family': invalid choice {family!r}; valid choices: "
                          + ", ".join(families))
    try:
        model = from_dict(families[family], model_raw, "model")
        cfg = from_dict(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: key {e}") from None
    cfg.model = model
    if (cfg.data.format == "text" and cfg.data.objective != "denoise"
            and not getattr(model, "reads_without_source", False)):
        able = [f for f, c in families.items() if getattr(c, "reads_without_source", False)]
        raise ConfigError(f"{source}: key data.format: 'text' (a language model, no source) needs a family "
                          f"that reads without a source; valid choices for model.family: {', '.join(able)} "
                          "(or data.objective: 'denoise', which makes the source from the line)")
    fits = getattr(model, "validate_data", None)  # checks of the model against the data limits
    if fits is not None:
        try:
            fits(cfg.data)
        except ValueError as e:
            raise ConfigError(f"{source}: key model: {e}") from None
    return cfg


def read_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """The YAML mapping of `path` with `--set` overrides applied (not yet checked)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return apply_overrides(raw, list(overrides))
