"""Run directories: what a trained run is on disk, and reading it back.

    RUN_DIR/config.yaml                 the whole resolved config (a model rebuilds from it alone)
    RUN_DIR/source_codec.json           tokenizer settings + vocabulary of each side
    RUN_DIR/target_codec.json
    RUN_DIR/checkpoints/index.json      which checkpoint is `best` and `last`
    RUN_DIR/checkpoints/step-N/         model.safetensors, optimizer.safetensors, state.json
    RUN_DIR/metrics.jsonl               training log

`import_huggingface` writes one from a Hugging Face BART or Marian folder.

`load_run` rebuilds a trained model from these files alone. A resumed run
must have the config and vocabularies its checkpoint was trained with
(`check_resumable`), up to the fields in `RESUMABLE_CHANGES`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from transduce.checkpoint import (CheckpointError, checkpoint_dir, load_model_tensors, read_checkpoint, read_json,
                                  save_checkpoint)
from transduce import engine as engines
from transduce.config import Config, ConfigError
from transduce.data.series import series_codec
from transduce.data.vocab import TextCodec
from transduce.inference import LoadedRun
from transduce.io import atomic_write_text
from transduce.registry import build_model, config_from_dict, load_config, task_for
from transduce.tasks import EncoderTask, InitCodecs

log = logging.getLogger("transduce")


def save_config(cfg: Config, path: Path) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_config(run_dir: str | Path) -> Config:
    """A run directory's config.yaml, checked; a CheckpointError naming the file if it does not load."""
    try:
        return load_config(Path(run_dir) / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_codecs(run_dir: Path) -> tuple[TextCodec, TextCodec]:
    out = []
    for side in ("source", "target"):
        path = Path(run_dir) / f"{side}_codec.json"
        try:
            d = read_json(path)
            out.append(series_codec(d) or TextCodec.from_dict(d))
        except (KeyError, ValueError, TypeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: not a valid codec file ({e})") from None
    return out[0], out[1]


def load_run(run_dir: str | Path, which: str = "best", quantize: str | None = None,
             engine: str | None = None) -> LoadedRun:
    """Rebuild the model of a run directory from its files alone, as `engine` runs it (default:
    the run's decode.engine; "torch": the modules themselves, see transduce/engine).
    `quantize="int8"` gives a model for CPU decoding whose linear layers run in int8 (see
    models/quantize.py); "auto" does where the CPU multiplies int8 natively."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    cfg = run_config(run_dir)
    src, tgt = load_codecs(run_dir)
    ckpt = checkpoint_dir(run_dir, which)
    if ckpt is None:
        raise CheckpointError(f"{run_dir / 'checkpoints' / 'index.json'}: missing (no checkpoint was saved)")
    state, tensors = read_checkpoint(ckpt)
    model = build_model(cfg.model, len(src.vocab), len(tgt.vocab))
    load_model_tensors(model, tensors, ckpt / "model.safetensors")
    model.eval()
    if quantize:
        from transduce.models.quantize import quantize as quantized, resolve

        if (kind := resolve(quantize)) is not None:
            model = quantized(model, kind)
    model = engines.build(model, engine or cfg.decode.engine)
    return LoadedRun(cfg, model, src, tgt, state, ckpt, task_for(cfg))


def load_decoding_run(run_dirs: list[str | Path], quantize: str | None = None,
                      engine: str | None = None) -> LoadedRun:
    """What `translate --model A [B ...]` decodes with: each run quantized as `quantize` says ("none":
    float32), or else as the first run's decode.quantize, run by `engine` (default: the first run's
    decode.engine); several runs: their ensemble (`inference.ensemble`), with the first one's settings."""
    from transduce.inference import ensemble
    from transduce.models.quantize import resolve

    first = run_config(run_dirs[0]).decode
    kind = resolve(first.quantize if quantize is None else quantize)
    engine = first.engine if engine in (None, "ctranslate2") else engine
    return ensemble([load_run(m, quantize=kind, engine=engine) for m in run_dirs], [str(m) for m in run_dirs])


def import_huggingface(folder: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face BART or Marian checkpoint `folder` (export/huggingface.py) as the run
    directory `out_dir` (one checkpoint, best, no optimizer state): translate, evaluate, export and
    train.init_from take it."""
    from transduce.config import TokenizerConfig
    from transduce.export.huggingface import imported_model, read_folder
    from transduce.io import fsync_dir

    imp = read_folder(folder)
    model = imported_model(imp)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty directory; name a new one")
    cfg = Config(model=imp.model_config)
    for side, codec in (("source", imp.source), ("target", imp.target)):
        setattr(cfg.data, f"{side}_tokenizer", TokenizerConfig(kind="pretrained", path=str(imp.folder.resolve()),
                                                               wrap=codec.wrap))
    cfg.eval.metrics = ["bleu", "chrf"]
    cfg.decode.beam, cfg.decode.length_penalty = imp.decode["beam"], imp.decode["length_penalty"]
    texts = {"source_codec.json": imp.source.dumps(), "target_codec.json": imp.target.dumps()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_config(cfg, tmp / "config.yaml")
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        state = {"step": 0, "epoch": 0, "config": cfg.to_dict(), "fingerprint": fingerprint(cfg, texts),
                 "imported_from": str(imp.folder.resolve())}
        save_checkpoint(tmp, "imported", model, None, state, best=True, keep=1, rng={}, texts=texts)
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def init_codecs(cfg: Config) -> InitCodecs | None:
    """The codecs of `train.init_from`'s run (None without one), so that embedding rows keep their
    meaning: source and target of a run with a decoder; of an encoder-only run the source alone
    (its target is labels)."""
    if not cfg.train.init_from:
        return None
    run = Path(cfg.train.init_from)
    from transduce.export.huggingface import is_hf_folder, read_folder

    if is_hf_folder(run):
        imp = read_folder(run)
        log.info("vocabularies from the Hugging Face checkpoint train.init_from %s", run)
        return InitCodecs(imp.source, imp.target)
    source, target = load_codecs(run)
    if isinstance(task_for(run_config(run)), EncoderTask):
        log.info("source vocabulary from train.init_from %s (data.source_tokenizer is not used)", run)
        return InitCodecs(source, None)
    log.info("vocabularies from train.init_from %s (data.source_tokenizer and data.target_tokenizer are "
             "not used)", run)
    return InitCodecs(source, target)


# ---------------------------------------------------------------------------
# Resuming: what a checkpoint must share with the run that continues it
# ---------------------------------------------------------------------------

# Config fields that may change when a run is resumed (budgets and reporting).
RESUMABLE_CHANGES = {"train.max_steps", "train.max_epochs", "train.max_minutes", "train.log_every",
                     "train.eval_every", "train.patience", "train.keep_checkpoints", "train.save_every",
                     "train.threads", "decode", "eval.dev_beam", "train.eval_max_items", "train.device",
                     "train.average_last"}
CODEC_FILES = ("source_codec.json", "target_codec.json")


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _allowed(diff: str) -> bool:
    key = diff.split(":", 1)[0]
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)


def _fixed_part(d: dict, prefix: str = "") -> dict:
    """The config without the fields a resume may change."""
    return {k: (_fixed_part(v, f"{prefix}{k}.") if isinstance(v, dict) else v)
            for k, v in d.items() if not _allowed(f"{prefix}{k}")}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def codec_texts(run_dir: Path) -> dict[str, str]:
    out = {}
    for name in CODEC_FILES:
        try:
            out[name] = (run_dir / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CheckpointError(f"{run_dir / name}: missing") from None
    return out


def fingerprint(cfg: Config, codec_texts: dict[str, str]) -> dict:
    """Hashes of what a resumed run must share with its checkpoint: config and vocabularies."""
    return {"config": _sha256(json.dumps(_fixed_part(cfg.to_dict()), sort_keys=True)),
            "source_vocab": _sha256(codec_texts["source_codec.json"]),
            "target_vocab": _sha256(codec_texts["target_codec.json"])}


def codec_differences(old: dict, new: dict) -> str:
    """What changed between two codec files (dicts), in words."""
    parts = []
    if old.get("tokenizer") != new.get("tokenizer"):
        parts.append(f"tokenizer {old.get('tokenizer', {}).get('kind')!r} -> {new.get('tokenizer', {}).get('kind')!r}"
                     " or its settings changed")
    a, b = old.get("symbols", []), new.get("symbols", [])
    added, removed = [s for s in b if s not in set(a)], [s for s in a if s not in set(b)]
    if added:
        parts.append(f"{len(added)} symbols added ({', '.join(map(repr, added[:5]))})")
    if removed:
        parts.append(f"{len(removed)} symbols removed ({', '.join(map(repr, removed[:5]))})")
    if not added and not removed and a != b:
        parts.append("the same symbols in another order (ids changed)")
    return "; ".join(parts) or "the file's bytes changed"


def check_resumable(cfg: Config, run_dir: Path, ckpt: Path, saved: dict) -> None:
    """Refuse to resume `ckpt` with a config or vocabulary other than its own, saying what differs."""
    fp = saved.get("fingerprint", {})
    texts = codec_texts(run_dir)
    now = fingerprint(cfg, texts)
    if fp.get("config") != now["config"]:
        old = config_from_dict(saved["config"], str(ckpt / "state.json"))
        diffs = [d for d in config_differences(old.to_dict(), cfg.to_dict()) if not _allowed(d)]
        if diffs:
            raise CheckpointError(f"{run_dir}: cannot resume with a different config; differences: "
                                  + "; ".join(diffs) + ". Use a new --out (or train.init_from to fine-tune).")
    for name in CODEC_FILES:
        key = name.replace("_codec.json", "_vocab")
        if key in fp and fp[key] != now[key]:
            copy = ckpt / name
            what = (codec_differences(read_json(copy), json.loads(texts[name])) if copy.is_file()
                    else "its hash differs from the checkpoint's")
            raise CheckpointError(f"{run_dir / name}: cannot resume with a different vocabulary than "
                                  f"checkpoint {ckpt.name} was trained with: {what}. Restore the file, or "
                                  "start a new run (new --out; train.init_from to fine-tune).")
