"""
Building blocks shared by the fake Ollama's router (L{fake_ollama}), its
native API (L{fake_native}) and its /v1 layers (L{fake_openai}):
Go-flavoured JSON in and out, the installed models and the deterministic
"model" (tokens, metrics, embeddings), the Host check, and L{Exchange}, the
one place that writes to a Twisted request.

Nothing here touches a reactor: time comes from an injected
L{IReactorTime}.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from twisted.web.server import Request

CT_JSON_UTF8 = b"application/json; charset=utf-8"
"""What gin's C{c.JSON} sends."""
CT_JSON = b"application/json"
"""What C{json.NewEncoder}-based writers and pre-stream errors send."""
CT_NDJSON = b"application/x-ndjson"
CT_SSE = b"text/event-stream"
CT_TEXT_UTF8 = b"text/plain; charset=utf-8"
CT_TEXT = b"text/plain"
CT_HTML_UTF8 = b"text/html; charset=utf-8"

QUEUE_FULL_MESSAGE = (
    "server busy, please try again.  maximum pending requests exceeded"
)


# ---------------------------------------------------------------------------
# Errors and replies


class ApiError(Exception):
    """
    A request that Ollama answers with an error status before streaming.

    @ivar early: C{True} when a /v1 middleware (not the native handler)
        rejected the request; those replies use gin's C{c.JSON} framing.
    """

    def __init__(self, status: int, message: str, *, early: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.early = early


@dataclass(frozen=True)
class Reply:
    """A complete, non-streamed HTTP answer."""

    status: int
    content_type: bytes | None
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


def native_error(status: int, message: str, content_type: bytes = CT_JSON_UTF8) -> Reply:
    """Ollama's C{{"error": "..."}} body, as gin's C{c.JSON} writes it."""
    return Reply(status, content_type, go_json({"error": message}))


# ---------------------------------------------------------------------------
# JSON, the way Go writes and reads it

_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
               "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")


def go_json(value: object, *, go_map: bool = False) -> bytes:
    """
    Encode like Go's C{json.Marshal}: compact, UTF-8, HTML characters
    escaped.  (Those characters only ever occur inside JSON strings, so a
    plain substitution is safe.)

    @param go_map: the value is a Go C{map}, whose keys Go sorts.
    """
    text = json.dumps(_go_numbers(value), separators=(",", ":"), ensure_ascii=False, sort_keys=go_map)
    return _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group()], text).encode("utf-8")


def _go_numbers(value: object) -> object:
    """Integral floats become ints: Go prints C{1.0} as C{1}."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {key: _go_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_go_numbers(item) for item in value]
    return value


def go_json_line(value: object) -> bytes:
    """Encode like Go's C{json.NewEncoder(w).Encode}: with a newline."""
    return go_json(value) + b"\n"


_JSON_KIND_OF_GO_TYPE = (
    ("[]", "array"), ("map[", "object"), ("api.Tools", "array"),
    ("string", "string"), ("bool", "bool"), ("int", "number"), ("float", "number"),
)
"""Go type prefix -> the JSON kind it accepts; any other dotted name is a struct."""


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _kind_for_go_type(go_type: str) -> str:
    for prefix, kind in _JSON_KIND_OF_GO_TYPE:
        if go_type.startswith(prefix):
            return kind
    return "object"


def decode_request(
    body: bytes,
    go_type: str,
    fields: Mapping[str, str],
    *,
    empty_message: str = "missing request body",
    early: bool = False,
) -> dict[str, Any]:
    """
    Parse a request body as gin's C{ShouldBindJSON} would into C{go_type}.

    Only the first JSON value is read (trailing bytes are ignored, like
    C{json.Decoder}); syntax errors and top-level field type mismatches get
    Go's wording.

    @param fields: JSON field name to Go type, for the fields worth checking.
    @raise ApiError: 400 with Go's message.
    """
    text = body.decode("utf-8", errors="replace").lstrip(" \t\r\n")
    if not text:
        raise ApiError(400, empty_message, early=early)
    try:
        value, _ = json.JSONDecoder(parse_constant=_reject_constant).raw_decode(text)
    except json.JSONDecodeError as error:
        raise ApiError(400, _go_syntax_message(text, error), early=early) from None
    except RecursionError:
        # Go's decoder nests 10000 deep, Python's far less: past either
        # limit, answer what Go answers past its own.
        raise ApiError(400, "exceeded max depth", early=early) from None
    if value is None:
        return {}
    struct_name = go_type.rsplit(".", 1)[-1]
    if not isinstance(value, dict):
        raise ApiError(
            400,
            f"json: cannot unmarshal {_json_kind(value)} into Go value of type {go_type}",
            early=early,
        )
    for name, field_type in fields.items():
        item = value.get(name)
        if item is not None and _kind_for_go_type(field_type) != _json_kind(item):
            wrong_type = unmarshal_message(item, f"{struct_name}.{name}", field_type)
            raise ApiError(400, wrong_type, early=early)
    return value


