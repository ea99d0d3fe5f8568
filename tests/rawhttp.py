"""
A raw TCP client for what no HTTP client library will send: absolute-form
targets, CONNECT, broken request lines, header floods, half-sent bodies and
headers that never end.  Everything waits with a bound, on the real reactor.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from ollamaproxy.record import COLUMNS

# Every wait in these tests gives up after this many seconds.
PATIENCE = 5.0


async def eventually(condition: Callable[[], bool], timeout: float = PATIENCE) -> None:
    """
    Poll C{condition} every 10 ms until it holds; fail after C{timeout}.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() >= deadline:
            raise AssertionError(f"condition still false after {timeout:g} s")
        await deferLater(reactor, 0.01, lambda: None)


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
            body, rest, complete = _dechunk(rest)
            if not complete:
                break
        else:
            body, rest = rest, b""
        responses.append(Response(status, headers, body))
        data = rest
    return responses


def _dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    body = b""
    while b"\r\n" in data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if len(rest) < size + 2:
            break
        body += rest[:size]
        data = rest[size + 2 :]
        if size == 0:
            return body, data, True
    return body, data, False


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


def csv_rows(path: str) -> list[list[str]]:
    """
    The CSV file through L{csv.reader}, checking that every line (header
    included) has exactly the column count; the header row is dropped.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(COLUMNS), f"bad header: {rows[0]}"
    for row in rows:
        assert len(row) == len(COLUMNS), f"{len(row)} cells, expected {len(COLUMNS)}: {row}"
    return rows[1:]


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
