"""
What one proxied request leaves behind: a L{RequestRecord}, filled in while
the request runs and handed, once, to every L{RecordSink} when it ends.

The CSV columns are defined here, in order, and documented in
C{docs/csv-columns.md}.  The first 23 are the original tool's and must never
move; new columns are only ever appended.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Protocol

COLUMNS: tuple[str, ...] = (
    # The original tool's columns, in its order.
    "timestamp",
    "request_id",
    "ip_source",
    "user_agent",
    "http_method",
    "endpoint",
    "model",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "request_size_bytes",
    "response_size_bytes",
    "queue_time_ms",
    "processing_time_ms",
    "total_time_ms",
    "http_status",
    "error_message",
    "model_parameters",
    "stream_mode",
    "system_load_cpu",
    "system_load_memory",
    "concurrent_requests",
    "session_id",
    # Appended by ollamaproxy.
    "ttft_ms",
    "tokens_per_second",
    "ollama_load_ms",
    "ollama_prompt_eval_ms",
    "ollama_eval_ms",
    "done_reason",
    "api_key_name",
)

# Cells whose text comes from outside the proxy (a client or the upstream).
# The CSV writer guards them against spreadsheet formula injection; numeric
# cells are never touched.
OUTSIDE_TEXT_COLUMNS: frozenset[str] = frozenset(
    {
        "ip_source",
        "user_agent",
        "http_method",
        "endpoint",
        "model",
        "error_message",
        "model_parameters",
        "session_id",
        "done_reason",
        "api_key_name",
    }
)

ERROR_MESSAGE_LIMIT = 500


def new_request_id() -> str:
    """
    A random (version 4) UUID in its usual text form; formatting the hex
    directly costs a third of C{str(uuid.uuid4())}.
    """
    h = os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


@dataclass(slots=True)
class RequestRecord:
    """
    Everything the log needs to know about one request.

    Instants (C{arrived}, C{sent_upstream}, ...) are readings of a monotonic
    clock in seconds; C{arrived_wall} is the wall-clock time of arrival.
    C{None} means "did not happen" or "not reported" and becomes an empty
    cell, never 0.
    """

    request_id: str
    arrived_wall: float
    arrived: float
    ip_source: str = ""
    user_agent: str = ""
    http_method: str = ""
    endpoint: str = ""
    model: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    request_size_bytes: int = 0
    response_size_bytes: int = 0
    sent_upstream: float | None = None
    upstream_ended: float | None = None
    first_byte: float | None = None
    ended: float | None = None
    http_status: int | None = None
    error_message: str = ""
    model_parameters: str = ""
    stream_mode: bool | None = None
    system_load_cpu: float | None = None
    system_load_memory: float | None = None
    concurrent_requests: int = 0
    session_id: str = ""
    ollama_load_ns: int | None = None
    ollama_prompt_eval_ns: int | None = None
    ollama_eval_ns: int | None = None
    done_reason: str = ""
    api_key_name: str = ""

    def fail(self, message: str) -> None:
        """
        Remember the first error that explains this request's outcome.
        """
        if not self.error_message:
            self.error_message = message[:ERROR_MESSAGE_LIMIT]

    @property
    def total_tokens(self) -> int | None:
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)

    @property
    def tokens_per_second(self) -> float | None:
        if not self.output_tokens or not self.ollama_eval_ns:
            return None
        return self.output_tokens / self.ollama_eval_ns * 1e9

    def cells(self) -> list[str]:
        """
        This record as CSV cells, in L{COLUMNS} order.
        """
        arrived, ended, sent = self.arrived, self.ended, self.sent_upstream
        if sent is None:
            # Never sent upstream (refused, rejected, or left while queued):
            # the whole life of the request was spent before the upstream.
            queue_time = _between(arrived, ended)
            processing_time = ""
        else:
            queue_time = _between(arrived, sent)
            upstream_ended = self.upstream_ended
            processing_time = _between(sent, ended if upstream_ended is None else upstream_ended)
        stream_mode = self.stream_mode
        return [
            _timestamp(self.arrived_wall),
            self.request_id,
            self.ip_source,
            self.user_agent,
            self.http_method,
            self.endpoint,
            self.model,
            _int(self.input_tokens),
            _int(self.output_tokens),
            _int(self.total_tokens),
            str(self.request_size_bytes),
            str(self.response_size_bytes),
            queue_time,
            processing_time,
            _between(arrived, ended),
            _int(self.http_status),
            self.error_message,
            self.model_parameters,
            "" if stream_mode is None else ("true" if stream_mode else "false"),
            _decimal(self.system_load_cpu, 1),
            _decimal(self.system_load_memory, 1),
            str(self.concurrent_requests),
            self.session_id,
            _between(arrived, self.first_byte),
            _decimal(self.tokens_per_second, 2),
            _nanoseconds(self.ollama_load_ns),
            _nanoseconds(self.ollama_prompt_eval_ns),
            _nanoseconds(self.ollama_eval_ns),
            self.done_reason,
            self.api_key_name,
        ]


class RecordSink(Protocol):
    """
    Something that wants every finished request: the CSV log, the metrics.
    """

    def request_finished(self, record: RequestRecord) -> None:
        """
        Called exactly once per request, on the reactor thread; must not raise.
        """


def _between(start: float, end: float | None) -> str:
    """
    Milliseconds from C{start} to C{end} (seconds), never negative; empty
    when C{end} never happened.
    """
    if end is None:
        return ""
    return f"{max(0.0, end - start) * 1000:.3f}"


def _nanoseconds(value: int | None) -> str:
    """
    Ollama's integer nanoseconds as milliseconds; empty when not reported.
    """
    return "" if value is None else f"{value / 1e6:.3f}"


def _decimal(value: float | None, places: int) -> str:
    if value is None:
        return ""
    return f"{value:.{places}f}"


def _int(value: int | None) -> str:
    return "" if value is None else str(value)


def _timestamp(wall: float) -> str:
    seconds, millis = divmod(round(wall * 1000), 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
