"""
The fake Ollama's /v1 layers: OpenAI chat completions, completions,
embeddings, models, responses and audio transcriptions, and Anthropic's
messages API.

Like Ollama's middleware, each handler checks its own request shape (those
errors keep gin's C{c.JSON} framing: C{charset=utf-8}, no newline), runs the
native checks and generation plan of L{FakeOllama}, and re-frames the answer
(SSE, OpenAI or Anthropic error bodies with a trailing newline).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ollamaproxy.testing.fake_support import (
    CT_JSON, CT_JSON_UTF8, CT_SSE, CT_TEXT_UTF8, ApiError, Exchange, GenerationPlan, Job,
    Piece, Reply, SingleReplyEncoder, answer_at_once, decode_request, float32_base64, go_json,
    go_json_line, model_namespace, unmarshal_message,
)

if TYPE_CHECKING:
    from ollamaproxy.testing.fake_ollama import FakeOllama

Params = dict[str, str]
Headers = tuple[tuple[bytes, bytes], ...]

_SSE_HEADERS: Headers = ((b"cache-control", b"no-cache"), (b"connection", b"keep-alive"))
_DONE = b"data: [DONE]\n\n"
_FINGERPRINT = "fp_ollama"
_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
                    529: "overloaded_error"}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}
_EFFORTS: dict[str, bool | str] = {"none": False, "minimal": "low", "low": "low", "medium": "medium",
                                   "high": "high", "max": "max", "xhigh": "max", "ultra": "max"}
_IMAGE_PREFIXES = tuple(f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp")) + (
    "data:;base64,",)


# ---------------------------------------------------------------------------
# Error bodies

def openai_error(error: ApiError) -> Reply:
    """OpenAI's error shape, keeping Ollama's status."""
    body = {"error": {"message": error.message, "type": _OPENAI_TYPES.get(error.status, "api_error"),
                      "param": None, "code": None}}
    return _error_reply(error, body)


def anthropic_error(error: ApiError) -> Reply:
    """Anthropic's error shape, keeping Ollama's status."""
    body = {"type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(error.status, "api_error"), "message": error.message},
            "request_id": "req_" + secrets.token_hex(12)}
    return _error_reply(error, body)


def _error_reply(error: ApiError, body: dict[str, Any]) -> Reply:
    if error.early:  # a middleware's c.AbortWithStatusJSON
        return Reply(error.status, CT_JSON_UTF8, go_json(body))
    return Reply(error.status, CT_JSON, go_json_line(body))


def _with_headers(reply: Reply, headers: Headers) -> Reply:
    return replace(reply, headers=reply.headers + headers)


def _decode(exchange: Exchange, go_type: str, fields: dict[str, str]) -> dict[str, Any]:
    return decode_request(exchange.body(), go_type, fields, empty_message="EOF", early=True)


def _go_type_name(value: object) -> str:
    """How Go's C{%T} names a decoded JSON value."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "float64"
    return {str: "string", list: "[]interface {}"}.get(type(value), "map[string]interface {}")


def _usage(plan: GenerationPlan) -> dict[str, int]:
    prompt, completion = plan.metrics.prompt_eval_count, plan.metrics.eval_count
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(value: object) -> bytes:
    return b"data: " + go_json(value) + b"\n\n"


def _event(kind: str, value: object, *, go_map: bool = False) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + go_json(value, go_map=go_map) + b"\n\n"


class _V1Encoder:
    """SSE framing; a mid-stream runner error loses its text on /v1."""

    stream_content_type = CT_SSE
    stream_headers: Headers = ()

    def __init__(self, plan: GenerationPlan, model: str, stream: bool) -> None:
        self._plan, self._model, self.stream = plan, model, stream

    def _last(self, step: int) -> bool:
        return step == self._plan.steps - 1

    def midstream_error(self, message: str) -> bytes:
        return b""

    def runner_error(self, status: int, message: str) -> Reply:
        headers = self.stream_headers if self.stream else ()
        return _with_headers(openai_error(ApiError(status, message)), headers)


# ---------------------------------------------------------------------------
# /v1/chat/completions

