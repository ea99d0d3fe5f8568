"""
The HTTP server side: a L{Site} whose requests start proxying as soon as
their headers are in, so that large bodies stream to the upstream instead
of being collected first.

Stock C{twisted.web} reads a whole request body (into memory, or a temporary
file past 100 kB) before it renders anything.  L{ProxyRequest} keeps that
for small bodies with a known length (they are read whole, which is the
cheapest way), and for larger or chunked bodies renders at once and feeds
the body to a L{StreamingBody} that the upstream request reads from, with
backpressure both ways.

This leans on a few attributes of L{HTTPChannel} that are not public API
(C{_command}, C{_path}, C{_version}, C{_receivedHeaderSize},
C{_handlingRequest}, C{_waitingForTransport}, C{_buffer});
C{tests/test_site.py} pins each of them, so a Twisted release that changes
them fails the suite instead of the proxy.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Callable
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request, Site
from zope.interface import implementer

# Bodies up to this size (or the body size limit, if lower), with a
# Content-Length, are read whole before the request is rendered; anything
# else streams.
BUFFERED_BODY_LIMIT = 1024 * 1024

# How much of a streaming body may wait in memory for the upstream to take
# it before the proxy stops reading from the client.
_STREAM_HIGH_WATER = 256 * 1024


# Seconds closing client connections get at shutdown before they are aborted.
_CLOSE_PATIENCE = 5.0


class BodyTooLarge(Exception):
    """
    The client sent more body bytes than the proxy accepts on this path.
    """


class BodyTimedOut(Exception):
    """
    The client went silent in the middle of its body for the client timeout.
    """


@implementer(IBodyProducer)
class StreamingBody:
    """
    A request body that is still arriving from the client, offered to the
    upstream L{Agent} as an L{IBodyProducer}.

    Bytes are passed on as they come.  While the upstream connection cannot
    take more (C{pauseProducing}), or before it exists, they wait here, and
    past L{_STREAM_HIGH_WATER} the client's socket is paused too.
    """

    def __init__(
        self,
        length: int | None,
        pause_client: Callable[[], None],
        resume_client: Callable[[], None],
    ) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self.received = 0
        self.complete = False
        self._pause_client = pause_client
        self._resume_client = resume_client
        self._consumer: IConsumer | None = None
        self._waiting: list[bytes] = []
        self._waiting_size = 0
        self._upstream_paused = False
        self._client_paused = False
        self._stopped = False
        self._finished: Deferred[None] | None = None
        self._observers: list[Callable[[bytes], None]] = []
        self._failure: Failure | None = None
        self._on_failure: list[Callable[[Failure], None]] = []

    def observe(self, observer: Callable[[bytes], None]) -> None:
        """
        Call C{observer} with every chunk as it arrives.
        """
        self._observers.append(observer)

    def on_failure(self, callback: Callable[[Failure], None]) -> None:
        """
        Call C{callback} if the body cannot be completed (too large, cut off).
        """
        if self._failure is not None:
            callback(self._failure)
        else:
            self._on_failure.append(callback)

    # From the client side.

    def data_received(self, data: bytes) -> None:
        if self._stopped or self._failure is not None:
            return
        self.received += len(data)
        for observer in self._observers:
            observer(data)
        if self._stopped or self._failure is not None:
            # An observer ended the body (it went over the size limit).
            return
        if self._consumer is not None and not self._upstream_paused and not self._waiting:
            self._consumer.write(data)
            return
        self._waiting.append(data)
        self._waiting_size += len(data)
        if self._waiting_size > _STREAM_HIGH_WATER and not self._client_paused:
            self._client_paused = True
            self._pause_client()

    def data_finished(self) -> None:
        self.complete = True
        self._maybe_finish()

    def fail(self, reason: Failure) -> None:
        """
        The body will not be completed: tell the exchange, then the upstream
        request.  The exchange goes first, so that it answers with the
        reason (413, a malformed body) and abandons the upstream request,
        rather than the upstream request's failure answering for it.
        """
        if self._failure is not None or self.complete:
            return
        self._failure = reason
        self._waiting = []
        callbacks, self._on_failure = self._on_failure, []
        for callback in callbacks:
            callback(reason)
        finished, self._finished = self._finished, None
        if finished is not None and not self._stopped:
            finished.errback(reason)

    # IBodyProducer, for the upstream request.

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        if self._failure is not None:
            return fail(self._failure)
        # Kept aside: when the whole body is already here, _drain fires it
        # (and clears self._finished) before this returns.
        finished = self._finished = Deferred()
        self._drain()
        return finished

    def pauseProducing(self) -> None:
        self._upstream_paused = True

    def resumeProducing(self) -> None:
        self._upstream_paused = False
        self._drain()

    def stopProducing(self) -> None:
        self._stopped = True
        self._waiting = []
        self._finished = None
        self._resume()

    def _drain(self) -> None:
        while self._waiting and not self._upstream_paused and self._consumer is not None:
            data = self._waiting.pop(0)
            self._waiting_size -= len(data)
            self._consumer.write(data)
        if self._waiting_size <= _STREAM_HIGH_WATER:
            self._resume()
        self._maybe_finish()

    def _resume(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self._resume_client()

    def _maybe_finish(self) -> None:
        if self.complete and not self._waiting and self._finished is not None:
            finished, self._finished = self._finished, None
            finished.callback(None)


class ProxyRequest(Request):
    """
    A request that renders as soon as its headers are in when its body is
    large or of unknown length (see the module docstring).

    C{body} is L{None} until then; afterwards it is either the complete
    body (C{bytes}) or a L{StreamingBody}.
    """

    defaultContentType = None

    def __init__(self, channel: HTTPChannel, *args: object, **kwargs: object) -> None:
        super().__init__(channel, *args, parsePOSTFormSubmission=False, **kwargs)
        self.body: bytes | StreamingBody | None = None

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length <= self.channel.site.buffered_body_limit:
            return
        channel = self.channel
        self.body = StreamingBody(length, self._pause_client, self._resume_client)
        self._begin(channel._command, channel._path, channel._version)
        # Answer now; the body arrives in handleContentChunk.
        self.process()

    def handleContentChunk(self, data: bytes) -> None:
        if isinstance(self.body, StreamingBody):
            self.body.data_received(data)
        elif not self.finished and self.content is not None:
            self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if isinstance(self.body, StreamingBody):
            self.body.data_finished()
            return
        self.body = self.content.getvalue()
        # Shares the bytes until written to: one copy of the body, not two.
        self.content = BytesIO(self.body)
        self._begin(command, path, version)
        self.process()

    def connectionLost(self, reason: Failure) -> None:
        # The exchange learns first that its client left (a 499 row); only
        # then is the upstream request's body cut off.
        super().connectionLost(reason)
        if isinstance(self.body, StreamingBody) and not self.body.complete:
            self.body.fail(reason)

    def finish(self) -> None:
        if not self.body_complete:
            self.close_after_response()
        super().finish()

    def process(self) -> None:
        """
        Render the site's root resource, whatever the path: the root routes
        every request itself, and this keeps Twisted's special handling of
        C{OPTIONS *} (which would bypass the log) out of the way.
        """
        self.site = self.channel.site
        self.prepath = []
        self.postpath = []
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def processingFailed(self, reason: Failure) -> Failure:
        """
        A bug: log it, and answer with a JSON 500 rather than Twisted's HTML.
        """
        self._log.failure("Unhandled error while serving {uri}", reason, uri=self.uri)
        if not self.startedWriting and not self.finished and not self._disconnected:
            body = b'{"error":"internal proxy error"}'
            self.setResponseCode(500)
            self.responseHeaders.setRawHeaders(b"content-type", [b"application/json; charset=utf-8"])
            self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
            self.write(body)
            self.finish()
        return reason

    def close_after_response(self) -> None:
        """
        The response will end before the request body has been read: make
        the connection close afterwards, so the rest of the body is never
        taken for a next request.
        """
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.requestHeaders.removeHeader(b"expect")
        if self.channel is not None:
            self.channel.persistent = False

    @property
    def body_complete(self) -> bool:
        return not isinstance(self.body, StreamingBody) or self.body.complete

    def _pause_client(self) -> None:
        """
        Stop reading the body from the client while the upstream is behind;
        the idle timeout must not count this pause against the client.
        """
        if self.channel is not None:
            self.channel.transport.pauseProducing()
            self.channel.setTimeout(None)

    def _resume_client(self) -> None:
        if self.channel is not None:
            if not self.body_complete:
                self.channel.setTimeout(self.channel.timeOut)
            self.channel.transport.resumeProducing()

    def _begin(self, command: bytes, uri: bytes, version: bytes) -> None:
        self.method, self.uri, self.clientproto = command, uri, version
        path, _, query = uri.partition(b"?")
        self.path = path
        try:
            self.args = parse_qs(query, 1) if query else {}
        except UnicodeDecodeError:
            # Twisted's request line parser lets bytes 0x7f-0xb0 through;
            # the root refuses such a target, which must get that far.
            self.args = {}


class ProxyChannel(HTTPChannel):
    """
    L{HTTPChannel} with tighter limits, a deadline for receiving headers,
    and tolerance for a response that ends before its request body did.
    """

    _log = Logger()
    maxHeaders = 100
    totalHeadersSize = 64 * 1024
    headerTimeout: float = 30.0
    _headerTimer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if (
            self._headerTimer is None
            and self.line_mode
            and not self._handlingRequest
            and (self._receivedHeaderSize or self._buffer)
            and self.transport is not None
        ):
            self._headerTimer = self.callLater(self.headerTimeout, self._headersTooSlow)

    def allHeadersReceived(self) -> None:
        self._cancelHeaderTimer()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self.requests:
            # The response already ended and the connection is closing.
            return
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:
        self._cancelHeaderTimer()
        super().connectionLost(reason)
        self.site.channel_closed(self)

    def timeoutConnection(self) -> None:
        """
        The client was silent for the client timeout.  If it stopped in the
        middle of a streaming body, that request is answered 408 first.
        """
        request = self.requests[-1] if self.requests else None
        if isinstance(request, ProxyRequest) and not request.body_complete:
            assert isinstance(request.body, StreamingBody)
            request.body.fail(Failure(BodyTimedOut(self.timeOut)))
        super().timeoutConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if streaming and self._waitingForTransport:
            # The transport is still full of an earlier (pipelined) response
            # and will not say so again: this one waits from its first byte.
            producer.pauseProducing()

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)
        if self.persistent and self.timeOut:
            # Back to an idle keep-alive connection: whatever paused the idle
            # timeout while the request ran, it applies again.
            self.setTimeout(self.timeOut)

    def _respondToBadRequestAndDisconnect(self) -> None:
        peer = self.transport.getPeer() if self.transport is not None else None
        self._log.info("Refused a malformed request from {peer}", peer=str(peer))
        request = self.requests[-1] if self.requests else None
        if isinstance(request, ProxyRequest) and request.body is not None:
            # The request is being answered already (its body was streaming
            # when it turned out malformed): let it fail like a cut-off body.
            if isinstance(request.body, StreamingBody):
                request.body.fail(Failure(ValueError("malformed chunked request body")))
            self.transport.loseConnection()
            return
        super()._respondToBadRequestAndDisconnect()

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request line or header line longer than C{MAX_LENGTH} (16 KiB):
        refused with 400 like any other malformed request, where
        L{LineReceiver} would just close the connection.
        """
        if not self.persistent:
            # What follows a response that ended the connection is not read.
            self.loseConnection()
            return
        self._respondToBadRequestAndDisconnect()

    def _headersTooSlow(self) -> None:
        self._headerTimer = None
        peer = self.transport.getPeer() if self.transport is not None else None
        self._log.info("Closed a connection whose headers took too long: {peer}", peer=str(peer))
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
        self.loseConnection()

    def _cancelHeaderTimer(self) -> None:
        if self._headerTimer is not None:
            if self._headerTimer.active():
                self._headerTimer.cancel()
            self._headerTimer = None


