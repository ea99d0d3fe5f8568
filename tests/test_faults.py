"""
Faults over real loopback sockets: an upstream that refuses, resets, hangs,
talks garbage or drops pooled connections; clients that leave early or read
slowly; a CSV log that cannot be written; and malformed HTTP.  Whatever
happens, the client gets a truthful answer and the CSV exactly one truthful
row per request.  What sockets cannot produce on demand, or only with
timing, is driven in memory on a L{Clock}: a response that starts on a full
connection, a client that stops reading, slow and abandoned uploads.

Waits on real time are bounded by L{tests.support.PATIENCE}; a timeout
under test is either the only way the exchange can end or far shorter than
the other.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
from io import BytesIO
from typing import Any

import treq
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers

from ollamaproxy.proxy import Exchange, Forwarder, Limits
from ollamaproxy.resource import Root
from ollamaproxy.site import ProxyChannel, ProxySite
from ollamaproxy.testing.fake_ollama import FakeOllama, Fault

from .rawhttp import chunk, connect, parse_responses
from .support import (
    UPSTREAM,
    HangUpAfter,
    InMemoryProxy,
    LiveProxy,
    csv_rows,
    eventually,
    http_client,
    refused_port,
    within,
)

GENERATE = {"model": "llama3.2", "prompt": "Why is the sky blue?"}
# A stream whose natural end (10,000 tokens 0.02 s apart: 200 s) is far
# beyond any wait here, so whatever ends it first was not its end.
LONG_STREAM = {**GENERATE, "options": {"num_predict": 10_000}}
LONG_TOKEN_DELAY = 0.02


async def rows(proxy: LiveProxy, count: int) -> list[dict[str, str]]:
    """
    The CSV's rows once there are at least C{count}.  (A row is written
    as its exchange ends, so there is nothing more to wait for.)
    """
    await eventually(lambda: len(proxy.rows()) >= count)
    return proxy.rows()


def hang_up(pending: Deferred[Any]) -> None:
    """
    Cancel a client request that has no response yet: the agent closes the
    connection.
    """
    pending.addErrback(lambda failure: failure.trap(CancelledError, ResponseFailed))
    pending.cancel()
    assert pending.called


# Raw servers and clients.


class _Tracked(Protocol):
    """
    A protocol its factory keeps track of, so cleanup can close it and wait.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure) -> None:
        self.closed.callback(None)


class RawServerFactory(Factory):
    """
    A raw TCP server on loopback whose connections the test closes at the end.
    """

    def __init__(self, protocol: type[_Tracked], test: TestCase) -> None:
        self.protocol = protocol
        self.connections: list[_Tracked] = []
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        test.addCleanup(self.close)

    async def close(self) -> None:
        if self.port.connected:
            await self.port.stopListening()
        for connection in self.connections:
            connection.transport.abortConnection()
        await DeferredList([c.closed for c in self.connections])


class NotHttp(_Tracked):
    """
    Answers any request with a line that is not an HTTP status line, and
    keeps the connection open.
    """

    reply = b"not http at all\r\n\r\n"

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.reply)


