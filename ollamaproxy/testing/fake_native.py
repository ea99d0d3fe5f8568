"""
The fake Ollama's native API (C{/} and C{/api/*}): one function per route,
called by L{FakeOllama}'s router as C{handler(fake, exchange, params)}, and
the NDJSON encoders its generating routes stream with.

Handlers raise L{ApiError} for Ollama's error replies; the router writes
them as C{{"error": "..."}} with gin's framing.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime

from ollamaproxy.testing.fake_support import (
    CT_JSON, CT_JSON_UTF8, CT_NDJSON, CT_TEXT_UTF8, ApiError, Exchange, FakeModel, GenerationPlan,
    Job, Reply, SingleReplyEncoder, decode_request, embedding_vector, go_json, go_json_line,
    native_error, parse_keep_alive, rfc3339_nano, unmarshal_message,
)

if TYPE_CHECKING:
    from ollamaproxy.testing.fake_ollama import FakeOllama

Params = dict[str, str]


# ---------------------------------------------------------------------------
# General

def root(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """The health check."""
    exchange.reply(Reply(200, CT_TEXT_UTF8, b"Ollama is running"))


def version(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    exchange.reply(_json_reply({"version": fake.version}))


def status(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    exchange.reply(_json_reply({"cloud": {"disabled": False, "source": "default"}}))


def me(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """Never signed in to ollama.com."""
    url = f"https://ollama.com/connect?name={socket.gethostname()}&key=ZmFrZS1vbGxhbWEta2V5"
    exchange.reply(_json_reply({"error": "unauthorized", "signin_url": url}, 401))


def signout(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    raise ApiError(401, "you are not currently signed in")


def web_proxy(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """Ollama proxies these to ollama.com, which the fake never reaches."""
    if not exchange.body().strip():
        raise ApiError(400, "missing request body")
    raise ApiError(502, "ollama.com is unreachable from the fake Ollama")


def recommendations(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    exchange.reply(_json_reply({"recommendations": []}))


# ---------------------------------------------------------------------------
# Model management

def tags(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    listing = [{"name": m.name, "model": m.name, "modified_at": rfc3339_nano(m.modified_at),
                "size": m.size, "digest": m.digest, "details": m.details()} for m in fake.models]
    exchange.reply(_json_reply({"models": listing}))


def ps(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    running = fake.loaded_models()
    listing = [{"name": m.name, "model": m.name, "size": m.size, "digest": m.digest,
                "details": m.details(),
                "expires_at": rfc3339_nano(min(expiry, 253_402_300_799.0)),
                "size_vram": m.size, "context_length": 4096} for expiry, m in running]
    exchange.reply(_json_reply({"models": listing}))


def show(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    request = decode_request(exchange.body(), "api.ShowRequest",
                             {"model": "string", "name": "string", "verbose": "bool"})
    name = request.get("model") or request.get("name") or ""
    if not name:
        raise ApiError(400, "model is required")
    model = fake.find_model(name)
    if model is None:
        raise ApiError(404, f"model '{name}' not found")
    exchange.reply(_json_reply(_show_body(model)))


def copy(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    request = decode_request(exchange.body(), "api.CopyRequest",
                             {"source": "string", "destination": "string"})
    source, destination = request.get("source") or "", request.get("destination") or ""
    if not source:
        raise ApiError(400, f'source "{source}" is invalid')
    if not destination:
        raise ApiError(400, f'destination "{destination}" is invalid')
    model = fake.find_model(source)
    if model is None:
        raise ApiError(404, f'model "{source}" not found')
    fake.add_model(replace(model, name=_display_name(destination), modified_at=fake.clock.seconds()))
    exchange.reply(Reply(200, None))


def delete(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    request = decode_request(exchange.body(), "api.DeleteRequest",
                             {"model": "string", "name": "string"})
    name = request.get("model") or request.get("name") or ""
    if not name:
        raise ApiError(400, f'name "{name}" is invalid')
    if fake.find_model(name) is None:
        raise ApiError(404, f"model '{name}' not found")
    fake.remove_model(name)
    exchange.reply(Reply(200, None))


def head_blob(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    digest = _blob_digest(params["digest"])
    if digest not in fake.blobs:
        raise ApiError(404, f'blob "{params["digest"]}" not found')
    exchange.reply(Reply(200, None))


def create_blob(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """Answers from the body's digest, computed block by block on arrival."""
    digest = _blob_digest(params["digest"])
    if digest in fake.blobs:
        exchange.reply(Reply(200, None))
        return
    actual = "sha256:" + exchange.body_sha256
    if actual != params["digest"]:
        raise ApiError(400, f'digest mismatch, expected "{params["digest"]}", got "{actual}"')
    fake.blobs.add(digest)
    exchange.reply(Reply(201, None))


