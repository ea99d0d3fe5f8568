"""
Bad input over raw sockets: bodies over the limit, clients that stall,
and requests that are not HTTP.  After each the proxy still answers and
the CSV file still parses.
"""

from __future__ import annotations

import hashlib
import json

from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase
from twisted.web.http import HTTPChannel

from ollamaproxy.record import COLUMNS
from ollamaproxy.site import ProxyChannel

from .rawhttp import RawClient, captured_log, chunk, connect
from .support import LiveProxy, csv_rows, eventually, http_client

LIMIT = 1000
STATUS = COLUMNS.index("http_status")
ERROR = COLUMNS.index("error_message")
TOO_LARGE = f"request body is larger than the limit of {LIMIT} bytes"


def head(method: bytes, target: bytes, *headers: bytes) -> bytes:
    """
    A request's head: request line, Host, C{headers}, blank line.
    """
    return method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


class RawSocketTestCase(TestCase):
    async def still_serving(self, proxy: LiveProxy) -> list[list[str]]:
        """
        The proxy answers /health, and its CSV file reads back whole; the
        rows (without the header).
        """
        response = await http_client(self).get(proxy.url + "/health")
        self.assertEqual(response.code, 200)
        await response.content()
        return csv_rows(proxy.csv)

    def assert_json_error(self, client: RawClient, status: int, message: str) -> None:
        [response] = [r for r in client.responses if r.status >= 200]
        self.assertEqual(response.status, status)
        self.assertEqual(response.header(b"content-type"), b"application/json; charset=utf-8")
        self.assertEqual(json.loads(response.body), {"error": message})


