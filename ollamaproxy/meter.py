"""
Reading the metrics out of an upstream response while it streams past.

A meter sees every body chunk on its way to the client.  It never holds a
whole response: NDJSON and SSE are cut into records only far enough to find
the few that can carry metrics or errors (a cheap substring test decides
which records are worth parsing), and single JSON documents go through an
incremental field extractor.

Only one meter changes bytes: the SSE meter in "strip" mode, which removes
the usage event the proxy asked for on the client's behalf (see
L{ollamaproxy.facts.USAGE_INJECTABLE}), so the client receives exactly the
bytes Ollama would have sent it.
"""

from __future__ import annotations

from typing import Any, Mapping

from .facts import parse_object
from .jsonfields import TopLevelFields
from .record import ERROR_MESSAGE_LIMIT, RequestRecord

# Longest NDJSON line or SSE event the meters will hold to parse it; the
# bytes are forwarded regardless, only their metrics are given up.
RECORD_LIMIT = 16 * 1024 * 1024

# The routes whose successful responses report tokens, durations or
# mid-stream errors.  Anything else is read only when it is an error.
METERED_PATHS = frozenset(
    {
        b"/api/generate",
        b"/api/chat",
        b"/api/embed",
        b"/api/embeddings",
        b"/api/pull",
        b"/api/push",
        b"/api/create",
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/embeddings",
        b"/v1/responses",
        b"/v1/messages",
    }
)

# JSON replies up to this size, with a Content-Length, are parsed whole.
SMALL_DOCUMENT = 64 * 1024

_NATIVE_METRICS = (
    "error",
    "done",
    "done_reason",
    "prompt_eval_count",
    "eval_count",
    "load_duration",
    "prompt_eval_duration",
    "eval_duration",
)
_JSON_FIELDS = frozenset(_NATIVE_METRICS) | {"usage", "choices", "stop_reason", "type"}


class Meter:
    """
    The interface, and the meter for bodies with nothing to read.
    """

    alters_body = False

    def feed(self, data: bytes) -> bytes:
        """
        Take the next chunk of the body; return the bytes to send on.
        """
        return data

    def end(self) -> bytes:
        """
        The body ended cleanly; return any bytes still held back.
        """
        return b""


def meter_for(
    record: RequestRecord,
    path: bytes,
    status: int,
    content_type: bytes,
    strip_usage: bool,
    length: int | None = None,
) -> Meter:
    """
    The meter for a response to C{path} with this status, content type and
    length (L{None} when not announced).
    """
    if status < 400 and path not in METERED_PATHS:
        # Listings, model details, version: nothing in them for the log.
        return Meter()
    kind = content_type.split(b";", 1)[0].strip().lower()
    if kind == b"application/x-ndjson":
        return NdjsonMeter(record)
    if kind == b"text/event-stream":
        return SseMeter(record, path, strip_usage)
    if kind == b"application/json":
        return JsonMeter(record, length)
    if status >= 400:
        return ErrorTextMeter(record)
    return Meter()


class _Records:
    """
    Cuts a byte stream into records ending in C{separator}, holding only the
    unfinished last one, and at most L{RECORD_LIMIT} bytes of it.

    A longer record is given up on: its bytes are dropped from the hold (or,
    with C{keep_spill}, handed back through L{take_spill}) and the rest of it
    is skipped up to the next separator.
    """

    def __init__(self, separator: bytes, keep_spill: bool = False) -> None:
        self._separator = separator
        self._held: list[bytes] = []
        self._held_size = 0
        self._overflowed = False
        self._spill: list[bytes] | None = [] if keep_spill else None
        self._tail = b""

    def complete(self, data: bytes) -> bytes:
        """
        The records that C{data} completes, joined, with their separators.
        """
        separator = self._separator
        width = len(separator)
        # A separator may begin in the previous chunk and end in this one.
        boundary = -1
        if self._tail:
            found = (self._tail + data[: width - 1]).find(separator)
            if found >= 0:
                boundary = found + width - len(self._tail)
        last = data.rfind(separator)
        end = last + width if last >= 0 else boundary
        if end < 0:
            self._tail = (self._tail + data)[1 - width :] if width > 1 else b""
            self._hold(data)
            return b""
        self._tail = data[end:][1 - width :] if width > 1 else b""
        if self._overflowed:
            # The first record here is the tail of one too long to keep.
            self._overflowed = False
            first = boundary if boundary >= 0 else data.find(separator) + width
            if self._spill is not None:
                self._spill.append(data[:first])
            done = data[first:end]
        elif self._held:
            done = b"".join(self._held) + data[:end]
            self._held, self._held_size = [], 0
        else:
            done = data[:end]
        self._hold(data[end:])
        return done

    def rest(self) -> bytes:
        rest = b"" if self._overflowed else b"".join(self._held)
        self._held, self._held_size = [], 0
        return rest

    def take_spill(self) -> bytes:
        """
        The bytes given up on since the last call (only with C{keep_spill}).
        """
        if not self._spill:
            return b""
        spill = b"".join(self._spill)
        self._spill = []
        return spill

    def _hold(self, data: bytes) -> None:
        if not data:
            return
        if self._overflowed:
            if self._spill is not None:
                self._spill.append(data)
            return
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size > RECORD_LIMIT:
            if self._spill is not None:
                self._spill.extend(self._held)
            self._held, self._held_size, self._overflowed = [], 0, True