def unmarshal_message(value: object, field_path: str, go_type: str) -> str:
    """Go's type-mismatch message for one struct field."""
    return (
        f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
        f"{field_path} of type {go_type}"
    )


def _reject_constant(name: str) -> object:
    raise json.JSONDecodeError("Expecting value", name, 0)


_SYNTAX_CONTEXT = {
    "Expecting value": "looking for beginning of value",
    "Expecting property name enclosed in double quotes": "looking for beginning of object key string",
    "Expecting ':' delimiter": "after object key",
    "Invalid control character at": "in string literal",
    "Invalid \\escape": "in string escape code",
    "Invalid \\uXXXX escape": "in \\u hexadecimal character escape",
}


def _go_syntax_message(text: str, error: json.JSONDecodeError) -> str:
    """Translate Python's JSON syntax error into Go's C{encoding/json} text."""
    if error.doc != text:  # raised by _reject_constant (NaN, Infinity)
        return f"invalid character {_go_quote_char(error.doc[0])} looking for beginning of value"
    if error.pos >= len(text) or error.msg.startswith("Unterminated string"):
        return "unexpected EOF"
    context = _SYNTAX_CONTEXT.get(error.msg)
    if context is None:  # "Expecting ',' delimiter"
        container = _innermost_container(text, error.pos)
        context = "after array element" if container == "[" else "after object key:value pair"
    return f"invalid character {_go_quote_char(text[error.pos])} {context}"


def _go_quote_char(char: str) -> str:
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    return "'" + json.dumps(char)[1:-1] + "'"


def _innermost_container(text: str, end: int) -> str | None:
    """The bracket (C{{} or C{[}) that is open at C{text[end]}."""
    stack: list[str] = []
    in_string = escaped = False
    for char in text[:end]:
        if in_string:
            escaped = char == "\\" and not escaped
            in_string = escaped or char != '"'
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else None


def to_float32(value: float) -> float:
    """Round a Python float to the nearest IEEE single."""
    result: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return result


def shortest_float32(value: float) -> float:
    """
    A float whose C{repr} is the shortest decimal that still reads back as
    the same float32, as Go prints a C{float32}.
    """
    single = to_float32(value)
    for digits in range(1, 10):
        candidate = float(f"{single:.{digits}g}")
        if to_float32(candidate) == single:
            return candidate
    return single