class BodyLimitTests(RawSocketTestCase):
    """
    --max-body-bytes, over real sockets.
    """

    def proxy(self) -> LiveProxy:
        return LiveProxy(self, args=["--max-body-bytes", str(LIMIT)])

    async def test_content_length_over_the_limit_gets_413_at_once(self) -> None:
        """
        A Content-Length over the limit gets a 413 JSON error as soon as the
        headers are in, and the connection closes, while the client has sent
        only a sliver of the body; the upstream sees nothing; one row each.
        This holds for lengths the proxy would otherwise read whole before
        answering, and for absurd ones.
        """
        proxy = self.proxy()
        lengths = [LIMIT + 1, 5000, 800_000, 2 * 1024 * 1024, 10**15]
        for length in lengths:
            client = await connect(self, proxy.port)
            client.send(head(b"POST", b"/api/chat", b"Content-Length: %d" % length) + b'{"model": "llama3.2"')
            await client.when_closed()
            self.assert_json_error(client, 413, TOO_LARGE)
            self.assertEqual(client.responses[0].header(b"connection"), b"close")
        self.assertEqual(proxy.fake.received, [])
        rows = await self.still_serving(proxy)
        self.assertEqual([(row[STATUS], row[ERROR]) for row in rows], [("413", TOO_LARGE)] * len(lengths))

    async def test_413_in_the_route_familys_shape(self) -> None:
        """
        The 413 comes in the shape the route's clients parse: OpenAI's on
        /v1, Anthropic's C{request_too_large} on /v1/messages.
        """
        proxy = self.proxy()
        bodies = {}
        for path in (b"/v1/chat/completions", b"/v1/messages"):
            client = await connect(self, proxy.port)
            client.send(head(b"POST", path, b"Content-Length: 5000") + b"{")
            await client.when_closed()
            bodies[path] = json.loads(client.responses[0].body)
        self.assertEqual(bodies[b"/v1/chat/completions"]["error"]["message"], TOO_LARGE)
        self.assertEqual(
            bodies[b"/v1/messages"],
            {"type": "error", "error": {"type": "request_too_large", "message": TOO_LARGE}},
        )
        self.assertEqual(len(await self.still_serving(proxy)), 2)

    async def test_expect_100_continue_over_the_limit_gets_413_without_100(self) -> None:
        """
        A request that asks C{Expect: 100-continue} with a Content-Length
        over the limit gets the 413 and never a 100 Continue; one within the
        limit gets the 100 Continue and goes through.
        """
        proxy = self.proxy()
        for length in (5000, 5 * 1024 * 1024):
            client = await connect(self, proxy.port)
            client.send(head(b"POST", b"/api/chat", b"Content-Length: %d" % length, b"Expect: 100-continue"))
            await client.when_closed()
            self.assertEqual([r.status for r in client.responses], [413])
        body = json.dumps({"model": "llama3.2", "messages": [], "stream": False}).encode()
        client = await connect(self, proxy.port)
        client.send(head(b"POST", b"/api/chat", b"Content-Length: %d" % len(body), b"Expect: 100-continue"))
        await eventually(lambda: [r.status for r in client.responses] == [100])
        client.send(body)
        self.assertEqual((await client.response()).status, 200)
        rows = await self.still_serving(proxy)
        self.assertEqual([row[STATUS] for row in rows], ["413", "413", "200"])

    async def test_chunked_body_growing_past_the_limit_gets_413(self) -> None:
        """
        A chunked body that grows past the limit gets 413 and a closed
        connection the moment it does, and the upstream request already
        under way is abandoned before Ollama ever sees the request.
        """
        proxy = self.proxy()
        client = await connect(self, proxy.port)
        client.send(head(b"POST", b"/api/generate", b"Transfer-Encoding: chunked") + chunk(b'{"model": "llama3.2", "prompt": "'))
        await eventually(lambda: len(proxy.service.forwarder.active) == 1)
        for _ in range(3):
            client.send(chunk(b"x" * 400))
        await client.when_closed()
        self.assert_json_error(client, 413, TOO_LARGE)
        self.assertEqual(proxy.service.forwarder.active, set())
        self.assertEqual(proxy.fake.received, [])
        [row] = await self.still_serving(proxy)
        self.assertEqual(row[STATUS], "413")
        self.assertGreater(int(row[COLUMNS.index("request_size_bytes")]), LIMIT)

    async def test_a_body_of_exactly_the_limit_passes(self) -> None:
        """
        The limit is inclusive: a body of exactly that many bytes, with a
        Content-Length or chunked, is forwarded whole.
        """
        proxy = self.proxy()
        body = json.dumps({"model": "llama3.2", "prompt": "hi", "stream": False}).encode()
        body = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
        for framing, payload in (
            (b"Content-Length: %d" % LIMIT, body),
            (b"Transfer-Encoding: chunked", chunk(body[:600]) + chunk(body[600:]) + b"0\r\n\r\n"),
        ):
            client = await connect(self, proxy.port)
            client.send(head(b"POST", b"/api/generate", framing) + payload)
            self.assertEqual((await client.response()).status, 200)
        self.assertEqual([r.body for r in proxy.fake.received], [body, body])
        rows = await self.still_serving(proxy)
        self.assertEqual([row[STATUS] for row in rows], ["200", "200"])

    async def test_blob_uploads_are_exempt(self) -> None:
        """
        A blob upload under /api/blobs/ larger than the limit is forwarded
        whole, with a Content-Length or chunked.
        """
        proxy = self.proxy()
        for size, chunked in ((50 * LIMIT, False), (3 * LIMIT, True)):
            blob = bytes(range(256)) * (size // 256)
            target = b"/api/blobs/sha256:" + hashlib.sha256(blob).hexdigest().encode()
            client = await connect(self, proxy.port)
            if chunked:
                client.send(head(b"POST", target, b"Transfer-Encoding: chunked") + chunk(blob) + b"0\r\n\r\n")
            else:
                client.send(head(b"POST", target, b"Content-Length: %d" % len(blob)) + blob)
            self.assertEqual((await client.response()).status, 201)
        self.assertEqual([r.body_length for r in proxy.fake.received], [50 * LIMIT // 256 * 256, 3 * LIMIT // 256 * 256])
        rows = await self.still_serving(proxy)
        self.assertEqual([row[STATUS] for row in rows], ["201", "201"])


class StreamedBodyTests(RawSocketTestCase):
    """
    Bodies the proxy streams upstream rather than reading whole.
    """

    async def test_a_body_complete_before_the_upstream_connection_passes(self) -> None:
        """
        A chunked body that has arrived whole before the upstream connection
        is ready (a small one, on new upstream connections) is forwarded
        whole, not answered 502.
        """
        proxy = LiveProxy(self)
        body = json.dumps({"model": "llama3.2", "prompt": "hi", "stream": False}).encode()
        clients = [await connect(self, proxy.port) for _ in range(3)]
        for client in clients:
            client.send(head(b"POST", b"/api/generate", b"Transfer-Encoding: chunked") + chunk(body) + b"0\r\n\r\n")
        for client in clients:
            self.assertEqual((await client.response()).status, 200)
        self.assertEqual([r.body for r in proxy.fake.received], [body] * 3)
        rows = await self.still_serving(proxy)
        self.assertEqual([(row[STATUS], row[COLUMNS.index("model")]) for row in rows], [("200", "llama3.2")] * 3)


class SlowClientTests(RawSocketTestCase):
    """
    Clients that take too long, over real sockets.
    """

    async def test_headers_that_never_end_are_cut_at_the_deadline(self) -> None:
        """
        A client that trickles header bytes, each in time for the idle
        timeout, is answered 408 and cut once the header deadline passes.
        """
        self.patch(ProxyChannel, "headerTimeout", 0.3)
        proxy = LiveProxy(self)
        client = await connect(self, proxy.port)
        client.send(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n")
        trickle = LoopingCall(client.send, b"X")
        trickle.clock = reactor
        trickle.start(0.05)
        self.addCleanup(lambda: trickle.running and trickle.stop())
        await client.when_closed()
        self.assertEqual(client.received, b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
        self.assertEqual(proxy.fake.received, [])
        self.assertEqual(await self.still_serving(proxy), [])

    async def test_a_client_silent_mid_body_is_cut(self) -> None:
        """
        A client that goes silent halfway through its body is disconnected
        after --client-timeout, whether the proxy was collecting the body
        (nothing to answer yet: Twisted logs it) or already streaming it
        upstream (that request is abandoned and answered 408, with its row).
        """
        proxy = LiveProxy(self, args=["--client-timeout", "0.3"])
        answers = []
        for length in (100, 2 * 1024 * 1024):
            client = await connect(self, proxy.port)
            client.send(head(b"POST", b"/api/chat", b"Content-Length: %d" % length) + b'{"model":')
            await client.when_closed()
            answers.append(client.received[:12])
        self.assertEqual(answers, [b"", b"HTTP/1.1 408"])
        self.assertEqual(proxy.fake.received, [])
        self.assertEqual(proxy.service.forwarder.active, set())
        [row] = await self.still_serving(proxy)
        self.assertEqual((row[STATUS], row[ERROR]), ("408", "client sent nothing for 0.3 s mid-body"))


class MalformedRequestTests(RawSocketTestCase):
    """
    Requests that are not valid HTTP/1.1, over real sockets.
    """

    async def refused(self, proxy: LiveProxy, request: bytes) -> bytes:
        client = await connect(self, proxy.port)
        client.send(request)
        await client.when_closed()
        return client.received

    async def test_header_limits(self) -> None:
        """
        More than 100 headers, more than 64 KiB of them, or one header line
        over 16 KiB get 400 and a closed connection; 100 headers and 60 KiB
        of them pass.
        """
        # The fake runs on Twisted, whose 16 KiB default is lower than
        # Ollama's (Go's 1 MiB); ProxyChannel sets its own limit.
        self.patch(HTTPChannel, "totalHeadersSize", 1024 * 1024)
        log = captured_log(self)
        proxy = LiveProxy(self)
        for headers in (
            [b"X-H%d: v" % i for i in range(101)],
            [b"X-H%d: %s" % (i, b"v" * 8000) for i in range(9)],
            [b"X-Long: " + b"v" * 20_000],
        ):
            received = await self.refused(proxy, head(b"GET", b"/api/tags", *headers))
            self.assertTrue(received.startswith(b"HTTP/1.1 400 "), received[:100])
        for headers in (
            [b"X-H%d: v" % i for i in range(99)],
            [b"X-H%d: %s" % (i, b"v" * 7500) for i in range(8)],
        ):
            client = await connect(self, proxy.port)
            client.send(head(b"GET", b"/api/tags", *headers))
            self.assertEqual((await client.response()).status, 200)
        self.assertEqual(len(proxy.fake.received), 2)
        self.assertEqual(len([line for line in log if "Refused a malformed request" in line]), 3)
        rows = await self.still_serving(proxy)
        self.assertEqual([row[STATUS] for row in rows], ["200", "200"])

    async def test_malformed_requests_get_400_and_a_log_line(self) -> None:
        """
        Malformed request lines, invalid header names and bytes, and
        ambiguous body framing (the stuff of request smuggling) get 400, a
        log line, and a closed connection; nothing reaches the upstream.
        """
        log = captured_log(self)
        proxy = LiveProxy(self)
        requests = [
            b"GARBAGE\r\n\r\n",
            b"GET /api/tags\r\n\r\n",
            b"GET /api/tags HTTP/2.0\r\n\r\n",
            b"GET /api/tags HTTP/1.1 extra\r\n\r\n",
            b"GET  /api/tags HTTP/1.1\r\n\r\n",
            b"G(T /api/tags HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            head(b"GET", b"/api/tags", b"Bad Name: x"),
            head(b"GET", b"/api/tags", b"X-Nul: a\x00b"),
            head(b"GET", b"/api/tags", b"No colon here"),
            head(b"GET", b"/api/tags", b"X-\x01: x"),
            head(b"GET", b"/api/tags", b": empty name"),
            head(b"POST", b"/api/chat", b"Content-Length: abc"),
            head(b"POST", b"/api/chat", b"Content-Length: -1"),
            head(b"POST", b"/api/chat", b"Content-Length: 5", b"Content-Length: 6"),
            head(b"POST", b"/api/chat", b"Content-Length: 5", b"Transfer-Encoding: chunked"),
            head(b"POST", b"/api/chat", b"Transfer-Encoding: chunked", b"Content-Length: 5"),
            head(b"POST", b"/api/chat", b"Transfer-Encoding: gzip, chunked"),
            head(b"POST", b"/api/chat", b"Transfer-Encoding: xchunked"),
        ]
        for request in requests:
            received = await self.refused(proxy, request)
            self.assertTrue(received.startswith(b"HTTP/1.1 400 "), (request, received[:100]))
        self.assertEqual(proxy.fake.received, [])
        self.assertEqual(len([line for line in log if "Refused a malformed request" in line]), len(requests))
        self.assertEqual(await self.still_serving(proxy), [])

    async def test_bad_chunked_body_mid_stream_gets_a_row(self) -> None:
        """
        A chunked body that turns malformed after the request was already
        on its way upstream gets 400, a closed connection and a 400 row;
        the upstream never sees the request.
        """
        log = captured_log(self)
        proxy = LiveProxy(self)
        for bad in (b"zz\r\n", b"5\r\nabcdefgh\r\n", b"-1\r\n"):
            client = await connect(self, proxy.port)
            client.send(head(b"POST", b"/api/generate", b"Transfer-Encoding: chunked") + chunk(b'{"model": "llama3.2", '))
            await eventually(lambda: len(proxy.service.forwarder.active) == 1)
            client.send(bad)
            await client.when_closed()
            self.assert_json_error(client, 400, "malformed chunked request body")
        self.assertEqual(proxy.fake.received, [])
        self.assertEqual(len([line for line in log if "Refused a malformed request" in line]), 3)
        rows = await self.still_serving(proxy)
        self.assertEqual([row[STATUS] for row in rows], ["400"] * 3)