class NdjsonMeter(Meter):
    """
    Native streams: metrics sit on the final C{"done":true} line, errors on
    an C{"error"} line.  Go escapes quotes inside strings, so those byte
    patterns cannot occur inside generated text.
    """

    def __init__(self, record: RequestRecord) -> None:
        self._record = record
        self._lines = _Records(b"\n")

    def feed(self, data: bytes) -> bytes:
        lines = self._lines.complete(data)
        if b'"done":true' in lines or b'"error"' in lines:
            for line in lines.split(b"\n"):
                self._read(line)
        return data

    def end(self) -> bytes:
        self._read(self._lines.rest())
        return b""

    def _read(self, line: bytes) -> None:
        if b'"done":true' in line or b'"error"' in line:
            message = parse_object(line)
            if message is not None:
                apply_native(self._record, message)


class JsonMeter(Meter):
    """
    One JSON document (non-streamed replies, errors): pick the top-level
    members that carry metrics without keeping the rest (embeddings, model
    dumps, long completions).
    """

    def __init__(self, record: RequestRecord, length: int | None) -> None:
        self._record = record
        # A small document with a known length is cheaper to parse whole.
        self._pieces: list[bytes] | None = None
        self._fields: TopLevelFields | None = None
        if length is not None and length <= SMALL_DOCUMENT:
            self._pieces = []
        else:
            self._fields = TopLevelFields(_JSON_FIELDS)

    def feed(self, data: bytes) -> bytes:
        if self._pieces is not None:
            self._pieces.append(data)
        elif self._fields is not None and not self._fields.failed:
            self._fields.feed(data)
        return data

    def end(self) -> bytes:
        if self._pieces is not None:
            fields = parse_object(b"".join(self._pieces))
        else:
            assert self._fields is not None
            self._fields.close()
            fields = self._fields.fields if self._fields.complete else None
        if fields is not None:
            apply_native(self._record, fields)
            apply_usage(self._record, fields.get("usage"))
            apply_error(self._record, fields.get("error"))
            _apply_finish_reason(self._record, fields)
        return b""


class ErrorTextMeter(Meter):
    """
    A non-JSON error body (Go's plain-text C{404 page not found}): its first
    bytes are the error message.
    """

    def __init__(self, record: RequestRecord) -> None:
        self._record = record
        self._text = b""

    def feed(self, data: bytes) -> bytes:
        if len(self._text) < ERROR_MESSAGE_LIMIT:
            self._text += data[: ERROR_MESSAGE_LIMIT - len(self._text)]
        return data

    def end(self) -> bytes:
        text = self._text.decode("utf-8", "replace").strip()
        if text:
            self._record.fail(text)
        return b""


