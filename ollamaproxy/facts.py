"""
What a request body says that the log wants: the model, the generation
parameters, and whether the client asked for a stream.

The body is forwarded untouched whatever happens here; a body that is not a
JSON object simply yields no facts (Ollama will answer it with its own 400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import unquote

from .routes import NATIVE_STREAMING, OPENAI_MODEL_PREFIX, Family, family

_NATIVE_PARAMETERS = ("format", "keep_alive", "think", "raw", "truncate")
_OPENAI_PARAMETERS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "response_format",
    "reasoning_effort",
)

# Every top-level member any of the functions below may read.
WANTED_FIELDS: frozenset[str] = frozenset(
    {"model", "name", "source", "stream", "stream_options", "options"}
    | set(_NATIVE_PARAMETERS)
    | set(_OPENAI_PARAMETERS)
)

# Routes whose SSE stream can be given a usage event the client did not ask
# for, and have it removed again byte-exactly (see ollamaproxy.meter).
USAGE_INJECTABLE = frozenset({b"/v1/chat/completions"})


@dataclass(slots=True)
class RequestFacts:
    model: str = ""
    parameters: str = ""
    wants_stream: bool = False
    asked_for_usage: bool = False


def parse_object(body: bytes) -> dict[str, Any] | None:
    """
    C{body} as a JSON object, or L{None} for anything else, including
    invalid UTF-8 and nesting deep enough to exhaust the recursion limit.
    """
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def facts_for(path: bytes, fields: Mapping[str, Any] | None) -> RequestFacts:
    """
    The facts of a request to C{path} (percent-decoded) whose body had the
    given top-level C{fields} (L{None} when the body was not a JSON object).
    """
    facts = RequestFacts()
    if path.startswith(OPENAI_MODEL_PREFIX):
        facts.model = unquote(path[len(OPENAI_MODEL_PREFIX):].decode("utf-8", "replace"))
    if not fields:
        facts.wants_stream = path in NATIVE_STREAMING
        return facts
    fam = family(path)
    facts.model = _model_name(path, fields) or facts.model
    stream = fields.get("stream")
    if fam is Family.NATIVE:
        facts.wants_stream = path in NATIVE_STREAMING and stream is not False
        parameters = _pick(fields, _NATIVE_PARAMETERS)
        options = fields.get("options")
        if isinstance(options, dict):
            parameters.update(options)
    else:
        facts.wants_stream = stream is True
        parameters = _pick(fields, _OPENAI_PARAMETERS)
        stream_options = fields.get("stream_options")
        facts.asked_for_usage = (
            isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        )
    if parameters:
        facts.parameters = json.dumps(
            parameters, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
    return facts


def _model_name(path: bytes, fields: Mapping[str, Any]) -> str:
    keys = ("source",) if path == b"/api/copy" else ("model", "name")
    for key in keys:
        value = fields.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _pick(fields: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: fields[name] for name in names if name in fields}


def fields_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """
    The members of a parsed body that L{facts_for} reads, matched the way Go
    matches JSON keys to struct fields: exactly, or else case-insensitively.
    """
    picked = {name: body[name] for name in WANTED_FIELDS if name in body}
    if len(picked) < len(body):
        for key, value in body.items():
            folded = key.lower()
            if folded in WANTED_FIELDS and folded not in body:
                picked[folded] = value
    return picked
