"""
Forwarding one request to Ollama and its response back, chunk by chunk.

An L{Exchange} is one request's life: admission, the upstream request, the
streamed response, and whatever goes wrong on either side.  It ends exactly
once, in L{Exchange._conclude}, which hands the finished L{RequestRecord} to
every sink (the CSV log, the metrics).

The upstream side uses Twisted's L{Agent} over a persistent
L{HTTPConnectionPool} directly: that is the client treq itself wraps, and
C{treq.request} would add what a transparent proxy must not have (gzip
negotiation and decoding, a cookie jar shared by all clients, redirect
following) and about 80 µs of CPU per request.  treq serves the health probe
and, through L{treq.testing}, the tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from .auth import ApiKeys
from .bodies import BytesProducer, with_usage_requested
from .facts import (
    USAGE_INJECTABLE,
    WANTED_FIELDS,
    RequestFacts,
    facts_for,
    fields_of,
    parse_object,
)
from .forwarded import ClientAddress, peer_address
from .gate import Gate, QueueFull
from .headers import copy_response_headers, is_cors_preflight, upstream_headers
from .jsonfields import TopLevelFields
from .meter import Meter, meter_for
from .record import RecordSink, RequestRecord, new_request_id
from .routes import BLOBS_PREFIX, error_body, family
from .site import BodyTimedOut, BodyTooLarge, StreamingBody
from .upstream import Upstream

log = Logger()

_STREAMING_TYPES = (b"application/x-ndjson", b"text/event-stream")


@dataclass
class Limits:
    header_timeout: float = 300.0
    idle_timeout: float = 300.0
    client_timeout: float = 60.0
    max_body_bytes: int = 100 * 1024 * 1024
    inject_usage: bool = True


@dataclass
class Forwarder:
    """
    What every exchange shares: one per running proxy.
    """

    agent: IAgent
    upstream: Upstream
    clock: IReactorTime
    sinks: Sequence[RecordSink] = ()
    gate: Gate = field(default_factory=lambda: Gate(None, 512))
    limits: Limits = field(default_factory=Limits)
    keys: ApiKeys | None = None
    client_address: Callable[[Request], str] = field(default_factory=ClientAddress)
    host_load: Callable[[], tuple[float | None, float | None]] = lambda: (None, None)
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    active: set[Exchange] = field(default_factory=set)
    draining: bool = False
    _idle_waiters: list[Deferred[None]] = field(default_factory=list)

    def forward(self, request: Request, path: bytes) -> None:
        """
        Start proxying C{request}, whose percent-decoded path is C{path}.
        """
        Exchange(self, request, path).start()

    def refuse(self, request: Request, status: int, message: str) -> None:
        """
        Answer C{request} with an error without forwarding it (it still gets
        its row).
        """
        Exchange(self, request, b"").refuse(status, message)

    def when_idle(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once no exchange is active.
        """
        if not self.active:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def abort_all(self, reason: str) -> None:
        for exchange in list(self.active):
            exchange.abort(reason)

    def _ended(self, exchange: Exchange) -> None:
        self.active.discard(exchange)
        for sink in self.sinks:
            try:
                sink.request_finished(exchange.record)
            except Exception:
                log.failure("A record sink failed on {request_id}", request_id=exchange.record.request_id)
        if not self.active and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)