class ProxySite(Site):
    """
    The proxy's L{Site}: L{ProxyChannel} and L{ProxyRequest}, no access log
    (the CSV log is the access log).
    """

    protocol = ProxyChannel
    requestFactory = ProxyRequest
    noisy = False

    def __init__(
        self, *args: Any, buffered_body_limit: int = BUFFERED_BODY_LIMIT, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        # Bodies with a Content-Length up to this are read whole before the
        # request is rendered.  Keep it no higher than the body size limit,
        # or a body that will be refused is read first.
        self.buffered_body_limit = buffered_body_limit
        self.channels: set[ProxyChannel] = set()
        self._when_closed: list[Deferred[None]] = []
        self._abort_timer: IDelayedCall | None = None

    def log(self, request: Request) -> None:
        pass

    def close_idle_connections(self) -> None:
        """
        Close the client connections with no request in progress (at the
        start of shutdown, so kept-alive clients go elsewhere).
        """
        for channel in list(self.channels):
            if not channel.requests and channel.transport is not None:
                channel.transport.loseConnection()

    def close_connections(self) -> Deferred[None]:
        """
        Close every client connection (at shutdown, once no request is left
        in flight); fires when they are all gone.
        """
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.loseConnection()
        if not self.channels:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._when_closed.append(closed)
        # A client that stops reading would hold a closing connection open.
        if self._abort_timer is None:
            self._abort_timer = self.reactor.callLater(_CLOSE_PATIENCE, self._abort_remaining)
        return closed

    def _abort_remaining(self) -> None:
        self._abort_timer = None
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.abortConnection()

    def channel_closed(self, channel: ProxyChannel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            if self._abort_timer is not None:
                self._abort_timer.cancel()
                self._abort_timer = None
            waiting, self._when_closed = self._when_closed, []
            for closed in waiting:
                closed.callback(None)