class SseMeter(Meter):
    """
    C{/v1} streams (OpenAI, Responses, Anthropic): server-sent events, each
    ending in a blank line.

    With C{strip_usage}, the usage event that the proxy requested for the
    client is read and then dropped, so only whole events are sent on and the
    unfinished tail of the stream is held back.  Ollama flushes whole events,
    so in practice nothing waits.
    """

    def __init__(self, record: RequestRecord, path: bytes, strip_usage: bool) -> None:
        self._record = record
        self._events = _Records(b"\n\n", keep_spill=strip_usage)
        self._strip = strip_usage
        self.alters_body = strip_usage
        self._needs_done = path in (b"/v1/chat/completions", b"/v1/completions")
        self._saw_done = False

    def feed(self, data: bytes) -> bytes:
        events = self._events.complete(data)
        if not self._strip:
            if events and _worth_reading(events):
                for event in events.split(b"\n\n"):
                    self._read(event)
            return data
        kept = self._without_usage_event(events)
        spill = self._events.take_spill()
        if spill:
            # An event too long to hold cannot be the small usage event: stop
            # stripping and let everything through from here on.
            self._strip = False
            return kept + spill
        return kept

    def end(self) -> bytes:
        rest = self._events.rest()
        dropped = bool(rest) and self._read(rest)
        if self._needs_done and not self._saw_done:
            self._record.fail(
                "stream ended without [DONE] (Ollama drops mid-stream error text on /v1)"
            )
        if self._strip and not dropped:
            return rest
        return b""

    def _without_usage_event(self, events: bytes) -> bytes:
        if not _worth_reading(events):
            return events
        kept = [event + b"\n\n" for event in events.split(b"\n\n")[:-1] if not self._read(event)]
        return b"".join(kept)

    def _read(self, event: bytes) -> bool:
        """
        Take what C{event} reports; return whether it is the injected usage
        event that must not reach the client.
        """
        if not _worth_reading(event):
            return False
        name = b""
        data = b""
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].strip()
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        if data == b"[DONE]":
            self._saw_done = True
            return False
        message = parse_object(data)
        if message is None:
            return False
        is_usage_event = "usage" in message and message.get("choices") == []
        _apply_event(self._record, name, message)
        return self._strip and is_usage_event


def _worth_reading(events: bytes) -> bool:
    return (
        b'"usage"' in events
        or b'"finish_reason":"' in events
        or b"[DONE]" in events
        or b'"error"' in events
        or b'"stop_reason":"' in events
    )


def _apply_event(record: RequestRecord, name: bytes, message: Mapping[str, Any]) -> None:
    if name in (b"response.completed", b"response.failed", b"response.incomplete"):
        response = message.get("response")
        if isinstance(response, dict):
            apply_usage(record, response.get("usage"))
            apply_error(record, response.get("error"))
        return
    if name == b"message_start":
        inner = message.get("message")
        if isinstance(inner, dict):
            apply_usage(record, inner.get("usage"))
        return
    apply_usage(record, message.get("usage"))
    apply_error(record, message.get("error"))
    delta = message.get("delta")
    if isinstance(delta, dict):
        _apply_finish_reason(record, delta)
    _apply_finish_reason(record, message)


def apply_native(record: RequestRecord, message: Mapping[str, Any]) -> None:
    """
    Take the metrics of a native final object (or an error line).
    """
    apply_error(record, message.get("error"))
    if message.get("done") is not True and "prompt_eval_count" not in message:
        return
    record.input_tokens = _count(message.get("prompt_eval_count"), record.input_tokens)
    record.output_tokens = _count(message.get("eval_count"), record.output_tokens)
    record.ollama_load_ns = _count(message.get("load_duration"), record.ollama_load_ns)
    record.ollama_prompt_eval_ns = _count(
        message.get("prompt_eval_duration"), record.ollama_prompt_eval_ns
    )
    record.ollama_eval_ns = _count(message.get("eval_duration"), record.ollama_eval_ns)
    reason = message.get("done_reason")
    if isinstance(reason, str):
        record.done_reason = reason


def apply_usage(record: RequestRecord, usage: object) -> None:
    """
    Take an OpenAI (C{prompt_tokens}/C{completion_tokens}) or Responses and
    Anthropic (C{input_tokens}/C{output_tokens}) usage object.
    """
    if not isinstance(usage, dict):
        return
    record.input_tokens = _count(
        usage.get("prompt_tokens", usage.get("input_tokens")), record.input_tokens
    )
    record.output_tokens = _count(
        usage.get("completion_tokens", usage.get("output_tokens")), record.output_tokens
    )


def apply_error(record: RequestRecord, error: object) -> None:
    """
    Take Ollama's C{"error": "text"} or the C{/v1} C{"error": {"message": ...}}.
    """
    if isinstance(error, dict):
        error = error.get("message")
    if isinstance(error, str) and error:
        record.fail(error)


def _apply_finish_reason(record: RequestRecord, message: Mapping[str, Any]) -> None:
    for key in ("finish_reason", "stop_reason"):
        reason = message.get(key)
        if isinstance(reason, str) and reason:
            record.done_reason = reason
            return
    choices = message.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        if isinstance(reason, str) and reason:
            record.done_reason = reason


def _count(value: object, default: int | None) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default