class _UpstreamBody(Protocol):
    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    def connectionMade(self) -> None:
        self._exchange._body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._exchange._body_data(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._exchange._body_ended(reason)


@implementer(IPushProducer)
class Exchange:
    """
    One request through the proxy.  It is also the producer the client's
    connection pauses when it cannot take more, so a slow reader slows the
    upstream down instead of filling the proxy's memory.
    """

    def __init__(self, forwarder: Forwarder, request: Request, path: bytes) -> None:
        self._forwarder = forwarder
        self._request = request
        self._path = path
        self._family = family(path)
        self.record = record = RequestRecord(
            request_id=new_request_id(),
            arrived_wall=forwarder.wall(),
            arrived=forwarder.monotonic(),
        )
        record.ip_source = forwarder.client_address(request)
        record.user_agent = _header(request, b"user-agent")
        record.http_method = request.method.decode("latin-1")
        record.endpoint = request.path.decode("utf-8", "replace")
        record.session_id = _header(request, b"x-session-id")
        self._body: bytes | StreamingBody = b""
        self._has_body = False
        self._body_fields: TopLevelFields | None = None
        self._inject_usage = False
        self._waiting: Deferred[None] | None = None
        self._holds_slot = False
        self._pending: Deferred[IResponse] | None = None
        self._upstream_body: IPushProducer | None = None
        self._meter: Meter = Meter()
        self._timer: IDelayedCall | None = None
        self._timed_out_waiting = False
        self._client_paused = False
        self._went_idle = False
        self._aborting = False
        self._done = False

    # The request's way in.

    def start(self) -> None:
        forwarder, request, record = self._forwarder, self._request, self.record
        self._arrive()
        if forwarder.draining:
            # A new request on a kept-alive connection while shutting down:
            # refused, and the connection closed after the answer.
            request.setHeader(b"connection", b"close")
            if request.channel is not None:
                request.channel.persistent = False
            self._reject(503, "proxy is shutting down")
            return
        if forwarder.keys is not None and not is_cors_preflight(request):
            # Before the body is even looked at: a request without a key
            # costs the proxy as little as possible.
            name = forwarder.keys.identify(request.requestHeaders)
            if name is None:
                self._reject(401, "missing or invalid API key")
                return
            record.api_key_name = name
        self._take_body()
        if self._done:
            return
        try:
            waiter = forwarder.gate.enter()
        except QueueFull as e:
            self._reject(503, str(e))
            return
        if waiter is None:
            self._holds_slot = True
            self._send()
        else:
            self._waiting = waiter
            waiter.addCallbacks(self._admitted, lambda _: None)

    def refuse(self, status: int, message: str) -> None:
        self._arrive()
        self._reject(status, message)

    def _arrive(self) -> None:
        forwarder, request, record = self._forwarder, self._request, self.record
        forwarder.active.add(self)
        record.concurrent_requests = len(forwarder.active)
        body = getattr(request, "body", None)
        if isinstance(body, bytes):
            record.request_size_bytes = len(body)
        request.notifyFinish().addErrback(self._client_left)
        request.setHeader(b"x-request-id", record.request_id.encode("ascii"))

    def _take_body(self) -> None:
        """
        Read what the body tells the log (now if it is all here, else while
        it streams past) and enforce the size limit.
        """
        request = self._request
        body = getattr(request, "body", None)
        if body is None:
            # A stock twisted.web Request (the in-memory test client): the
            # body was collected into request.content.
            request.content.seek(0)
            body = request.content.read()
        limit = None if self._path.startswith(BLOBS_PREFIX) else self._forwarder.limits.max_body_bytes
        if isinstance(body, StreamingBody):
            self._watch_streaming_body(body, limit)
        else:
            self._read_whole_body(body, limit)

    def _read_whole_body(self, body: bytes, limit: int | None) -> None:
        self._body = body
        self._has_body = bool(body) or self._request.requestHeaders.hasHeader(b"content-length")
        self.record.request_size_bytes = len(body)
        if limit is not None and len(body) > limit:
            self._reject(413, _too_large(limit))
            return
        parsed = parse_object(body) if body else None
        facts = facts_for(self._path, fields_of(parsed) if parsed is not None else None)
        self._apply_facts(facts)
        self._inject_usage = (
            self._forwarder.limits.inject_usage
            and facts.wants_stream
            and not facts.asked_for_usage
            and self._path in USAGE_INJECTABLE
        )

    def _watch_streaming_body(self, body: StreamingBody, limit: int | None) -> None:
        self._body = body
        self._has_body = True
        if limit is not None and isinstance(body.length, int) and body.length > limit:
            self._reject(413, _too_large(limit))
            return
        fields = self._body_fields = TopLevelFields(WANTED_FIELDS)

        def inspect(data: bytes) -> None:
            if not fields.failed:
                fields.feed(data)

        def enforce_limit(data: bytes) -> None:
            if limit is not None and body.received > limit:
                body.fail(Failure(BodyTooLarge(limit)))

        def upload_progress(data: bytes) -> None:
            # Ollama answers only once the body is in: while it is still
            # coming, the wait for headers has not really begun.
            if self._pending is not None and self._timer is not None:
                self._timer.reset(self._forwarder.limits.header_timeout)

        body.observe(inspect)
        body.observe(enforce_limit)
        body.observe(upload_progress)
        body.on_failure(self._body_failed)

    def _apply_facts(self, facts: RequestFacts) -> None:
        record = self.record
        record.model = facts.model
        record.model_parameters = facts.parameters
        if record.stream_mode is None:
            record.stream_mode = facts.wants_stream

    def _admitted(self, _: None) -> None:
        self._waiting = None
        self._holds_slot = True
        if self._done:
            self._release_slot()
            return
        self._send()

    def _send(self) -> None:
        forwarder, request, record = self._forwarder, self._request, self.record
        producer: IBodyProducer | None = None
        if isinstance(self._body, StreamingBody):
            producer = self._body
        elif self._has_body:
            body = self._body
            if self._inject_usage:
                body = with_usage_requested(body)
            producer = BytesProducer(body)
        headers = upstream_headers(
            request, peer_address(request), consumed=forwarder.keys.headers if forwarder.keys else ()
        )
        record.sent_upstream = forwarder.monotonic()
        try:
            pending = forwarder.agent.request(
                request.method, forwarder.upstream.url_for(request.uri), headers, producer
            )
        except Exception:
            pending = Deferred()
            pending.errback()
        self._pending = pending
        self._timer = forwarder.clock.callLater(forwarder.limits.header_timeout, self._timed_out)
        pending.addCallbacks(self._got_response, self._upstream_failed)

    # The response's way back.

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        if self._done:
            response.deliverBody(_Discard())
            return
        request, record = self._request, self.record
        status = response.code
        record.http_status = status
        request.setResponseCode(status, response.phrase)
        request.defaultContentType = None
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        length = response.length if isinstance(response.length, int) else None
        self._meter = meter_for(record, self._path, status, content_type, self._inject_usage, length)
        keep_length = length is not None and not self._meter.alters_body and request.method != b"HEAD"
        copy_response_headers(response.headers, request.responseHeaders, length if keep_length else None)
        record.stream_mode = content_type.split(b";", 1)[0].strip().lower() in _STREAMING_TYPES
        if self._timer is not None:
            self._timer.reset(self._forwarder.limits.idle_timeout)
        response.deliverBody(_UpstreamBody(self))

    def _body_started(self, transport: IPushProducer) -> None:
        self._upstream_body = transport
        if not self._done:
            self._request.registerProducer(self, True)

    def _body_data(self, data: bytes) -> None:
        if self._done:
            return
        if self._timer is not None and not self._client_paused:
            self._timer.reset(self._forwarder.limits.idle_timeout)
        self._write(self._meter.feed(data))

    def _write(self, data: bytes) -> None:
        if data:
            record = self.record
            if record.first_byte is None:
                record.first_byte = self._forwarder.monotonic()
            record.response_size_bytes += len(data)
            self._request.write(data)

    def _body_ended(self, reason: Failure) -> None:
        self._upstream_body = None
        if self._done:
            return
        self._cancel_timer()
        record, request = self.record, self._request
        record.upstream_ended = self._forwarder.monotonic()
        self._unregister()
        if reason.check(ResponseDone, PotentialDataLoss) and not self._aborting:
            self._write(self._meter.end())
            request.finish()
            self._conclude()
            return
        record.fail(
            f"upstream connection lost after {record.response_size_bytes} bytes of the response"
        )
        if not request.startedWriting:
            self._respond_error(504 if self._went_idle else 502, record.error_message)
        else:
            # Close without ending the body properly, so the client can tell
            # the response was cut short.
            request.channel.loseConnection()
        self._conclude()

    def _upstream_failed(self, failure: Failure) -> None:
        self._pending = None
        self._cancel_timer()
        if self._done or self._aborting:
            # Cancelled by _stop_upstream: whoever stopped it answers.
            return
        self.record.upstream_ended = self._forwarder.monotonic()
        status, message = self._explain(failure)
        self._respond_error(status, message)
        self._conclude()

    def _explain(self, failure: Failure) -> tuple[int, str]:
        where = self._forwarder.upstream.display
        limits = self._forwarder.limits
        if self._timed_out_waiting:
            return 504, f"upstream {where} sent no response headers within {limits.header_timeout:g} s"
        if failure.check(TimeoutError, TCPTimedOutError):
            return 504, f"upstream {where} unreachable: connection timed out"
        if failure.check(ConnectionRefusedError):
            return 502, f"upstream {where} unreachable: connection refused"
        if failure.check(DNSLookupError):
            return 502, f"upstream {where} unreachable: host name could not be resolved"
        if failure.check(ConnectError):
            return 502, f"upstream {where} unreachable: {failure.getErrorMessage()}"
        if failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived):
            # (ResponseNeverReceived is a ResponseFailed: not one byte came back.)
            return 502, f"upstream {where} sent an invalid or incomplete response"
        if isinstance(self._body, StreamingBody) and not self._body.complete:
            return 400, "the request body could not be read"
        return 502, f"upstream {where} closed the connection without responding"

    # Timeouts.

    def _timed_out(self) -> None:
        """
        The one timer: before the response headers it is the header timeout
        (which an upload in progress keeps pushing back); after them, the
        idle timeout between body chunks, or, while the client is not
        reading, the client timeout.
        """
        self._timer = None
        limits = self._forwarder.limits
        if self._pending is not None:
            self._timed_out_waiting = True
            self._pending.cancel()
        elif self._client_paused:
            # Without this a client that stops reading would hold its slot,
            # and Ollama's, for ever.
            self.record.fail(f"client read nothing for {limits.client_timeout:g} s; gave up")
            self._stop_upstream()
            self._unregister()
            if self._request.channel is not None:
                self._request.channel.transport.abortConnection()
            self._conclude()
        else:
            self.record.fail(f"upstream sent nothing for {limits.idle_timeout:g} s mid-response; gave up")
            self._went_idle = True
            self._aborting = True
            if self._upstream_body is not None:
                self._upstream_body.stopProducing()

    # The client's side.

    def pauseProducing(self) -> None:
        """
        The client is not reading: stop reading the upstream, and time the
        client instead of the upstream.
        """
        if self._done:
            return
        self._client_paused = True
        self._set_timer(self._forwarder.limits.client_timeout)
        if self._upstream_body is not None:
            self._upstream_body.pauseProducing()

    def resumeProducing(self) -> None:
        if self._done:
            return
        self._client_paused = False
        self._set_timer(self._forwarder.limits.idle_timeout)
        if self._upstream_body is not None:
            self._upstream_body.resumeProducing()

    def stopProducing(self) -> None:
        self._client_left(Failure(CancelledError("client connection lost")))

    def _client_left(self, reason: Failure) -> None:
        if self._done:
            return
        record, request = self.record, self._request
        if not request.startedWriting:
            record.http_status = 499
        if self._waiting is not None:
            record.fail("client disconnected while queued")
        elif self._pending is not None:
            record.fail("client disconnected before the upstream answered")
        else:
            record.fail(f"client disconnected after {record.response_size_bytes} bytes")
        self._stop_upstream()
        self._conclude()

    def _body_failed(self, reason: Failure) -> None:
        """
        The streaming request body broke off: too large, the client went
        silent, it was malformed, or the client left (which L{_client_left}
        reports).
        """
        if self._done or not reason.check(BodyTooLarge, BodyTimedOut, ValueError):
            return
        self._stop_upstream()
        if reason.check(BodyTooLarge):
            self._respond_error(413, _too_large(reason.value.args[0]))
        elif reason.check(BodyTimedOut):
            self._respond_error(408, f"client sent nothing for {reason.value.args[0]:g} s mid-body")
        else:
            self._respond_error(400, str(reason.value))
        self._conclude()

    def abort(self, reason: str) -> None:
        """
        End this exchange now (the proxy is shutting down).
        """
        if self._done:
            return
        self.record.fail(reason)
        self._stop_upstream()
        if self._request.startedWriting:
            self._unregister()
            if self._request.channel is not None:
                self._request.channel.loseConnection()
        else:
            self._respond_error(503, reason)
        self._conclude()

    # Endings.

    def _reject(self, status: int, message: str) -> None:
        """
        Answer without asking the upstream.
        """
        self._respond_error(status, message)
        self._conclude()

    def _respond_error(self, status: int, message: str) -> None:
        request, record = self._request, self.record
        record.http_status = status
        record.fail(message)
        self._unregister()
        if request.startedWriting or request.finished or request.channel is None:
            return
        content_type, body = error_body(self._family, status, message)
        request.setResponseCode(status)
        # Whatever Ollama's headers said, the answer is now the proxy's own;
        # only the decision to close the connection carries over.
        connection = request.responseHeaders.getRawHeaders(b"connection")
        request.responseHeaders = Headers(
            {
                b"content-type": [content_type],
                b"content-length": [b"%d" % len(body)],
                b"date": [datetimeToString()],
                b"x-request-id": [record.request_id.encode("ascii")],
            }
        )
        if connection:
            request.responseHeaders.setRawHeaders(b"connection", connection)
        if status == 401:
            request.responseHeaders.setRawHeaders(b"www-authenticate", [b"Bearer"])
        if getattr(request, "body_complete", True) is False:
            request.close_after_response()
        record.response_size_bytes += len(body)
        if record.first_byte is None:
            record.first_byte = self._forwarder.monotonic()
        request.write(body)
        request.finish()

    def _stop_upstream(self) -> None:
        self._aborting = True
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._upstream_body is not None:
            body, self._upstream_body = self._upstream_body, None
            body.stopProducing()
        if isinstance(self._body, StreamingBody):
            self._body.stopProducing()

    def _conclude(self) -> None:
        if self._done:
            return
        self._done = True
        forwarder, record = self._forwarder, self.record
        record.ended = forwarder.monotonic()
        self._cancel_timer()
        self._release_slot()
        if isinstance(self._body, StreamingBody):
            record.request_size_bytes = self._body.received
            fields = self._body_fields
            if fields is not None and self._body.complete:
                fields.close()
                if fields.complete:
                    # Already keyed by the wanted names, matched as Go matches them.
                    self._apply_facts(facts_for(self._path, fields.fields))
        if record.http_status is not None and record.http_status >= 400 and not record.error_message:
            record.fail(f"upstream answered HTTP {record.http_status}")
        record.system_load_cpu, record.system_load_memory = forwarder.host_load()
        forwarder._ended(self)

    def _unregister(self) -> None:
        request = self._request
        if request.producer is not None and request.channel is not None:
            request.unregisterProducer()

    def _release_slot(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self._forwarder.gate.leave()

    def _set_timer(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self._forwarder.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class _Discard(Protocol):
    """
    Reads nothing: the exchange is over, so close the upstream connection.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _header(request: Request, name: bytes) -> str:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0].decode("utf-8", "replace") if values else ""


def _too_large(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"