def pull(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    request = decode_request(exchange.body(), "api.PullRequest", _PROGRESS_FIELDS)
    name = request.get("model") or request.get("name") or ""
    if not name:
        raise ApiError(400, "invalid model name")
    existing = fake.find_model(name)
    statuses = [{"status": "pulling manifest"}, *_layer_progress("pulling", name, existing),
                {"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                {"status": "success"}]
    installed = existing or FakeModel(_display_name(name), modified_at=fake.clock.seconds())
    _run_progress(fake, exchange, request, statuses, lambda: fake.add_model(installed))


def push(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    request = decode_request(exchange.body(), "api.PushRequest", _PROGRESS_FIELDS)
    name = request.get("model") or request.get("name") or ""
    if not name:
        raise ApiError(400, "model is required")
    model = fake.find_model(name)
    if model is None:  # the push fails before its stream starts
        exchange.reply(native_error(500, f'model "{name}" not found', CT_JSON))
        return
    statuses = [{"status": "retrieving manifest"}, *_layer_progress("pushing", name, model),
                {"status": "pushing manifest"}, {"status": "success"}]
    _run_progress(fake, exchange, request, statuses, None)


def create(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    request = decode_request(exchange.body(), "api.CreateRequest",
                             dict(_PROGRESS_FIELDS, **{"from": "string"}))
    name = request.get("model") or request.get("name") or ""
    if not name:
        raise ApiError(400, "invalid model name")
    base = fake.find_model(request.get("from") or "") or FakeModel(name)
    created = replace(base, name=_display_name(name), modified_at=fake.clock.seconds())
    statuses: list[dict[str, Any]] = [
        {"status": "gathering model components"},
        {"status": f"using existing layer sha256:{base.digest}"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    _run_progress(fake, exchange, request, statuses, lambda: fake.add_model(created))


def _run_progress(fake: FakeOllama, exchange: Exchange, request: dict[str, Any],
                  statuses: list[dict[str, Any]], on_success: Callable[[], None] | None) -> None:
    armed = fake.admit()
    encoder = _ProgressEncoder(statuses, request.get("stream") is not False)
    fake.run_job(exchange, Job(encoder, len(statuses), loads_model=False, on_success=on_success), armed)


# ---------------------------------------------------------------------------
# Inference

def generate(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """Checks in Ollama's order: body, unload, raw, model and capabilities, options, queue."""
    request = decode_request(exchange.body(), "api.GenerateRequest", _GENERATE_FIELDS)
    name, prompt = request.get("model") or "", request.get("prompt") or ""
    keep_alive = parse_keep_alive(request.get("keep_alive"))
    think = _parse_think(request.get("think"))
    _check_top_logprobs(request)
    if prompt == "" and _unloaded(fake, name, keep_alive):
        exchange.reply(_json_reply(_generate_object(name, fake.clock, "", done_reason="unload")))
        return
    if request.get("raw") and any(request.get(key) for key in ("template", "system", "context")):
        raise ApiError(400, "raw mode does not support template, system, or context")
    model, thinking = fake.check_generation("generate", name, think)
    _check_options(request.get("options"))
    armed = fake.admit(generating=prompt != "")
    if prompt == "":
        fake.note_loaded(model, keep_alive)
        exchange.reply(_json_reply(_generate_object(name, fake.clock, "", done_reason="load")))
        return
    plan = fake.plan([request.get("system") or "", prompt], _num_predict(request), thinking)
    encoder = _GenerateEncoder(plan, name, fake.clock, request.get("stream") is not False,
                               with_context=not request.get("raw"))
    fake.run_job(exchange, Job(encoder, plan.steps, model.name, keep_alive=keep_alive), armed)


def chat(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    request = decode_request(exchange.body(), "api.ChatRequest", _CHAT_FIELDS)
    name, messages = request.get("model") or "", _native_messages(request.get("messages") or [])
    keep_alive = parse_keep_alive(request.get("keep_alive"))
    think = _parse_think(request.get("think"))
    _check_top_logprobs(request)
    if not messages and _unloaded(fake, name, keep_alive):
        exchange.reply(_json_reply(_chat_object(name, fake.clock, "", done_reason="unload")))
        return
    model, thinking = fake.check_generation("chat", name, think, tools=bool(request.get("tools")))
    _check_options(request.get("options"))
    armed = fake.admit(generating=bool(messages))
    if not messages:
        fake.note_loaded(model, keep_alive)
        exchange.reply(_json_reply(_chat_object(name, fake.clock, "", done_reason="load")))
        return
    plan = fake.plan((m.get("content") or "" for m in messages), _num_predict(request), thinking)
    encoder = _ChatEncoder(plan, name, fake.clock, request.get("stream") is not False)
    fake.run_job(exchange, Job(encoder, plan.steps, model.name, keep_alive=keep_alive), armed)


def embed(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    request = decode_request(exchange.body(), "api.EmbedRequest",
                             {"model": "string", "truncate": "bool", "dimensions": "int",
                              "options": "map[string]interface {}"})
    name = request.get("model") or ""
    keep_alive = parse_keep_alive(request.get("keep_alive"))
    if not name:
        raise ApiError(404, "model '' not found")
    inputs = _embed_inputs(request.get("input"))
    model = fake.find_model(name)
    if model is None:
        raise ApiError(404, f'model "{name}" not found, try pulling it first')
    armed = fake.admit(generating=bool(inputs))
    if not inputs:
        fake.note_loaded(model, keep_alive)
        exchange.reply(_json_reply({"model": name, "embeddings": []}))
        return
    vectors, metrics = fake.embed(name, inputs, request.get("dimensions"))
    body = {"model": name, "embeddings": vectors, **metrics.fields()}
    encoder = SingleReplyEncoder(_json_reply(body), native_error)
    fake.run_job(exchange, Job(encoder, 1, model.name, keep_alive=keep_alive), armed)


def embeddings(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """The legacy endpoint: one prompt, float64 values, no metrics."""
    request = decode_request(exchange.body(), "api.EmbeddingRequest",
                             {"model": "string", "prompt": "string"})
    name, prompt = request.get("model") or "", request.get("prompt") or ""
    keep_alive = parse_keep_alive(request.get("keep_alive"))
    if not name:
        raise ApiError(400, "model is required")
    model = fake.find_model(name)
    if model is None:
        raise ApiError(404, f'model "{name}" not found, try pulling it first')
    armed = fake.admit(generating=prompt != "")
    if not prompt:
        fake.note_loaded(model, keep_alive)
        exchange.reply(_json_reply({"embedding": []}))
        return
    vector = embedding_vector(prompt, model.embedding_length)
    encoder = SingleReplyEncoder(_json_reply({"embedding": vector}), native_error)
    fake.run_job(exchange, Job(encoder, 1, model.name, keep_alive=keep_alive), armed)


# ---------------------------------------------------------------------------
# Encoders

class _NativeEncoder:
    """NDJSON framing and Ollama's error bodies."""

    stream_content_type = CT_NDJSON
    stream_headers: tuple[tuple[bytes, bytes], ...] = ()
    body_content_type = CT_JSON_UTF8

    def __init__(self, stream: bool) -> None:
        self.stream = stream

    def midstream_error(self, message: str) -> bytes:
        return go_json_line({"error": message})

    def runner_error(self, status: int, message: str) -> Reply:
        return native_error(status, message, CT_JSON if self.stream else self.body_content_type)


class _GenerateEncoder(_NativeEncoder):
    def __init__(self, plan: GenerationPlan, model: str, clock: IReactorTime, stream: bool,
                 with_context: bool) -> None:
        super().__init__(stream)
        self._plan, self._model, self._clock = plan, model, clock
        self._with_context = with_context

    def frame(self, step: int) -> bytes:
        piece = self._plan.piece(step)
        response, thinking = ("", piece.text) if piece.thinking else (piece.text, "")
        if step < self._plan.steps - 1:
            return go_json_line(_generate_object(self._model, self._clock, response, thinking))
        return go_json_line(self._final(response, thinking))

    def body(self) -> Reply:
        return _json_reply(self._final(self._plan.text(), self._plan.text(thinking=True)))

    def _final(self, response: str, thinking: str) -> dict[str, Any]:
        final = _generate_object(self._model, self._clock, response, thinking,
                                 done_reason=self._plan.done_reason)
        if self._with_context:
            final["context"] = self._plan.context()
        final.update(self._plan.metrics.fields())
        return final


class _ChatEncoder(_NativeEncoder):
    def __init__(self, plan: GenerationPlan, model: str, clock: IReactorTime, stream: bool) -> None:
        super().__init__(stream)
        self._plan, self._model, self._clock = plan, model, clock

    def frame(self, step: int) -> bytes:
        piece = self._plan.piece(step)
        content, thinking = ("", piece.text) if piece.thinking else (piece.text, "")
        done_reason = self._plan.done_reason if step == self._plan.steps - 1 else None
        return go_json_line(self._object(content, thinking, done_reason))

    def body(self) -> Reply:
        return _json_reply(self._object(self._plan.text(), self._plan.text(thinking=True),
                                        self._plan.done_reason))

    def _object(self, content: str, thinking: str, done_reason: str | None) -> dict[str, Any]:
        chunk = _chat_object(self._model, self._clock, content, thinking, done_reason=done_reason)
        if done_reason is not None:
            chunk.update(self._plan.metrics.fields())
        return chunk


class _ProgressEncoder(_NativeEncoder):
    """Pull/push/create progress; C{stream:false} sends only the last object."""

    body_content_type = CT_JSON

    def __init__(self, statuses: list[dict[str, Any]], stream: bool) -> None:
        super().__init__(stream)
        self._statuses = statuses

    def frame(self, step: int) -> bytes:
        return go_json_line(self._statuses[step])

    def body(self) -> Reply:
        return Reply(200, CT_JSON, go_json(self._statuses[-1]))


# ---------------------------------------------------------------------------
# Request checks and reply shapes

_PROGRESS_FIELDS = {"model": "string", "name": "string", "insecure": "bool", "stream": "bool"}
_GENERATE_FIELDS = {"model": "string", "prompt": "string", "suffix": "string", "system": "string",
                    "template": "string", "context": "[]int", "stream": "bool", "raw": "bool",
                    "images": "[]api.ImageData", "options": "map[string]interface {}",
                    "logprobs": "bool", "top_logprobs": "int"}
_CHAT_FIELDS = {"model": "string", "messages": "[]api.Message", "tools": "api.Tools",
                "stream": "bool", "options": "map[string]interface {}", "logprobs": "bool",
                "top_logprobs": "int"}
_OPTION_TYPES = {
    **dict.fromkeys(("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx",
                     "num_batch", "num_gpu", "main_gpu", "num_thread"), "integer"),
    **dict.fromkeys(("top_p", "min_p", "typical_p", "temperature", "repeat_penalty",
                     "presence_penalty", "frequency_penalty"), "float32"),
    "use_mmap": "boolean", "stop": "array",
}


def _unloaded(fake: FakeOllama, name: str, keep_alive: float | None) -> bool:
    """An empty request with C{keep_alive: 0} unloads a known model at once."""
    model = fake.find_model(name)
    if model is None or keep_alive != 0:
        return False
    fake.note_loaded(model, 0)
    return True


def _json_reply(value: object, status: int = 200) -> Reply:
    return Reply(status, CT_JSON_UTF8, go_json(value))


def _generate_object(model: str, clock: IReactorTime, response: str, thinking: str = "", *,
                     done_reason: str | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": model, "created_at": rfc3339_nano(clock.seconds()),
                             "response": response}
    if thinking:
        chunk["thinking"] = thinking
    chunk["done"] = done_reason is not None
    if done_reason is not None:
        chunk["done_reason"] = done_reason
    return chunk


def _chat_object(model: str, clock: IReactorTime, content: str, thinking: str = "", *,
                 done_reason: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    chunk: dict[str, Any] = {"model": model, "created_at": rfc3339_nano(clock.seconds()),
                             "message": message, "done": done_reason is not None}
    if done_reason is not None:
        chunk["done_reason"] = done_reason
    return chunk


def _show_body(model: FakeModel) -> dict[str, Any]:
    family = model.family
    modelfile = ('# Modelfile generated by "ollama show"\n'
                 "# To build a new Modelfile based on this, replace FROM with:\n"
                 f"# FROM {model.name}\n\nFROM {model.name}\nTEMPLATE {{{{ .Prompt }}}}\n")
    return {
        "modelfile": modelfile,
        "template": "{{ .Prompt }}",
        "details": model.details(),
        "model_info": {"general.architecture": family, "general.parameter_count": model.size // 2,
                       f"{family}.context_length": model.context_length,
                       f"{family}.embedding_length": model.embedding_length},
        "capabilities": list(model.capabilities),
        "modified_at": rfc3339_nano(model.modified_at),
    }


def _layer_progress(verb: str, name: str, model: FakeModel | None) -> list[dict[str, Any]]:
    """One layer's transfer in four lines (C{completed} is omitted while 0, as in Go)."""
    digest = model.digest if model else hashlib.sha256(name.encode()).hexdigest()
    total = model.size if model else 1_000_000
    layer = {"status": f"{verb} {digest[:12]}", "digest": f"sha256:{digest}", "total": total}
    return [layer] + [dict(layer, completed=total * part // 3) for part in (1, 2, 3)]


def _display_name(name: str) -> str:
    """The name as C{/api/tags} shows it: default registry and namespace dropped."""
    display = name.strip()
    for prefix in ("registry.ollama.ai/", "library/"):
        display = display.removeprefix(prefix)
    return display if ":" in display.rsplit("/", 1)[-1] else display + ":latest"


def _blob_digest(digest: str) -> str:
    if len(digest) != 71 or digest[:7] not in ("sha256:", "sha256-") or not _is_hex(digest[7:]):
        raise ApiError(400, "invalid digest format")
    return "sha256:" + digest[7:]


def _is_hex(text: str) -> bool:
    return all(char in "0123456789abcdefABCDEF" for char in text)


def _parse_think(value: object) -> bool | str | None:
    """Ollama's C{api.ThinkValue}: a bool, or a level name."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in ("high", "medium", "low", "max"):
            return value
        raise ApiError(400, f'invalid think value: "{value}" '
                            '(must be "high", "medium", "low", true, or false)')
    raise ApiError(400, 'think must be a boolean or string ("high", "medium", "low", true, or false)')


def _check_top_logprobs(request: dict[str, Any]) -> None:
    if not 0 <= (request.get("top_logprobs") or 0) <= 20:
        raise ApiError(400, "top_logprobs must be between 0 and 20")


def _check_options(options: dict[str, Any] | None) -> None:
    """Go's C{Options.FromMap}: a wrongly typed known option fails with 500."""
    for key, value in (options or {}).items():
        expected = _OPTION_TYPES.get(key)
        valid = {
            "integer": isinstance(value, (int, float)) and not isinstance(value, bool),
            "float32": isinstance(value, (int, float)) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "array": isinstance(value, list),
        }.get(expected or "", True)
        if value is not None and not valid:
            raise ApiError(500, f'option "{key}" must be of type {expected}')


def _num_predict(request: dict[str, Any]) -> int | None:
    value = (request.get("options") or {}).get("num_predict")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _native_messages(messages: list[Any]) -> list[dict[str, Any]]:
    for message in messages:
        if not isinstance(message, dict):
            raise ApiError(400, unmarshal_message(message, "ChatRequest.messages", "api.Message"))
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ApiError(400, unmarshal_message(content, "Message.messages.content", "string"))
    return messages


def _embed_inputs(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ApiError(400, "invalid input type")
