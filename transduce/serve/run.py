"""The runs a server holds: loaded as `transduce translate` loads them, and what each one does."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from transduce.inference import LoadedRun

# The endpoint of each task's command (`Task.command`); a run with a decoder also serves /v1/generate
# and /v1/score.
ENDPOINT_OF = {"translate": "translate", "classify": "classify", "tag": "tag"}


@dataclass
class ServedModel:
    name: str
    dirs: list[str]        # run directories (several: an ensemble)
    run: LoadedRun
    attention: bool = False  # has a cross-attention to show (set by `probe_attention`)

    @property
    def family(self) -> str:
        return self.run.config.model.family

    @property
    def can_decode(self) -> bool:
        return bool(self.run.model.can_decode)

    @property
    def endpoints(self) -> list[str]:
        """The /v1 endpoints this model answers."""
        command = self.run.task.command if self.run.task is not None else "translate"
        out = [ENDPOINT_OF[command]] if command in ENDPOINT_OF else []
        if self.can_decode:
            out = sorted(set(out) | {"translate", "generate", "score"})
        return out

    def length(self, text: str) -> int:
        """Source tokens of one input (what the batch budget and --max-input-tokens count)."""
        return len(self.run.source.encode(text))

    def describe(self, request_options: list[str]) -> dict:
        run = self.run
        params = sum(p.numel() for m in _members(run.model) for p in m.parameters())
        defaults = dataclasses.asdict(run.config.decode)
        return {"name": self.name, "family": self.family, "task": run.task.name if run.task else None,
                "runs": self.dirs, "ensemble": len(self.dirs), "parameters": params,
                "source_vocab": len(run.source.vocab), "target_vocab": len(run.target.vocab),
                "endpoints": self.endpoints, "attention": self.attention,
                "decoding": {k: defaults[k] for k in request_options}}


def _members(model) -> list:
    """The nn.Modules behind a model, an engine or an ensemble (for counting parameters)."""
    import torch

    if isinstance(model, torch.nn.Module):
        return [model]
    for attr in ("models", "directions"):
        inner = getattr(model, attr, None)
        if inner:
            return [m for x in inner for m in _members(x[0] if isinstance(x, tuple) else x)]
    inner = getattr(model, "model", None)
    return _members(inner) if inner is not None else []


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """`--model` as given: RUN_DIR, NAME=RUN_DIR, or NAME=RUN_A,RUN_B (an ensemble). The name defaults
    to the first directory's name."""
    name, sep, dirs = spec.partition("=")
    if not sep:
        name, dirs = "", spec
    paths = [d for d in dirs.split(",") if d]
    if not paths:
        raise ValueError(f"--model {spec!r}: no run directory (expected RUN_DIR, NAME=RUN_DIR or NAME=RUN_A,RUN_B)")
    return name or Path(paths[0]).resolve().name, paths


def load_models(specs: list[str], quantize: str | None = None, engine: str | None = None) -> dict[str, ServedModel]:
    """name -> model for each `--model` spec, each loaded as `translate --model` loads it."""
    from transduce.runs import load_decoding_run

    out: dict[str, ServedModel] = {}
    for spec in specs:
        name, dirs = parse_spec(spec)
        if name in out:
            raise ValueError(f"--model {spec!r}: the name {name!r} is taken; give another (NAME=RUN_DIR)")
        out[name] = ServedModel(name, dirs, load_decoding_run(dirs, quantize, engine))
    return out


def probe_attention(model: ServedModel) -> None:
    """Whether the model has a cross-attention to show (one model with a decoder that records it)."""
    from transduce.attention import cross_attention

    model.attention = False
    if not model.can_decode or len(model.dirs) > 1:
        return
    sym = [i for i in range(len(model.run.source.vocab)) if i >= 4][:1] or [4]
    try:
        cross_attention(model.run.model, sym, [])
        model.attention = True
    except (ValueError, AttributeError, TypeError):
        model.attention = False


def attention_of(run: LoadedRun, source: str, output: str) -> dict:
    """The best output's cross-attention for the page: the last decoder layer, mean over heads."""
    from transduce.attention import cross_attention

    src_ids, out_ids = run.source.encode(source), run.target.encode(output)
    if not src_ids:
        return {"source_tokens": [], "output_tokens": [], "weights": []}
    att = cross_attention(run.model, src_ids, out_ids)   # (layers, heads, T, S)
    weights = att[-1].mean(0)                             # (T, S)
    return {"source_tokens": [run.source.vocab.itos[i] for i in src_ids],
            "output_tokens": [run.target.vocab.itos[i] for i in out_ids] + ["</s>"],
            "weights": [[round(float(x), 4) for x in row] for row in weights]}
