"""Request bodies. The decoding options of /v1/translate are the fields of `DecodeConfig` that a
request may change, and those of /v1/generate the keyword parameters of `inference.generate`: an
option added there is accepted here with its type and no edit. Unknown fields are refused (422,
naming the valid ones)."""
from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from transduce.config import DecodeConfig
from transduce.inference import generate

# DecodeConfig fields that say how the server runs a model, not what a request decodes: batches are
# the batcher's, threads and engine are chosen when the server starts.
SERVER_SIDE = frozenset({"batch_size", "workers", "quantize", "engine"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="served model name (GET /v1/models); may be left out "
                                                   "when the server holds one")


def decode_options() -> list[str]:
    """The `DecodeConfig` fields a request may set, in declaration order."""
    return [f.name for f in dataclasses.fields(DecodeConfig) if f.name not in SERVER_SIDE]


def _optional_fields(hints: dict, names: list[str]) -> dict:
    return {n: (Optional[hints[n]], None) for n in names}


_decode_hints = typing.get_type_hints(DecodeConfig)

TranslateRequest = create_model(
    "TranslateRequest", __base__=_Strict,
    inputs=(list[str], Field(..., min_length=1, description="source texts, one output list each, in order")),
    attention=(bool, Field(False, description="also return the best output's cross-attention "
                                              "(attention models; GET /v1/models says which)")),
    **_optional_fields(_decode_hints, decode_options()),
)


def generate_options() -> list[str]:
    """The keyword parameters of `inference.generate` after the run and the prompt."""
    return [p for p in inspect.signature(generate).parameters if p not in ("run", "prompt")]


_generate_hints = typing.get_type_hints(generate)

GenerateRequest = create_model(
    "GenerateRequest", __base__=_Strict,
    prompt=(str, Field("", description="text to continue (plain-text runs) or the source (pairs runs)")),
    **_optional_fields(_generate_hints, generate_options()),
)


class InputsRequest(_Strict):
    """/v1/classify, /v1/tag, /v1/score: one result per input line, in order."""
    inputs: list[str] = Field(..., min_length=1)


def request_fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def set_options(request: BaseModel, names: list[str]) -> dict:
    """The options the request gave (others keep the run's defaults)."""
    return {n: getattr(request, n) for n in names if getattr(request, n) is not None}