class RandomBytesThenClose(_Tracked):
    """
    Answers any request with random bytes (no line end), then closes.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(bytes(random.Random(4).randrange(256) for _ in range(300)).replace(b"\n", b""))
        self.transport.loseConnection()


class AnswersOnceThenDrops(_Tracked):
    """
    Answers the first request on each connection with a keep-alive 200, and
    closes the connection without answering when a second request arrives on
    it: the server's idle timeout firing just as the client reuses the
    connection.  Every request is noted with the number of its connection.
    """

    seen: list[tuple[int, bytes]]

    def connectionMade(self) -> None:
        super().connectionMade()
        self.number = len(self.factory.connections)
        self.buffer = b""
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        request_line = self.buffer.split(b"\r\n", 1)[0]
        self.factory.seen.append((self.number, request_line))
        self.buffer = b""
        if self.answered:
            self.transport.loseConnection()
            return
        self.answered = True
        body = b'{"version":"0.12.6"}'
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )


# Upstream faults.


class UpstreamFaultTests(TestCase):
    async def test_refused_connection(self) -> None:
        """
        Nothing listening upstream: the client gets a 502 saying the
        connection to the upstream (named) was refused, in its route
        family's shape (Ollama's for /api, OpenAI's for /v1), and each
        request a row saying the same.
        """
        port = refused_port(self)
        proxy = LiveProxy(self, args=["--ollama-url", f"http://127.0.0.1:{port}"])
        http = http_client(self)
        native = await within(http.post(proxy.url + "/api/generate", json=GENERATE))
        self.assertEqual(native.code, 502)
        error = (await native.json())["error"]
        self.assertIn(f"127.0.0.1:{port} unreachable: connection refused", error)
        openai = await within(http.post(proxy.url + "/v1/chat/completions", json={"model": "llama3.2", "messages": []}))
        self.assertEqual(openai.code, 502)
        self.assertEqual(
            await openai.json(), {"error": {"message": error, "type": "api_error", "param": None, "code": None}}
        )
        found = await rows(proxy, 2)
        self.assertEqual(
            [(r["endpoint"], r["model"], r["http_status"], r["error_message"]) for r in found],
            [("/api/generate", "llama3.2", "502", error), ("/v1/chat/completions", "llama3.2", "502", error)],
        )

    async def test_reset_before_headers(self) -> None:
        """
        An upstream that resets the connection before any response byte
        gives the client a 502 saying it closed without responding; the row
        says the same.
        """
        proxy = LiveProxy(self)
        proxy.fake.inject(Fault.RESET_BEFORE_HEADERS)
        response = await within(http_client(self).post(proxy.url + "/api/generate", json=GENERATE))
        self.assertEqual(response.code, 502)
        error = (await response.json())["error"]
        self.assertIn("closed the connection without responding", error)
        [row] = await rows(proxy, 1)
        self.assertEqual((row["http_status"], row["error_message"]), ("502", error))
        self.assertEqual(row["response_size_bytes"], str(len(error) + len('{"error": ""}')))

    async def test_reset_mid_stream(self) -> None:
        """
        An upstream reset mid-stream cuts the client's chunked body short
        (no terminating chunk, so the client knows); the row keeps the 200
        that was sent and counts exactly the bytes the client got.  (How
        many lines pass before the reset is pinned in memory, in
        tests/test_columns.py: over sockets it depends on timing.)
        """
        proxy = LiveProxy(self, token_delay=0.01)
        proxy.fake.inject(Fault.RESET_MIDSTREAM, after_chunks=3)
        response = await within(
            http_client(self).post(proxy.url + "/api/generate", json=GENERATE, unbuffered=True)
        )
        self.assertEqual(response.code, 200)
        received: list[bytes] = []
        with self.assertRaises(ResponseFailed):
            await within(treq.collect(response, received.append))
        got = len(b"".join(received))
        [row] = await rows(proxy, 1)
        self.assertEqual((row["http_status"], row["response_size_bytes"]), ("200", str(got)))
        self.assertEqual(row["error_message"], f"upstream connection lost after {got} bytes of the response")

    async def test_hang_before_headers(self) -> None:
        """
        An upstream that never sends headers is given up after
        --header-timeout: the client gets a 504 saying so, the upstream
        connection is closed, and the row says 504.
        """
        proxy = LiveProxy(self, args=["--header-timeout", "0.3"])
        proxy.fake.inject(Fault.HANG_BEFORE_HEADERS)
        upstream_gone = proxy.fake.when_disconnected()
        response = await within(http_client(self).post(proxy.url + "/api/generate", json=GENERATE))
        self.assertEqual(response.code, 504)
        error = (await response.json())["error"]
        self.assertIn("sent no response headers within 0.3 s", error)
        self.assertEqual(await within(upstream_gone), b"/api/generate")
        [row] = await rows(proxy, 1)
        self.assertEqual((row["http_status"], row["error_message"]), ("504", error))

    async def test_hang_mid_stream(self) -> None:
        """
        An upstream that falls silent mid-stream is given up after
        --idle-timeout: the client's body is cut short, the upstream
        connection closed, and the row keeps 200, names the timeout and
        counts the bytes the client got.  (The fake writes its chunks
        before the silence at once, so no pause between them can pass for
        it; exact counts are pinned in memory, in tests/test_proxy.py.)
        """
        proxy = LiveProxy(self, args=["--idle-timeout", "0.3"])
        proxy.fake.inject(Fault.HANG_MIDSTREAM, after_chunks=2)
        upstream_gone = proxy.fake.when_disconnected()
        response = await within(
            http_client(self).post(proxy.url + "/api/generate", json=GENERATE, unbuffered=True)
        )
        received: list[bytes] = []
        with self.assertRaises(ResponseFailed):
            await within(treq.collect(response, received.append))
        self.assertEqual(await within(upstream_gone), b"/api/generate")
        [row] = await rows(proxy, 1)
        self.assertEqual((row["http_status"], row["response_size_bytes"]), ("200", str(len(b"".join(received)))))
        self.assertEqual(row["error_message"], "upstream sent nothing for 0.3 s mid-response; gave up")

    async def test_garbage_instead_of_http(self) -> None:
        """
        An upstream that answers with something that is not HTTP gives a
        502 saying the response was invalid, at once rather than at the
        header timeout (an hour here), whether it keeps the connection open
        or closes it.
        """
        for server in (NotHttp, RandomBytesThenClose):
            upstream = RawServerFactory(server, self)
            proxy = LiveProxy(self, args=["--ollama-url", upstream.url, "--header-timeout", "3600"])
            response = await within(http_client(self).get(proxy.url + "/api/tags"))
            self.assertEqual(response.code, 502, server.__name__)
            error = (await response.json())["error"]
            self.assertIn("sent an invalid or incomplete response", error, server.__name__)
            [row] = await rows(proxy, 1)
            self.assertEqual((row["http_status"], row["error_message"]), ("502", error))
            await proxy.stop()
            await upstream.close()

    async def test_pooled_connection_closed_by_upstream(self) -> None:
        """
        When the upstream closes a pooled keep-alive connection just as the
        proxy reuses it, a GET (safe, no body) is retried by Twisted's
        agent on a new connection and succeeds; a POST is not replayed (it
        could run twice), and the client gets a 502 (not the header
        timeout's 504) saying the upstream closed the connection without
        responding.
        """
        upstream = RawServerFactory(AnswersOnceThenDrops, self)
        upstream.seen = []
        proxy = LiveProxy(self, args=["--ollama-url", upstream.url])
        http = http_client(self)
        first = await within(http.get(proxy.url + "/api/version"))
        self.assertEqual((first.code, await first.json()), (200, {"version": "0.12.6"}))
        second = await within(http.get(proxy.url + "/api/version?again"))
        self.assertEqual((second.code, await second.json()), (200, {"version": "0.12.6"}))
        self.assertEqual(
            upstream.seen,
            [
                (1, b"GET /api/version HTTP/1.1"),
                (1, b"GET /api/version?again HTTP/1.1"),
                (2, b"GET /api/version?again HTTP/1.1"),
            ],
        )
        post = await within(http.post(proxy.url + "/api/show", json={"model": "llama3.2"}))
        self.assertEqual(post.code, 502)
        error = (await post.json())["error"]
        self.assertIn("closed the connection without responding", error)
        self.assertEqual(upstream.seen[3:], [(2, b"POST /api/show HTTP/1.1")])
        found = await rows(proxy, 3)
        self.assertEqual(
            [(r["http_method"], r["http_status"], r["error_message"]) for r in found],
            [("GET", "200", ""), ("GET", "200", ""), ("POST", "502", error)],
        )

    async def test_midstream_error_line(self) -> None:
        """
        A mid-stream C{{"error"}} line reaches the client as the stream's
        last line (the body ends properly); the row keeps 200 and carries
        Ollama's error text.
        """
        proxy = LiveProxy(self, token_delay=0.01)
        proxy.fake.inject(Fault.MIDSTREAM_ERROR, after_chunks=2)
        response = await within(http_client(self).post(proxy.url + "/api/chat", json={
            "model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}]}))
        lines = (await response.content()).splitlines()
        self.assertEqual(response.code, 200)
        self.assertEqual(len(lines), 3)
        self.assertEqual(
            lines[-1],
            b'{"error":"an error was encountered while running the model: fake runner failure"}',
        )
        [row] = await rows(proxy, 1)
        self.assertEqual(row["http_status"], "200")
        self.assertEqual(
            row["error_message"], "an error was encountered while running the model: fake runner failure"
        )


class ShutdownFaultTests(TestCase):
    async def test_shutdown_while_waiting_for_ollama(self) -> None:
        """
        At shutdown, past the grace period, a request still waiting for
        Ollama's headers and one still queued behind it both get a 503
        saying the proxy shut down, and rows that say the same (not a 502
        from the cancelled upstream request).
        """
        proxy = LiveProxy(self, args=["--grace-period", "0.2", "--max-concurrent", "1"])
        proxy.fake.inject(Fault.HANG_BEFORE_HEADERS)
        http = http_client(self)
        waiting = http.post(proxy.url + "/api/generate", json=GENERATE)
        await eventually(lambda: len(proxy.fake.received) == 1)
        queued = http.post(proxy.url + "/api/chat", json={"model": "llama3.2", "messages": []})
        await eventually(lambda: proxy.service.forwarder.gate.queued == 1)
        stopped = proxy.service.stopService()
        for pending in (waiting, queued):
            response = await within(pending)
            self.assertEqual(response.code, 503)
            self.assertEqual((await response.json())["error"], "proxy shut down before the request finished")
        await stopped
        self.assertEqual(
            sorted((r["endpoint"], r["http_status"], r["error_message"]) for r in proxy.rows()),
            [
                ("/api/chat", "503", "proxy shut down before the request finished"),
                ("/api/generate", "503", "proxy shut down before the request finished"),
            ],
        )
        self.assertEqual(len(proxy.fake.received), 1)


# Client faults.


class ClientFaultTests(TestCase):
    async def test_disconnect_before_headers(self) -> None:
        """
        A client that leaves while Ollama is still loading (no headers yet)
        gets a 499 row saying so, and the upstream connection is closed, so
        Ollama stops working on it (the load would take an hour).
        """
        proxy = LiveProxy(self, load_delay=3600.0)
        upstream_gone = proxy.fake.when_disconnected()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        pending = Agent(reactor, pool=pool).request(
            b"POST", proxy.url.encode() + b"/api/generate", Headers(),
            FileBodyProducer(BytesIO(b'{"model":"llama3.2","prompt":"slow"}')),
        )
        await eventually(lambda: len(proxy.fake.received) == 1)
        hang_up(pending)
        self.assertEqual(await within(upstream_gone), b"/api/generate")
        [row] = await rows(proxy, 1)
        self.assertEqual(row["http_status"], "499")
        self.assertEqual(row["error_message"], "client disconnected before the upstream answered")
        self.assertEqual(row["response_size_bytes"], "0")

    async def test_disconnect_mid_stream(self) -> None:
        """
        A client that leaves mid-stream leaves a row that keeps the 200 it
        was sent and says how many bytes it had been sent; the upstream
        connection is closed (long before the stream's natural end).
        """
        proxy = LiveProxy(self, token_delay=LONG_TOKEN_DELAY)
        upstream_gone = proxy.fake.when_disconnected()
        response = await within(
            http_client(self).post(proxy.url + "/api/generate", json=LONG_STREAM, unbuffered=True)
        )
        reader = HangUpAfter(300)
        response.deliverBody(reader)
        await within(reader.hung_up)
        self.assertEqual(await within(upstream_gone), b"/api/generate")
        [row] = await rows(proxy, 1)
        self.assertEqual(row["http_status"], "200")
        sent = int(row["response_size_bytes"])
        self.assertGreaterEqual(sent, len(reader.received))
        self.assertEqual(row["error_message"], f"client disconnected after {sent} bytes")

    async def test_disconnect_while_queued(self) -> None:
        """
        With --max-concurrent 1 and the slot taken by a long stream, a
        queued client that leaves gets a 499 row "while queued", and its
        request never reaches Ollama, not even once the slot is free.
        """
        proxy = LiveProxy(self, token_delay=LONG_TOKEN_DELAY, args=["--max-concurrent", "1"])
        http = http_client(self)
        long = await within(http.post(proxy.url + "/api/generate", json=LONG_STREAM, unbuffered=True))
        holder = HangUpAfter(None)
        long.deliverBody(holder)
        queued = http.post(proxy.url + "/api/chat", json={"model": "llama3.2", "messages": []})
        await eventually(lambda: proxy.service.forwarder.gate.queued == 1)
        hang_up(queued)
        [row] = await rows(proxy, 1)
        self.assertEqual((row["endpoint"], row["http_status"]), ("/api/chat", "499"))
        self.assertEqual(row["error_message"], "client disconnected while queued")
        self.assertEqual(proxy.service.forwarder.gate.queued, 0)
        # Free the slot: the request that left must not be sent now.
        upstream_gone = proxy.fake.when_disconnected()
        holder.hang_up()
        self.assertEqual(await within(upstream_gone), b"/api/generate")
        found = await rows(proxy, 2)
        self.assertEqual([r["endpoint"] for r in found], ["/api/chat", "/api/generate"])
        self.assertEqual([r.uri for r in proxy.fake.received], [b"/api/generate"])
        self.assertEqual(proxy.service.forwarder.gate.in_flight, 0)


def write_buffered(transport: Any) -> int:
    """
    Bytes a Twisted TCP transport holds in user space, not yet sent.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class SlowReader(Protocol):
    """
    An HTTP client that reads only when told to: its transport stays paused
    except for one read at a time, until it is told to read the rest.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data: list[bytes] = []
        self._reading: Deferred[None] | None = None
        self.trickle = True
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.write(self.request)

    def read_a_little(self) -> Deferred[None]:
        self._reading = Deferred()
        self.transport.resumeProducing()
        return self._reading

    def read_the_rest(self) -> Deferred[None]:
        self.trickle = False
        self.transport.resumeProducing()
        return self.closed

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)
        if self.trickle:
            self.transport.pauseProducing()
            reading, self._reading = self._reading, None
            if reading is not None:
                reading.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        self.closed.callback(None)


def watch_held(test: TestCase, proxy: LiveProxy) -> list[int]:
    """
    From now until the test ends, after every write the proxy makes to a
    client connection open now, the bytes that connection's transport
    holds in user space, not yet sent: every peak, not samples.
    """
    held: list[int] = []
    for channel in proxy.service.site.channels:
        transport = channel.transport
        for name in ("write", "writeSequence"):
            original = getattr(transport, name)

            def watched(data: Any, original: Any = original, transport: Any = transport) -> None:
                original(data)
                held.append(write_buffered(transport))

            test.patch(transport, name, watched)
    return held


def upstream_paused(proxy: LiveProxy) -> bool:
    """
    Whether the proxy has a response body coming from Ollama and is not
    reading its socket (it is out of the reactor's readers).
    """
    transports = [
        exchange._upstream_body._producer
        for exchange in proxy.service.forwarder.active
        if exchange._upstream_body is not None
    ]
    return bool(transports) and all(t not in reactor.getReaders() for t in transports)


async def congested(proxy: LiveProxy) -> None:
    """
    Cap the send buffer of the proxy's sockets to its clients at 64 kB, as
    on a congested network: left alone, Linux grows it to 4 MB and soaks up
    a whole response in the kernel.
    """
    await eventually(lambda: proxy.service.site.channels)
    for channel in proxy.service.site.channels:
        channel.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)


def generate_request(tokens: int, close: bool = False) -> bytes:
    body = b'{"model":"llama3.2","prompt":"x","options":{"num_predict":%d}}' % tokens
    return (
        b"POST /api/generate HTTP/1.1\r\nHost: proxy\r\n%sContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (b"Connection: close\r\n" if close else b"", len(body), body)
    )


# What the proxy may hold for one client in user space.
HELD_LIMIT = 512 * 1024


class SlowReaderTests(TestCase):
    async def test_slow_reader_does_not_make_the_proxy_buffer(self) -> None:
        """
        A client that reads a multi-megabyte stream at a trickle makes the
        proxy stop reading Ollama, not buffer the response.

        The proxy's socket to the client is L{congested}; the fake writes
        the whole ~3 MB stream at once.  While the client is paused, then
        reads one socket read (at most 64 kB) at a time, ten times, the
        proxy stops reading its upstream socket (it stays out of the
        reactor's readers, so the rest of the stream waits in the kernel's
        buffers between Ollama and the proxy, not in the proxy) and the
        response does not end.  After every write to the client, from the
        first to the last byte, the proxy holds under 512 kB for it in user
        space (its client transport's write buffer).  Afterwards the client
        reads everything: every line arrives, and the row is a clean 200.
        """
        tokens = 30_000
        proxy = LiveProxy(self, args=["--grace-period", "0.5"])
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port)
        reader = await connectProtocol(endpoint, SlowReader(generate_request(tokens, close=True)))
        await congested(proxy)
        held = watch_held(self, proxy)
        await eventually(lambda: upstream_paused(proxy))
        for _ in range(10):
            await within(reader.read_a_little())
            await eventually(lambda: upstream_paused(proxy))
            self.assertEqual(proxy.rows(), [], "the response ended while the client was trickling")
        self.assertLess(max(held), HELD_LIMIT)
        await within(reader.read_the_rest())
        self.assertLess(max(held), HELD_LIMIT)
        [response] = parse_responses(b"".join(reader.data))
        self.assertEqual(response.status, 200)
        self.assertEqual(len(response.body.splitlines()), tokens)
        [row] = await rows(proxy, 1)
        self.assertEqual((row["http_status"], row["error_message"], row["output_tokens"]), ("200", "", str(tokens)))
        self.assertEqual(int(row["response_size_bytes"]), len(response.body))

    async def test_slow_reader_of_pipelined_responses(self) -> None:
        """
        A slow reader that pipelines two large requests gets both responses
        whole, while the proxy holds under 512 kB for it and does not read
        Ollama while it waits, in the second response as in the first.
        (That the second response is paused from its first byte when the
        connection is already full is pinned in memory by
        L{PipelinedBackpressureTests}.)
        """
        tokens = 15_000
        proxy = LiveProxy(self, args=["--grace-period", "0.5"])
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port)
        pipelined = generate_request(tokens) + generate_request(tokens, close=True)
        reader = await connectProtocol(endpoint, SlowReader(pipelined))
        await congested(proxy)
        held = watch_held(self, proxy)
        for _ in range(300):
            if len(proxy.fake.received) == 2:
                break
            await within(reader.read_a_little())
        self.assertEqual(len(proxy.fake.received), 2)
        for _ in range(5):
            await eventually(lambda: upstream_paused(proxy))
            await within(reader.read_a_little())
        await within(reader.read_the_rest())
        self.assertLess(max(held), HELD_LIMIT)
        responses = parse_responses(b"".join(reader.data))
        self.assertEqual([r.status for r in responses], [200, 200])
        self.assertEqual([len(r.body.splitlines()) for r in responses], [tokens, tokens])
        found = await rows(proxy, 2)
        self.assertEqual([(r["http_status"], r["output_tokens"]) for r in found], [("200", str(tokens))] * 2)


# Log faults.


class LogFaultTests(TestCase):
    async def test_unwritable_log_degrades_then_catches_up(self) -> None:
        """
        While the CSV directory is gone (a regular file stands in its place,
        so it cannot be recreated, even by root), requests are still served,
        /health says "degraded" and /health/ready answers 503; once the
        directory is back, the rows kept in memory are written in order into
        a new file that parses, and health is back to ok.
        """
        proxy = LiveProxy(self)
        http = http_client(self)
        first = await http.get(proxy.url + "/api/version", headers={"X-Session-Id": "before"})
        await first.content()
        self.assertEqual([r["session_id"] for r in await rows(proxy, 1)], ["before"])

        shutil.rmtree(proxy.logs)
        with open(proxy.logs, "w") as f:
            f.write("not a directory\n")
        for n in range(3):
            response = await http.post(
                proxy.url + "/api/generate",
                json={**GENERATE, "stream": False, "options": {"num_predict": 3}},
                headers={"X-Session-Id": f"during-{n}"},
            )
            self.assertEqual(response.code, 200)
            self.assertEqual((await response.json())["eval_count"], 3)
        health = await http.get(proxy.url + "/health")
        self.assertEqual(health.code, 200)
        status = await health.json()
        self.assertEqual(status["status"], "degraded")
        self.assertEqual((status["log"]["writable"], status["log"]["rows_buffered"]), (False, 3))
        ready = await http.get(proxy.url + "/health/ready")
        self.assertEqual(ready.code, 503, await ready.text())
        self.assertTrue(any("CSV log not writable" in reason for reason in (await ready.json())["reasons"]))

        os.remove(proxy.logs)
        os.mkdir(proxy.logs)
        await eventually(lambda: proxy.service.csv_log.healthy)
        found = proxy.rows()  # (a new file that parses: header and column counts checked)
        self.assertEqual([r["session_id"] for r in found], ["during-0", "during-1", "during-2"])
        self.assertTrue(all(r["http_status"] == "200" and r["output_tokens"] == "3" for r in found))
        health = await http.get(proxy.url + "/health")
        self.assertEqual((await health.json())["status"], "ok")
        ready = await http.get(proxy.url + "/health/ready")
        self.assertEqual(ready.code, 200)
        await ready.content()


# Malformed HTTP from clients.

TLS_CLIENT_HELLO = (
    bytes.fromhex("16030100f4010000f00303") + bytes(range(32)) + b"\x00\x02\x13\x01\x01\x00\x00\xc5"
    + b"\x00" * 197
)

MALFORMED: list[tuple[str, bytes, list[int]]] = [
    ("garbage", b"\x00\xff\xfe garbage \x01\x02\r\n\r\n", [400]),
    ("garbage without a line end", b"\x00\xff\xfe garbage", [408]),
    ("request line with 3 spaces", b"GET / api/version HTTP/1.1\r\nHost: x\r\n\r\n", [400]),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [400]),
    ("TLS ClientHello", TLS_CLIENT_HELLO, [408]),
    ("NUL in a header value", b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", [400]),
    ("NUL in a header name", b"GET /api/version HTTP/1.1\r\nHost: x\r\nX\x00A: b\r\n\r\n", [400]),
    ("header line without colon", b"GET /api/version HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n", [400]),
    ("negative Content-Length", b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", [400]),
    ("huge Content-Length", b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\n", [413]),
    ("two Content-Lengths", b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", [400]),
    (
        "chunked and Content-Length",
        b"POST /api/show HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        [400],
    ),
    (
        "chunk size not hex",
        b"POST /api/show HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n",
        [400],
    ),
    (
        "pipelined, the second broken",
        b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1 junk\r\n\r\n",
        [200, 400],
    ),
]


class MalformedHttpTests(TestCase):
    async def test_malformed_requests_leave_the_proxy_healthy(self) -> None:
        """
        Malformed HTTP on a real socket gets a 4xx (408 for bytes that never
        form a line, after the header deadline) and a closed connection;
        after each, /health answers and the CSV parses with every row
        complete.  Requests that reached the proxy's resource (too large, a
        bad chunk, the good half of a pipeline) have their row.
        """
        self.patch(ProxyChannel, "headerTimeout", 0.5)
        proxy = LiveProxy(self)
        http = http_client(self)
        for name, payload, statuses in MALFORMED:
            client = await connect(self, proxy.port)
            client.send(payload)
            await client.when_closed()
            # Status lines; one may follow a Content-Length body directly.
            answers = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", client.received)]
            self.assertEqual(answers, statuses, f"{name}: {client.received!r}")
            health = await within(http.get(proxy.url + "/health"))
            self.assertEqual(health.code, 200, name)
            await health.content()
            csv_rows(proxy.csv)  # the header, and every row whole
        self.assertEqual(
            [(r["http_method"], r["endpoint"], r["http_status"], r["error_message"]) for r in proxy.rows()],
            [
                ("POST", "/api/chat", "413", "request body is larger than the limit of 104857600 bytes"),
                ("POST", "/api/show", "400", "malformed chunked request body"),
                ("GET", "/api/version", "200", ""),
            ],
        )


class FullTransport(StringTransport):
    """
    A client connection whose peer reads nothing: like a TCP transport, it
    tells its producer to pause once its buffer passes 64 kB, and, never
    drained, never tells it to resume.
    """

    told_to_pause = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and not self.told_to_pause and len(self.value()) > 64 * 1024:
            self.told_to_pause = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))


class PipelinedBackpressureTests(SynchronousTestCase):
    def test_response_starting_on_a_full_connection_is_paused(self) -> None:
        """
        A response that starts while the client's connection is already
        full (the client pipelined it behind a large response it is not
        reading) is paused from its first byte: the transport said "full"
        once, during the first response, and will not say it again, so
        without this the second response would be buffered whole.
        """
        clock = Clock()
        fake = FakeOllama(clock)
        agent = RequestTraversalAgent(fake.resource())
        forwarder = Forwarder(agent=agent, upstream=UPSTREAM, clock=clock, monotonic=clock.seconds)
        site = ProxySite(Root(forwarder, {}), reactor=clock)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = FullTransport()
        protocol.makeConnection(transport)
        states: dict[bytes, str] = {}
        pause_, resume_ = Exchange.pauseProducing, Exchange.resumeProducing

        def pausing(exchange: Exchange) -> None:
            states[exchange._request.uri] = "paused"
            pause_(exchange)

        def resuming(exchange: Exchange) -> None:
            states[exchange._request.uri] = "producing"
            resume_(exchange)

        self.patch(Exchange, "pauseProducing", pausing)
        self.patch(Exchange, "resumeProducing", resuming)
        big = b'{"model":"llama3.2","prompt":"x","options":{"num_predict":2000}}'
        small = b'{"model":"llama3.2","prompt":"x","options":{"num_predict":5}}'
        protocol.dataReceived(
            b"POST /api/generate?first HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
            b"POST /api/generate?second HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
            % (len(big), big, len(small), small)
        )
        for _ in range(20):
            agent.flush()
        # (The in-memory upstream ignores pauses, so both responses end.)
        self.assertEqual([r.uri for r in fake.received], [b"/api/generate?first", b"/api/generate?second"])
        self.assertTrue(transport.told_to_pause)
        self.assertEqual(
            states, {b"/api/generate?first": "paused", b"/api/generate?second": "paused"}
        )
        protocol.connectionLost(Failure(ConnectionDone()))


class StalledClientTests(SynchronousTestCase):
    def test_client_that_stops_reading_is_given_up_on(self) -> None:
        """
        A client whose connection stays full (it reads nothing) for the
        client timeout is cut, its upstream request closed, and its row
        written: it cannot hold its slot, or Ollama's, for ever.
        """
        from ollamaproxy.gate import Gate

        proxy = InMemoryProxy(token_delay=1.0, gate=Gate(1, 10), limits=Limits(client_timeout=5, idle_timeout=100))
        pending = proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 50}})
        proxy.advance(1)
        reading = treq.collect(self.successResultOf(pending), lambda data: None)
        proxy.flush()
        [exchange] = proxy.forwarder.active
        exchange.pauseProducing()  # what Twisted does when the client's socket is full
        proxy.advance(4.9)
        self.assertEqual(proxy.records.all, [])
        proxy.advance(0.2)
        record = proxy.records.only
        self.assertEqual(record.http_status, 200)
        self.assertEqual(record.error_message, "client read nothing for 5 s; gave up")
        self.assertEqual(proxy.fake.disconnects, [b"/api/generate"])
        self.assertEqual(proxy.forwarder.gate.in_flight, 0)
        self.failureResultOf(reading, ResponseFailed)

    def test_reading_again_restores_the_upstream_idle_clock(self) -> None:
        """
        A client that pauses and resumes in time is not cut; the upstream's
        idle timeout applies again.
        """
        proxy = InMemoryProxy(token_delay=1.0, limits=Limits(client_timeout=5, idle_timeout=100))
        pending = proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 8}})
        proxy.advance(1)
        done = treq.collect(self.successResultOf(pending), lambda data: None)
        [exchange] = proxy.forwarder.active
        exchange.pauseProducing()
        proxy.advance(4)
        exchange.resumeProducing()
        for _ in range(10):
            proxy.advance(1)
        self.successResultOf(done)
        self.assertEqual(proxy.records.only.error_message, "")


def connected(proxy: InMemoryProxy) -> tuple[ProxyChannel, StringTransport]:
    """
    A client connection to C{proxy}'s site, in memory, on its clock.
    """
    site = ProxySite(proxy.root, reactor=proxy.clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


class SlowUploadTests(SynchronousTestCase):
    def test_a_long_upload_is_not_a_header_timeout(self) -> None:
        """
        Ollama answers only once a body is in: a streamed upload that takes
        longer than the header timeout, but keeps arriving, is not cut.
        """
        proxy = InMemoryProxy(limits=Limits(header_timeout=10))
        channel, transport = connected(proxy)
        channel.dataReceived(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        proxy.flush()
        self.assertEqual(len(proxy.forwarder.active), 1)
        pieces = [b'{"model": "llama3.2", ', b'"prompt": "slow", ', b'"options": {}, ', b'"stream": false}']
        for piece in pieces:
            proxy.advance(6)  # 24 s in all, never 10 s without a byte
            channel.dataReceived(chunk(piece))
            proxy.flush()
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"0\r\n\r\n")
        proxy.flush()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"), transport.value()[:100])
        [received] = proxy.fake.received
        self.assertEqual(received.body, b"".join(pieces))
        self.assertEqual((proxy.records.only.http_status, proxy.records.only.error_message), (200, ""))

    def test_an_upload_that_stops_is_a_header_timeout(self) -> None:
        """
        The header timeout still counts while an upload has stopped: 504.
        """
        proxy = InMemoryProxy(limits=Limits(header_timeout=10))
        channel, transport = connected(proxy)
        channel.dataReceived(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + chunk(b'{"model": "llama3.2", ')
        )
        proxy.advance(9.9)
        self.assertEqual(transport.value(), b"")
        proxy.advance(0.1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 504 "), transport.value()[:100])
        self.assertEqual(proxy.records.only.http_status, 504)
        self.assertEqual(proxy.fake.received, [])


class ClientLeavesMidUploadTests(SynchronousTestCase):
    def test_leaving_mid_upload_is_499(self) -> None:
        """
        A client that hangs up halfway through a streamed body has left: its
        row says 499, not an error of its body.
        """
        proxy = InMemoryProxy()
        channel, transport = connected(proxy)
        channel.dataReceived(
            b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (4 * 1024 * 1024)
            + b'{"model":"llama3.2","messages":[{"role":"user","content":"' + b"x" * 200_000
        )
        proxy.flush()
        self.assertEqual(len(proxy.forwarder.active), 1)
        channel.connectionLost(Failure(ConnectionLost()))
        proxy.flush()
        record = proxy.records.only
        self.assertEqual(record.http_status, 499)
        self.assertTrue(record.error_message.startswith("client disconnected"), record.error_message)
        self.assertEqual(record.model, "")
        self.assertEqual(proxy.forwarder.active, set())
        self.assertEqual(proxy.fake.received, [])
