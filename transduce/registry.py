"""The composition root: the one module that knows every model family.

Each family is a config dataclass and a model class (beside each other in
`transduce.models`); what it is trained on is a task (`transduce.tasks`).
Configs, data and models never import this module; commands, the trainer
and run loading do.
"""
from __future__ import annotations

from pathlib import Path

from transduce.config import Config, ConfigError, parse_config, read_config
from transduce.models.encoder import (EncoderClassifier, EncoderClassifierConfig, EncoderMLM, EncoderMLMConfig,
                                      EncoderTagger, EncoderTaggerConfig)
from transduce.models.lm import DecoderOnly, DecoderOnlyConfig, PrefixLM, PrefixLMConfig
from transduce.models.rnn import RNNConfig, RNNSeq2Seq
from transduce.models.series import (Forecaster, ForecasterConfig, SeriesRNN, SeriesRNNConfig, SeriesTransformer,
                                     SeriesTransformerConfig)
from transduce.models.transformer import Transformer, TransformerConfig
from transduce.tasks import ClassifyTask, DenoiseTask, MLMTask, MultitaskTask, Seq2SeqTask, TagTask, Task
from transduce.tasks.forecast import ForecastBinsTask, ForecastTask
from transduce.tasks.frames import FramesTask

# family name -> (config dataclass, model class); a model is built as cls(config, src_vocab, tgt_vocab)
FAMILIES: dict[str, tuple[type, type]] = {
    "transformer": (TransformerConfig, Transformer),
    "rnn": (RNNConfig, RNNSeq2Seq),
    "decoder_only": (DecoderOnlyConfig, DecoderOnly),
    "prefix_lm": (PrefixLMConfig, PrefixLM),
    "encoder_mlm": (EncoderMLMConfig, EncoderMLM),                       # target vocabulary = source vocabulary
    "encoder_classifier": (EncoderClassifierConfig, EncoderClassifier),  # target vocabulary = the labels
    "encoder_tagger": (EncoderTaggerConfig, EncoderTagger),
    # real-valued vectors in (models/series.py): source "vocabulary" = the input columns
    "series_transformer": (SeriesTransformerConfig, SeriesTransformer),
    "series_rnn": (SeriesRNNConfig, SeriesRNN),
    "forecaster": (ForecasterConfig, Forecaster),                        # target "vocabulary" = the target columns
}
# families whose source is vectors, not tokens
VECTOR_FAMILIES = ("series_transformer", "series_rnn", "forecaster")
MODEL_CONFIGS = {name: config for name, (config, _) in FAMILIES.items()}

# the encoder-only families' tasks; the families with a decoder take theirs from the data (task_for)
ENCODER_TASKS: dict[str, Task] = {"encoder_mlm": MLMTask(), "encoder_classifier": ClassifyTask(),
                                  "encoder_tagger": TagTask()}


def build_model(cfg, src_vocab_size: int, tgt_vocab_size: int):
    """The model for `cfg` (a family config) with fresh weights."""
    return FAMILIES[cfg.family][1](cfg, src_vocab_size, tgt_vocab_size)


def task_for(cfg: Config) -> Task:
    """The task of `cfg`'s model family; families with a decoder are seq2seq unless the data says
    otherwise (data.objective 'denoise', data.dataset 'multitask')."""
    if cfg.model.family == "forecaster":
        return ForecastTask(cfg.data.forecast)
    if cfg.data.task == "forecast":
        return ForecastBinsTask(cfg.data.forecast)
    if cfg.data.task == "frames":
        return FramesTask()
    if cfg.model.family in ENCODER_TASKS:
        return ENCODER_TASKS[cfg.model.family]
    if cfg.data.objective == "denoise":
        return DenoiseTask()
    if cfg.data.dataset == "multitask":
        return MultitaskTask()
    return Seq2SeqTask()


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    """A checked config from a mapping of sections: every section, then the family's task's checks
    (metrics, data) and default metrics."""
    cfg = parse_config(raw, source, MODEL_CONFIGS)
    if cfg.model.family in VECTOR_FAMILIES and cfg.data.task == "text":
        raise ConfigError(f"{source}: key data.task: model.family {cfg.model.family!r} reads vectors, not text; "
                          "set data.task: forecast (a CSV series) or frames (.npy feature frames)")
    task = task_for(cfg)
    if not (isinstance(raw.get("eval"), dict) and "metrics" in raw["eval"]):
        cfg.eval.metrics = list(task.default_metrics)
    try:
        task.check(cfg)
    except ValueError as e:
        raise ConfigError(f"{source}: key {e}") from None
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read YAML, apply `--set` overrides (`train.lr=3e-4`), check every section."""
    return config_from_dict(read_config(path, overrides), str(path))