_CHAT_FIELDS = {"model": "string", "messages": "[]openai.Message", "stream": "bool",
                "stream_options": "openai.StreamOptions", "max_tokens": "int",
                "max_completion_tokens": "int", "tools": "[]api.Tool", "reasoning_effort": "string",
                "reasoning": "openai.Reasoning"}


def chat_completions(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """Ollama's ChatMiddleware: check, convert, run as a native chat, re-frame."""
    request = _decode(exchange, "openai.ChatCompletionRequest", _CHAT_FIELDS)
    messages = request.get("messages") or []
    if not messages:
        raise ApiError(400, "[] is too short - 'messages'", early=True)
    texts = [_openai_message_text(message) for message in messages]
    think = _effort(request.get("reasoning_effort") or (request.get("reasoning") or {}).get("effort"))
    name = request.get("model") or ""
    model, thinking = fake.check_generation("chat", name, think, tools=bool(request.get("tools")))
    armed = fake.admit()
    limit = _first_int(request, "max_tokens", "max_completion_tokens")
    plan = fake.plan(texts, limit, thinking)
    encoder = _ChatCompletionEncoder(plan, name, f"chatcmpl-{fake.next_serial() % 999}",
                                     int(fake.clock.seconds()), request.get("stream") is True,
                                     _include_usage(request))
    fake.run_job(exchange, Job(encoder, plan.steps, model.name), armed)


class _ChatCompletionEncoder(_V1Encoder):
    """Content chunks, a separate finish chunk, the optional usage chunk, C{[DONE]}."""

    def __init__(self, plan: GenerationPlan, model: str, completion_id: str, created: int,
                 stream: bool, include_usage: bool) -> None:
        super().__init__(plan, model, stream)
        self._id, self._created, self._include_usage = completion_id, created, include_usage
        self._role_sent = False

    def frame(self, step: int) -> bytes:
        piece = self._plan.piece(step)
        frames = [self._chunk(self._delta(piece), None)] if piece.text else []
        if self._last(step):
            frames.append(self._chunk({}, self._plan.done_reason))
            if self._include_usage:
                frames.append(_sse({**self._header(), "choices": [], "usage": _usage(self._plan)}))
            frames.append(_DONE)
        return b"".join(frames)

    def body(self) -> Reply:
        message = {"role": "assistant", "content": self._plan.text()}
        if self._plan.text(thinking=True):
            message["reasoning"] = self._plan.text(thinking=True)
        choice = {"index": 0, "message": message, "finish_reason": self._plan.done_reason}
        completion = {**self._header("chat.completion"), "choices": [choice],
                      "usage": _usage(self._plan)}
        return Reply(200, CT_JSON, go_json_line(completion))

    def midstream_error(self, message: str) -> bytes:
        """Ollama's ChatWriter turns the error line into an empty chunk; no C{[DONE]}."""
        header = {**self._header(), "model": ""}
        choice = {"index": 0, "delta": {"content": ""}, "finish_reason": None}
        return _sse({**header, "choices": [choice]})

    def _delta(self, piece: Piece) -> dict[str, str]:
        delta = {} if self._role_sent else {"role": "assistant"}
        self._role_sent = True
        if piece.thinking:
            delta.update(content="", reasoning=piece.text)
        else:
            delta["content"] = piece.text
        return delta

    def _header(self, kind: str = "chat.completion.chunk") -> dict[str, Any]:
        return {"id": self._id, "object": kind, "created": self._created, "model": self._model,
                "system_fingerprint": _FINGERPRINT}

    def _chunk(self, delta: dict[str, str], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _sse({**self._header(), "choices": [choice]})


def _openai_message_text(message: object) -> str:
    if not isinstance(message, dict):
        wrong_type = unmarshal_message(message, "ChatCompletionRequest.messages", "openai.Message")
        raise ApiError(400, wrong_type, early=True)
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_content_part_text(part) for part in content)
    if content is None and message.get("tool_calls"):
        return ""
    raise ApiError(400, f"invalid message content type: {_go_type_name(content)}", early=True)


def _content_part_text(part: object) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if isinstance(part, dict) and kind == "text" and isinstance(part.get("text"), str):
        return str(part["text"])
    if isinstance(part, dict) and kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url.startswith(_IMAGE_PREFIXES):
            raise ApiError(400, "invalid image input", early=True)
        return ""
    raise ApiError(400, "invalid message format", early=True)


def _effort(value: object) -> bool | str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or value not in _EFFORTS:
        raise ApiError(400, f'invalid reasoning value: "{value}" '
                            '(must be "high", "medium", "low", "max", or "none")', early=True)
    return _EFFORTS[value]


def _first_int(request: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = request.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return None


def _include_usage(request: dict[str, Any]) -> bool:
    return bool((request.get("stream_options") or {}).get("include_usage"))


# ---------------------------------------------------------------------------
# /v1/completions

_COMPLETION_FIELDS = {"model": "string", "prompt": "string", "stream": "bool", "suffix": "string",
                      "stream_options": "openai.StreamOptions", "max_tokens": "int"}


def completions(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """A native generate; an empty prompt is a model load (C{finish_reason} C{load})."""
    request = _decode(exchange, "openai.CompletionRequest", _COMPLETION_FIELDS)
    name, prompt = request.get("model") or "", request.get("prompt") or ""
    model, thinking = fake.check_generation("generate", name, None)
    armed = fake.admit(generating=bool(prompt))
    plan = (fake.plan([prompt], _first_int(request, "max_tokens"), thinking) if prompt
            else GenerationPlan.load_only())
    encoder = _CompletionEncoder(plan, name, f"cmpl-{fake.next_serial() % 999}",
                                 int(fake.clock.seconds()), request.get("stream") is True,
                                 _include_usage(request))
    if not prompt:
        answer_at_once(exchange, encoder, plan.steps)
        return
    fake.run_job(exchange, Job(encoder, plan.steps, model.name), armed)


class _CompletionEncoder(_V1Encoder):
    """One chunk per native chunk; with include_usage every chunk has zero usage."""

    def __init__(self, plan: GenerationPlan, model: str, completion_id: str, created: int,
                 stream: bool, include_usage: bool) -> None:
        super().__init__(plan, model, stream)
        self._id, self._created, self._include_usage = completion_id, created, include_usage

    def frame(self, step: int) -> bytes:
        piece = self._plan.piece(step)
        finish_reason = self._plan.done_reason if self._last(step) else None
        frames = [_sse(self._chunk("" if piece.thinking else piece.text, finish_reason))]
        if self._last(step):
            if self._include_usage:
                usage = {**self._chunk("", None), "choices": [], "usage": _usage(self._plan)}
                frames.append(_sse(usage))
            frames.append(_DONE)
        return b"".join(frames)

    def body(self) -> Reply:
        choice = {"text": self._plan.text(), "index": 0, "finish_reason": self._plan.done_reason}
        completion = {"id": self._id, "object": "text_completion", "created": self._created,
                      "model": self._model, "system_fingerprint": _FINGERPRINT, "choices": [choice],
                      "usage": _usage(self._plan)}
        return Reply(200, CT_JSON, go_json_line(completion))

    def midstream_error(self, message: str) -> bytes:
        """The error line becomes an empty chunk for model ""; no C{[DONE]}."""
        return _sse({**self._chunk("", None), "model": ""})

    def _chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._id, "object": "text_completion", "created": self._created,
            "choices": [{"text": text, "index": 0, "finish_reason": finish_reason}],
            "model": self._model, "system_fingerprint": _FINGERPRINT}
        if self._include_usage:
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return chunk


# ---------------------------------------------------------------------------
# /v1/embeddings, /v1/models, /v1/audio/transcriptions

def embeddings(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    request = _decode(exchange, "openai.EmbedRequest",
                      {"model": "string", "dimensions": "int", "encoding_format": "string"})
    encoding = request.get("encoding_format") or ""
    if encoding and encoding.lower() not in ("float", "base64"):
        raise ApiError(400, f"Invalid value for 'encoding_format' = {encoding}. "
                            "Supported values: ['float', 'base64'].", early=True)
    inputs = request.get("input")
    inputs = [""] if inputs == "" else inputs
    if inputs is None or inputs == []:
        raise ApiError(400, "invalid input", early=True)
    name = request.get("model") or ""
    if not name:
        raise ApiError(404, "model '' not found")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
        raise ApiError(400, "invalid input type")
    model = fake.find_model(name)
    if model is None:
        raise ApiError(404, f'model "{name}" not found, try pulling it first')
    armed = fake.admit()
    vectors, metrics = fake.embed(name, inputs, request.get("dimensions"))
    base64_wanted = encoding.lower() == "base64"
    data = [{"object": "embedding", "embedding": float32_base64(vector) if base64_wanted else vector,
             "index": index} for index, vector in enumerate(vectors)]
    tokens = metrics.prompt_eval_count
    body = {"object": "list", "data": data, "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    encoder = SingleReplyEncoder(Reply(200, CT_JSON, go_json_line(body)), _openai_runner_error)
    fake.run_job(exchange, Job(encoder, 1, model.name), armed)


def list_models(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """The list, or C{"data":null} when no model is installed."""
    data = [_model_object(model.name, model.modified_at) for model in fake.models]
    exchange.reply(Reply(200, CT_JSON, go_json_line({"object": "list", "data": data or None})))


def retrieve_model(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    name = params["model"]
    model = fake.find_model(name)
    if model is None:
        raise ApiError(404, f"model '{name}' not found")
    exchange.reply(Reply(200, CT_JSON, go_json_line(_model_object(name, model.modified_at))))


def _model_object(name: str, modified_at: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(modified_at),
            "owned_by": model_namespace(name)}


def transcriptions(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """A multipart upload answered with generated text (C{{"text": ...}})."""
    form: dict[bytes, list[bytes]] = exchange.request.args
    name = b"".join(form.get(b"model", [])[:1]).decode("utf-8", "replace")
    if not name:
        raise ApiError(400, "model is required", early=True)
    if not form.get(b"file"):
        raise ApiError(400, "file is required", early=True)
    model, _ = fake.check_generation("chat", name, None)
    armed = fake.admit()
    plan = fake.plan(["transcribe this audio"], None, False)
    text = plan.text()
    if form.get(b"response_format", [b"json"])[0] == b"text":
        reply = Reply(200, CT_TEXT_UTF8, text.encode("utf-8"))
    else:
        reply = Reply(200, CT_JSON, go_json_line({"text": text}))
    encoder = SingleReplyEncoder(reply, _openai_runner_error)
    fake.run_job(exchange, Job(encoder, plan.steps, model.name), armed)


def _openai_runner_error(status: int, message: str) -> Reply:
    return openai_error(ApiError(status, message))


# ---------------------------------------------------------------------------
# /v1/responses

_RESPONSES_FIELDS = {"model": "string", "instructions": "string", "max_output_tokens": "int",
                     "stream": "bool", "reasoning": "openai.ResponsesReasoning",
                     "temperature": "float64", "top_p": "float64", "tools": "[]openai.ResponsesTool",
                     "truncation": "string", "background": "bool"}


def responses(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """The Responses API on a native chat.  (zstd bodies are refused: no decoder here.)"""
    if exchange.header(b"content-encoding") == "zstd":
        raise ApiError(400, "failed to decompress zstd body", early=True)
    request = _decode(exchange, "openai.ResponsesRequest", _RESPONSES_FIELDS)
    texts = _responses_texts(request)
    think = _effort((request.get("reasoning") or {}).get("effort"))
    name = request.get("model") or ""
    model, thinking = fake.check_generation("chat", name, think, tools=bool(request.get("tools")))
    armed = fake.admit(generating=bool(texts))
    plan = fake.plan(texts, _first_int(request, "max_output_tokens"), thinking) if texts \
        else GenerationPlan.load_only()
    serial = fake.next_serial()
    encoder = _ResponsesEncoder(plan, name, serial, fake.clock.seconds, request,
                                request.get("stream") is True)
    if not texts:
        answer_at_once(exchange, encoder, plan.steps)
        return
    fake.run_job(exchange, Job(encoder, plan.steps, model.name), armed)


def _responses_texts(request: dict[str, Any]) -> list[str]:
    """The message texts of C{instructions} and C{input}, as Ollama converts them."""
    texts = [request["instructions"]] if request.get("instructions") else []
    value = request.get("input")
    if isinstance(value, str):
        texts += [value] if value else []
    elif isinstance(value, list):
        for index, item in enumerate(value):
            texts += _responses_item_texts(index, item)
    elif value is not None:
        raise ApiError(400, "input must be a string or array: json: cannot unmarshal "
                            f"{_go_type_name(value)} into Go value of type []json.RawMessage",
                       early=True)
    return texts


def _responses_item_texts(index: int, item: object) -> list[str]:
    if not isinstance(item, dict):
        raise ApiError(400, f"input[{index}]: invalid input item", early=True)
    kind = item.get("type") or ("message" if item.get("role") else "")
    if kind == "message":
        return [_responses_content_text(index, item.get("content"))]
    if kind == "function_call_output":
        output = item.get("output")
        return [output if isinstance(output, str) else _responses_content_text(index, output)]
    if kind in ("function_call", "reasoning"):
        return []
    if not kind:
        raise ApiError(400, f"input[{index}]: input item missing required 'type' field", early=True)
    raise ApiError(400, f'input[{index}]: unknown input item type: "{kind}"', early=True)


def _responses_content_text(index: int, content: object) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ApiError(400, f"input[{index}]: content must be a string or array", early=True)
    texts = []
    for part_index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            texts.append(str(part.get("text") or ""))  # type: ignore[union-attr]
        elif kind == "input_file":
            raise ApiError(400, "file inputs are not currently supported", early=True)
        elif kind != "input_image":
            raise ApiError(400, f"input[{index}]: content[{part_index}]: unknown content type: {kind}",
                           early=True)
    return "".join(texts)


class _ResponsesEncoder(_V1Encoder):
    """
    Ollama's C{ResponsesStreamConverter}: C{event:} framed events whose
    payloads are Go maps (so their keys come out sorted).
    """

    stream_headers = _SSE_HEADERS

    def __init__(self, plan: GenerationPlan, model: str, serial: int, now: Callable[[], float],
                 request: dict[str, Any], stream: bool) -> None:
        super().__init__(plan, model, stream)
        self._now, self._request = now, request
        self._id, self._item_id, self._reasoning_id = f"resp_{serial}", f"msg_{serial}", f"rs_{serial}"
        self._sequence = self._output_index = 0
        self._reasoning_open = self._reasoning_done = self._content_open = False

    def frame(self, step: int) -> bytes:
        piece = self._plan.piece(step)
        events = []
        if step == 0:
            events += [self._emit(kind, response=self._response("in_progress", [], None))
                       for kind in ("response.created", "response.in_progress")]
        if piece.text:
            events += self._thinking(piece.text) if piece.thinking else self._text(piece.text)
        if self._last(step):
            events += self._completion()
        return b"".join(events)

    def body(self) -> Reply:
        response = self._response("completed", self._output(), self._usage(), completed=True)
        return Reply(200, CT_JSON, go_json_line(response))

    def _emit(self, kind: str, **data: Any) -> bytes:
        payload = {**data, "type": kind, "sequence_number": self._sequence}
        self._sequence += 1
        return _event(kind, payload, go_map=True)

    def _thinking(self, text: str) -> list[bytes]:
        events = []
        if not self._reasoning_open:
            self._reasoning_open = True
            item = {"id": self._reasoning_id, "type": "reasoning", "summary": []}
            events.append(self._emit("response.output_item.added",
                                     output_index=self._output_index, item=item))
        events.append(self._emit("response.reasoning_summary_text.delta", item_id=self._reasoning_id,
                                  output_index=self._output_index, summary_index=0, delta=text))
        return events

    def _finish_reasoning(self) -> list[bytes]:
        if not self._reasoning_open or self._reasoning_done:
            return []
        self._reasoning_done = True
        thinking = self._plan.text(thinking=True)
        events = [
            self._emit("response.reasoning_summary_text.done", item_id=self._reasoning_id,
                        output_index=self._output_index, summary_index=0, text=thinking),
            self._emit("response.output_item.done", output_index=self._output_index,
                        item=self._reasoning_item()),
        ]
        self._output_index += 1
        return events

    def _text(self, text: str) -> list[bytes]:
        events = self._finish_reasoning()
        if not self._content_open:
            self._content_open = True
            item = {"id": self._item_id, "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
            events += [self._emit("response.output_item.added",
                                  output_index=self._output_index, item=item),
                       self._emit("response.content_part.added", item_id=self._item_id,
                                   output_index=self._output_index, content_index=0,
                                   part=self._text_part(""))]
        events.append(self._emit("response.output_text.delta", item_id=self._item_id,
                                 output_index=self._output_index, content_index=0, delta=text,
                                 logprobs=[]))
        return events

    def _completion(self) -> list[bytes]:
        events = self._finish_reasoning()
        if self._content_open:
            text = self._plan.text()
            where = {"item_id": self._item_id, "output_index": self._output_index, "content_index": 0}
            events += [self._emit("response.output_text.done", **where, text=text, logprobs=[]),
                       self._emit("response.content_part.done", **where, part=self._text_part(text)),
                       self._emit("response.output_item.done", output_index=self._output_index,
                                   item=self._message_item())]
        output = ([self._reasoning_item()] if self._reasoning_open else []) + (
            [self._message_item()] if self._content_open else [])
        final = self._response("completed", output, self._usage(), completed=True)
        events.append(self._emit("response.completed", response=final))
        return events

    def _output(self) -> list[dict[str, Any]]:
        reasoning = [self._reasoning_item()] if self._plan.text(thinking=True) else []
        return reasoning + [self._message_item()]

    def _reasoning_item(self) -> dict[str, Any]:
        thinking = self._plan.text(thinking=True)
        return {"id": self._reasoning_id, "type": "reasoning",
                "summary": [{"type": "summary_text", "text": thinking}], "encrypted_content": thinking}

    def _message_item(self) -> dict[str, Any]:
        return {"id": self._item_id, "type": "message", "status": "completed", "role": "assistant",
                "content": [self._text_part(self._plan.text())]}

    @staticmethod
    def _text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _usage(self) -> dict[str, Any]:
        usage = _usage(self._plan)
        return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}}

    def _response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                  completed: bool = False) -> dict[str, Any]:
        request, now = self._request, int(self._now())
        effort = (request.get("reasoning") or {}).get("effort")
        summary = (request.get("reasoning") or {}).get("summary")
        reasoning = {"effort": effort, "summary": summary} if effort or summary else None
        return {
            "id": self._id, "object": "response", "created_at": now,
            "completed_at": now if completed else None, "status": status, "incomplete_details": None,
            "model": self._model, "previous_response_id": None,
            "instructions": request.get("instructions") or None, "output": output, "error": None,
            "tools": request.get("tools") or [], "tool_choice": "auto",
            "truncation": request.get("truncation") or "disabled", "parallel_tool_calls": True,
            "text": {"format": {"type": "text"}}, "top_p": request.get("top_p", 1.0),
            "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
            "temperature": request.get("temperature", 1.0), "reasoning": reasoning, "usage": usage,
            "max_output_tokens": request.get("max_output_tokens"), "max_tool_calls": None,
            "store": False, "background": bool(request.get("background")), "service_tier": "default",
            "metadata": {}, "safety_identifier": None, "prompt_cache_key": None,
        }


# ---------------------------------------------------------------------------
# /v1/messages (Anthropic)

_MESSAGES_FIELDS = {"model": "string", "max_tokens": "int", "messages": "[]anthropic.MessageParam",
                    "stream": "bool", "thinking": "anthropic.ThinkingConfig",
                    "tools": "[]anthropic.Tool", "stop_sequences": "[]string"}


def messages(fake: FakeOllama, exchange: Exchange, params: Params) -> None:
    """Anthropic's Messages API on a native chat; C{max_tokens} is the token count."""
    request = _decode(exchange, "anthropic.MessagesRequest", _MESSAGES_FIELDS)
    name = request.get("model") or ""
    if not name:
        raise ApiError(400, "model is required", early=True)
    max_tokens = request.get("max_tokens") or 0
    if max_tokens <= 0:
        raise ApiError(400, "max_tokens is required and must be positive", early=True)
    conversation = request.get("messages") or []
    if not conversation:
        raise ApiError(400, "messages is required", early=True)
    texts = [_system_text(request.get("system"))] + [_anthropic_message_text(m) for m in conversation]
    stream = request.get("stream") is True
    think = True if (request.get("thinking") or {}).get("type") == "enabled" else None
    try:
        model, thinking = fake.check_generation("chat", name, think, tools=bool(request.get("tools")),
                                                relax_thinking=True)
        armed = fake.admit()
    except ApiError as error:  # the middleware already set the stream headers
        exchange.reply(_with_headers(anthropic_error(error), _SSE_HEADERS if stream else ()))
        return
    plan = fake.plan(texts, max_tokens, thinking)
    encoder = _AnthropicEncoder(plan, name, f"msg_{fake.next_serial():024x}",
                                _estimate_tokens(request), stream)
    fake.run_job(exchange, Job(encoder, plan.steps, model.name), armed)


class _AnthropicEncoder(_V1Encoder):
    """Ollama's Anthropic C{StreamConverter}: message, content blocks, delta, stop."""

    stream_headers = _SSE_HEADERS

    def __init__(self, plan: GenerationPlan, model: str, message_id: str, estimated_input: int,
                 stream: bool) -> None:
        super().__init__(plan, model, stream)
        self._id, self._estimated_input = message_id, estimated_input
        self._index = 0
        self._open: str | None = None

    def frame(self, step: int) -> bytes:
        piece = self._plan.piece(step)
        events = []
        if step == 0:
            usage = {"input_tokens": self._estimated_input, "output_tokens": 0}
            message = {**self._message([]), "usage": usage}
            events.append(_event("message_start", {"type": "message_start", "message": message}))
        if piece.text:
            events += self._delta(piece)
        if self._last(step):
            events += self._close_block()
            usage = {"input_tokens": self._plan.metrics.prompt_eval_count,
                     "output_tokens": self._plan.metrics.eval_count}
            delta = {"type": "message_delta", "delta": {"stop_reason": self._stop_reason()},
                     "usage": usage}
            events += [_event("message_delta", delta),
                       _event("message_stop", {"type": "message_stop"})]
        return b"".join(events)

    def body(self) -> Reply:
        content = []
        if self._plan.text(thinking=True):
            content.append({"type": "thinking", "thinking": self._plan.text(thinking=True)})
        if self._plan.text():
            content.append({"type": "text", "text": self._plan.text()})
        response = {**self._message(content), "stop_reason": self._stop_reason(),
                    "usage": {"input_tokens": self._plan.metrics.prompt_eval_count,
                              "output_tokens": self._plan.metrics.eval_count}}
        return Reply(200, CT_JSON, go_json_line(response))

    def runner_error(self, status: int, message: str) -> Reply:
        headers = _SSE_HEADERS if self.stream else ()
        return _with_headers(anthropic_error(ApiError(status, message)), headers)

    def _message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self._id, "type": "message", "role": "assistant", "model": self._model,
                "content": content}

    def _stop_reason(self) -> str:
        return _STOP_REASONS.get(self._plan.done_reason, "stop_sequence")

    def _delta(self, piece: Piece) -> list[bytes]:
        kind = "thinking" if piece.thinking else "text"
        events = []
        if self._open != kind:
            events += self._close_block()
            self._open = kind
            block_start = {"type": "content_block_start", "index": self._index,
                           "content_block": {"type": kind, kind: ""}}
            events.append(_event("content_block_start", block_start))
        delta = {"type": f"{kind}_delta", kind: piece.text}
        events.append(_event("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                      "delta": delta}))
        return events

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        stop = _event("content_block_stop", {"type": "content_block_stop", "index": self._index})
        self._index += 1
        return [stop]


def _system_text(system: object) -> str:
    if isinstance(system, list):
        return "".join(str(block.get("text") or "") for block in system
                       if isinstance(block, dict) and block.get("type") == "text")
    return system if isinstance(system, str) else ""


def _anthropic_message_text(message: object) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"invalid message content type: {_go_type_name(content)}", early=True)
    texts = []
    for block in content:
        if not isinstance(block, dict):
            raise ApiError(400, "invalid content block format", early=True)
        source = block.get("source") if block.get("type") == "image" else None
        if isinstance(source, dict) and source.get("type") != "base64":
            raise ApiError(400, f"invalid image source type: {source.get('type')}. "
                                "Only base64 images are supported.", early=True)
        if block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
    return "".join(texts)


def _estimate_tokens(request: dict[str, Any]) -> int:
    """Ollama's rough C{message_start} estimate: characters / 4, at least 1."""
    characters = len(_system_text(request.get("system")))
    for message in request.get("messages") or []:
        characters += len(str(message.get("role") or "")) + len(_anthropic_message_text(message))
    return max(characters // 4, 1)