def float32_base64(values: Sequence[float]) -> str:
    """Little-endian float32 bytes, base64: OpenAI's C{encoding_format=base64}."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


# ---------------------------------------------------------------------------
# Time

def rfc3339_nano(seconds: float) -> str:
    """Format like Go's C{time.Time} JSON in UTC: trailing zeros trimmed."""
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    stamp = datetime.fromtimestamp(whole, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if micros:
        stamp += "." + f"{micros:06d}".rstrip("0")
    return stamp + "Z"


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3,
                   "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_keep_alive(value: object) -> float | None:
    """
    Read C{keep_alive} like Ollama's C{api.Duration}: seconds as a number, or
    a Go duration string.  Negative means forever (C{math.inf}).

    @return: seconds, or L{None} when absent.
    @raise ApiError: 400 with Go's message for any other JSON type.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        go_name = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}
        raise ApiError(400, f"Unsupported type: '{go_name.get(type(value), 'unknown')}'")
    seconds = float(value) if not isinstance(value, str) else _parse_go_duration(value)
    return math.inf if seconds < 0 else seconds


def _parse_go_duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    rest = text.lstrip("+-")
    if rest == "0":
        return 0.0
    parts = _DURATION_PART.findall(rest)
    if not rest or "".join(number + unit for number, unit in parts) != rest:
        raise ApiError(400, f"time: invalid duration {json.dumps(text)}")
    return sign * sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


# ---------------------------------------------------------------------------
# Models and their names

def model_key(name: str) -> str:
    """
    Ollama's identity of a model name: case-insensitive, the default
    registry and namespace implied, C{:latest} when no tag is given.
    """
    key = name.strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        key = key.removeprefix(prefix)
    if ":" not in key.rsplit("/", 1)[-1]:
        key += ":latest"
    return key


def full_model_name(name: str) -> str:
    """C{llama3.2} -> C{registry.ollama.ai/library/llama3.2:latest}."""
    key = model_key(name)
    if key.count("/") == 0:
        key = "library/" + key
    if key.count("/") == 1:
        key = "registry.ollama.ai/" + key
    return key


def model_namespace(name: str) -> str:
    """The namespace OpenAI's C{owned_by} reports (C{library} by default)."""
    parts = full_model_name(name).split("/")
    return parts[1]


@dataclass(frozen=True)
class FakeModel:
    """
    A model the fake has "installed".

    @ivar name: as C{/api/tags} lists it, e.g. C{llama3.2:latest}.
    @ivar capabilities: Ollama's names: C{completion}, C{tools},
        C{thinking}, C{embedding}, C{vision}, C{insert}...
    @ivar modified_at: Unix seconds.
    @ivar embedding_length: the size of its embedding vectors.
    """

    name: str
    capabilities: tuple[str, ...] = ("completion", "tools")
    family: str = "llama"
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    size: int = 2_019_393_189
    modified_at: float = 1_759_320_000.0
    context_length: int = 131_072
    embedding_length: int = 8

    @property
    def digest(self) -> str:
        return hashlib.sha256(model_key(self.name).encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {"parent_model": "", "format": "gguf", "family": self.family,
                "families": [self.family], "parameter_size": self.parameter_size,
                "quantization_level": self.quantization_level}


DEFAULT_MODELS: tuple[FakeModel, ...] = (
    FakeModel("llama3.2:latest"),
    FakeModel("qwen3:latest", ("completion", "thinking", "tools"), family="qwen3",
              parameter_size="8.2B", size=5_225_388_164, modified_at=1_759_310_000.0,
              context_length=40_960),
    FakeModel("all-minilm:latest", ("embedding",), family="bert", parameter_size="23M",
              quantization_level="F16", size=45_960_996, modified_at=1_759_300_000.0,
              context_length=512),
)


# ---------------------------------------------------------------------------
# The deterministic "model"

ANSWER_WORDS: tuple[str, ...] = tuple(
    "The quick brown fox jumps over the lazy dog while the fake model keeps talking.".split(" ")
)
THINKING_WORDS: tuple[str, ...] = tuple("Let me think about this carefully first.".split(" "))
DEFAULT_TOKENS = 8
THINKING_TOKENS = 3
PROMPT_NS_PER_TOKEN = 1_000


@dataclass(frozen=True)
class Piece:
    """One generated token: answer text, or reasoning when C{thinking}."""

    text: str
    thinking: bool = False


@dataclass(frozen=True)
class Metrics:
    """Ollama's timing fields (integer nanoseconds) for one generation."""

    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int

    def fields(self) -> dict[str, int]:
        """The JSON fields, with zero values left out (Go's C{omitempty})."""
        return {name: value for name, value in vars(self).items() if value}


@dataclass(frozen=True)
class GenerationPlan:
    """What one generating request will produce, decided up front."""

    pieces: tuple[Piece, ...]
    prompt_words: tuple[str, ...]
    done_reason: str
    metrics: Metrics

    @classmethod
    def load_only(cls) -> GenerationPlan:
        """What an empty prompt produces: no tokens, C{done_reason} C{load}."""
        return cls((), (), "load", Metrics(0, 0, 0, 0, 0, 0))

    @property
    def steps(self) -> int:
        """Chunks on the wire: one per token, the last one being C{done}."""
        return max(len(self.pieces), 1)

    def piece(self, step: int) -> Piece:
        """The token a chunk carries (an empty one when nothing was generated)."""
        return self.pieces[step] if step < len(self.pieces) else Piece("")

    def text(self, *, thinking: bool = False) -> str:
        return "".join(p.text for p in self.pieces if p.thinking == thinking)

    def context(self) -> list[int]:
        """Token ids of prompt plus answer (generate's deprecated C{context})."""
        prompt = [token_id(word) for word in self.prompt_words] or [1]
        return prompt + [token_id(p.text) for p in self.pieces]


def words_of(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(word for text in texts for word in text.split())


def token_id(word: str) -> int:
    """A stable fake vocabulary id."""
    return zlib.crc32(word.encode("utf-8")) % 128_000 + 2


def plan_generation(
    prompt_texts: Iterable[str],
    *,
    limit: int | None,
    thinking: bool,
    token_delay: float,
    load_delay: float,
) -> GenerationPlan:
    """
    Decide the tokens and metrics of one generation.

    @param limit: the client's token limit (C{num_predict}, C{max_tokens}...);
        when given (and positive) exactly that many tokens are produced and
        C{done_reason} is C{length}, otherwise L{DEFAULT_TOKENS} and C{stop}.
    @param thinking: spend the first few tokens on reasoning text.
    """
    count = limit if limit is not None and limit > 0 else DEFAULT_TOKENS
    done_reason = "length" if limit is not None and limit > 0 else "stop"
    thinking_count = min(THINKING_TOKENS, count - 1) if thinking else 0
    pieces = tuple(
        Piece(_word_token(THINKING_WORDS, i), True) for i in range(thinking_count)
    ) + tuple(Piece(_word_token(ANSWER_WORDS, i)) for i in range(count - thinking_count))
    prompt_words = words_of(prompt_texts)
    return GenerationPlan(pieces, prompt_words, done_reason,
                          compute_metrics(max(len(prompt_words), 1), count, token_delay, load_delay))


def _word_token(words: Sequence[str], index: int) -> str:
    word = words[index % len(words)]
    return word if index == 0 else " " + word


def compute_metrics(prompt_tokens: int, eval_tokens: int, token_delay: float,
                    load_delay: float) -> Metrics:
    """
    Deterministic timings: the configured delays, never below 1 ns per token
    (so tokens per second is always defined), and a total that is exactly
    load + prompt evaluation + generation.
    """
    load = max(round(load_delay * 1e9), 1)
    prompt = prompt_tokens * PROMPT_NS_PER_TOKEN
    generation = max(round(eval_tokens * token_delay * 1e9), eval_tokens)
    return Metrics(load + prompt + generation, load, prompt_tokens, prompt, eval_tokens, generation)


def embedding_vector(text: str, size: int) -> list[float]:
    """A unit-length float32 vector derived from the text's hash."""
    seed = hashlib.sha256(text.encode("utf-8")).digest()
    while len(seed) < size:
        seed += hashlib.sha256(seed).digest()
    raw = [(byte - 127.5) / 127.5 for byte in seed[:size]]
    return normalize(raw)


def normalize(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [to_float32(v / norm) for v in vector]


# ---------------------------------------------------------------------------
# Host check (allowedHostsMiddleware)

# ---------------------------------------------------------------------------
# Writing to a request

class Exchange:
    """
    One request being answered.  All writes go through here, so nothing is
    written or finished after the client left or after we hung up.

    @ivar closed: the answer is complete, aborted, or the client is gone.
    @ivar body_sha256: hex digest of the request body.
    """

    def __init__(self, request: Request, body_sha256: str,
                 on_client_gone: Callable[[Exchange], None],
                 on_closed: Callable[[Exchange], None]) -> None:
        self.request = request
        self.body_sha256 = body_sha256
        self.closed = False
        self._on_client_gone = on_client_gone
        self._on_closed = on_closed
        self._close_listeners: list[Callable[[], None]] = []
        request.notifyFinish().addErrback(self._connection_lost)

    @property
    def method(self) -> bytes:
        method: bytes = self.request.method
        return method

    @property
    def uri(self) -> bytes:
        uri: bytes = self.request.uri
        return uri

    def header(self, name: bytes) -> str | None:
        value = self.request.getHeader(name)
        return None if value is None else value.decode("latin-1")

    def body(self) -> bytes:
        """The whole request body (Twisted has already buffered or spooled it)."""
        content = self.request.content
        content.seek(0)
        data: bytes = content.read()
        return data

    def when_closed(self, listener: Callable[[], None]) -> None:
        self._close_listeners.append(listener)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.request.write(data)

    def finish(self) -> None:
        if not self.closed:
            self.request.finish()
            self._close()

    def start_stream(self, content_type: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Set the headers of a chunked stream; they leave with the first write."""
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", content_type)
        for name, value in headers:
            self.request.setHeader(name, value)

    def reply(self, reply: Reply) -> None:
        """Send a whole answer in one write, with a C{Content-Length}."""
        if self.closed:
            return
        self.request.setResponseCode(reply.status)
        self.request.responseHeaders.removeHeader(b"content-type")
        if reply.content_type is not None:
            self.request.setHeader(b"content-type", reply.content_type)
        for name, value in reply.headers:
            self.request.setHeader(name, value)
        if reply.status not in (204, 304):
            self.request.setHeader(b"content-length", b"%d" % (len(reply.body),))
        self.request.write(reply.body)
        self.finish()

    def abort(self) -> None:
        """
        Cut the connection (our side hangs up, not the client).  Before
        anything was written, a reset.  After, a plain close once what was
        written has gone out, leaving the chunked body unterminated: a reset
        then could make the kernels drop chunks already sent, so how much a
        client got would depend on the machine's load.
        """
        if self.closed:
            return
        self._close()
        if self.request.startedWriting:
            self.request.transport.loseConnection()
        else:
            self.request.transport.abortConnection()

    def _connection_lost(self, reason: object) -> None:
        if not self.closed:
            self._close()
            self._on_client_gone(self)

    def _close(self) -> None:
        self.closed = True
        for listener in self._close_listeners:
            listener()
        self._on_closed(self)


class Encoder(Protocol):
    """How one generating endpoint frames its answer."""

    stream: bool
    stream_content_type: bytes
    stream_headers: tuple[tuple[bytes, bytes], ...]

    def frame(self, step: int) -> bytes:
        """The bytes of stream chunk C{step}; the last step ends the stream."""

    def body(self) -> Reply:
        """The single answer of a non-streamed request."""

    def midstream_error(self, message: str) -> bytes:
        """What a runner error looks like once the stream has begun."""

    def runner_error(self, status: int, message: str) -> Reply:
        """What a runner error looks like before the first byte."""


class SingleReplyEncoder:
    """An answer that is never streamed (embeddings, transcriptions)."""

    stream = False
    stream_content_type = CT_JSON
    stream_headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, reply: Reply, error_reply: Callable[[int, str], Reply]) -> None:
        self._reply = reply
        self._error_reply = error_reply

    def frame(self, step: int) -> bytes:
        return b""

    def body(self) -> Reply:
        return self._reply

    def midstream_error(self, message: str) -> bytes:
        return b""

    def runner_error(self, status: int, message: str) -> Reply:
        return self._error_reply(status, message)


def answer_at_once(exchange: Exchange, encoder: Encoder, steps: int) -> None:
    """Write a whole answer immediately, outside the clock (load replies)."""
    if encoder.stream:
        exchange.start_stream(encoder.stream_content_type, encoder.stream_headers)
        exchange.write(b"".join(encoder.frame(step) for step in range(steps)))
        exchange.finish()
    else:
        exchange.reply(encoder.body())


@dataclass
class Job:
    """
    A generating request, handed to the fake's streaming driver.

    @ivar steps: timed steps (stream chunks, or token times before a
        non-streamed answer).
    @ivar loads_model: the first step also waits C{load_delay}.
    @ivar on_success: run once the answer is complete.
    """

    encoder: Encoder
    steps: int
    model: str | None = None
    loads_model: bool = True
    keep_alive: float | None = None
    on_success: Callable[[], None] | None = None
