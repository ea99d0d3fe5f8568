"""
A raw TCP client for what no HTTP client library will send: absolute-form
targets, CONNECT, broken request lines, header floods, half-sent bodies and
headers that never end.  Everything waits with a bound, on the real reactor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from .support import PATIENCE, eventually


@dataclass
class Response:
    """
    One parsed HTTP/1.1 response.
    """

    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def parse_responses(data: bytes) -> list[Response]:
    """
    Every complete response in C{data} (interim 1xx ones included), in order.
    """
    responses = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        status = int(status_line.split(b" ")[1])
        headers: dict[bytes, list[bytes]] = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        if status < 200 or status in (204, 304):
            body = b""
        elif b"content-length" in headers:
            length = int(headers[b"content-length"][0])
            if len(rest) < length:
                break
            body, rest = rest[:length], rest[length:]
        elif headers.get(b"transfer-encoding") == [b"chunked"]:
            body, rest, complete = dechunk(rest)
            if not complete:
                break
        else:
            body, rest = rest, b""
        responses.append(Response(status, headers, body))
        data = rest
    return responses


def chunk(data: bytes) -> bytes:
    """
    C{data} as one chunk of a chunked body.
    """
    return b"%x\r\n%s\r\n" % (len(data), data)


def dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    """
    Decode a chunked body at the start of C{data}: the body so far, what
    follows it, and whether its terminating chunk (and trailer) was there.
    Linear in the size of C{data}, for multi-megabyte streams.
    """
    pieces: list[bytes] = []
    offset = 0
    while True:
        line_end = data.find(b"\r\n", offset)
        if line_end < 0:
            break
        size = int(data[offset:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n\r\n", line_end)
            if data[start : start + 2] == b"\r\n":
                return b"".join(pieces), data[start + 2 :], True
            if trailer_end < 0:
                break
            return b"".join(pieces), data[trailer_end + 4 :], True
        if len(data) < start + size + 2:
            break
        pieces.append(data[start : start + size])
        offset = start + size + 2
    return b"".join(pieces), data[offset:], False


class RawClient(Protocol):
    """
    A TCP connection to the proxy that writes exactly the bytes it is given
    and keeps everything it receives.
    """

    def __init__(self) -> None:
        self.received = b""
        self.closed = False
        self._close_waiters: list[Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.closed = True
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    @property
    def responses(self) -> list[Response]:
        return parse_responses(self.received)

    async def response(self, timeout: float = PATIENCE) -> Response:
        """
        The first final (non-1xx) response, once it is complete.
        """
        await eventually(lambda: any(r.status >= 200 for r in self.responses), timeout)
        return next(r for r in self.responses if r.status >= 200)

    def when_closed(self, timeout: float = PATIENCE) -> Deferred[None]:
        """
        Fires when the server has closed the connection; fails after
        C{timeout}.
        """
        waiter: Deferred[None] = Deferred()
        if self.closed:
            waiter.callback(None)
        else:
            self._close_waiters.append(waiter)
            waiter.addTimeout(timeout, reactor)
        return waiter

    async def hang_up(self) -> None:
        if not self.closed:
            self.transport.abortConnection()
            await self.when_closed()


async def connect(test: Any, port: int) -> RawClient:
    """
    A new L{RawClient} connected to C{port} on loopback, hung up (if still
    open) when the test ends.
    """
    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())
    test.addCleanup(lambda: Deferred.fromCoroutine(client.hang_up()))
    return client


def captured_log(test: Any) -> list[str]:
    """
    Every log event emitted from now until the test ends, each as the text
    of its whole event dictionary (format, fields and failure alike).
    """
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(f"{formatEvent(event)} {event!r}")

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines
