"""
Hostile input, in memory: random methods, request targets, headers and
bodies thrown as raw bytes at the proxy's real server side (L{ProxySite},
L{ProxyChannel}, L{ProxyRequest}, L{Root}, the L{Forwarder}) in front of the
fake Ollama.  Whatever arrives, nothing escapes, the client gets an answer,
every request that reached the proxy leaves exactly one CSV row that reads
back whole, and the next client is served.
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from ollamaproxy.bodies import with_usage_requested
from ollamaproxy.csvlog import CsvLog
from ollamaproxy.facts import USAGE_INJECTABLE
from ollamaproxy.proxy import Forwarder
from ollamaproxy.record import COLUMNS
from ollamaproxy.resource import Root
from ollamaproxy.site import ProxySite
from ollamaproxy.testing.fake_ollama import FakeOllama

from .support import UPSTREAM, WALL, Records

# FUZZ_EXAMPLES=5000 fuzzes longer than the suite's default.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "100")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_FIELD_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
_STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5]\d\d ")

tokens = st.text(alphabet=_TCHAR, min_size=1, max_size=16).map(str.encode)

methods = st.one_of(
    st.sampled_from(
        [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"PRI", b"get"]
    ),
    tokens,
    # Junk: anything but the bytes that end or split a request line.
    st.binary(min_size=1, max_size=12).filter(lambda b: not set(b) & {0x20, 0x0D, 0x0A}),
)

_SEGMENTS = st.sampled_from(
    [b"api", b"generate", b"chat", b"v1", b"chat", b"completions", b"health", b"%68ealth", b".", b"..",
     b"%2e", b"%2E%2e", b"%2F", b"%5c", b"%00", b"%", b"%zz", b"%ff", b"%C3%A9", b"\xff", b"", b"blobs",
     b"sha256:" + b"0" * 64, b"messages"]
)
paths = st.one_of(
    st.sampled_from(
        [b"/api/generate", b"/api/chat", b"/api/tags", b"/api/version", b"/v1/chat/completions",
         b"/v1/messages", b"/api/blobs/sha256:" + b"1" * 64, b"*", b"/"]
    ),
    st.lists(_SEGMENTS, max_size=6).map(lambda parts: b"/" + b"/".join(parts)),
    st.binary(max_size=40).map(lambda b: b"/" + b.replace(b"\r", b"").replace(b"\n", b"")),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.tuples(st.sampled_from([b"http://", b"https://", b"//"]), tokens, _SEGMENTS).map(
        lambda t: t[0] + t[1] + b"/" + t[2]
    ),
    tokens.map(lambda host: host + b":443"),
).flatmap(
    lambda path: st.one_of(
        st.just(path),
        st.binary(max_size=20).map(lambda q: path + b"?" + q.replace(b"\r", b"").replace(b"\n", b"")),
    )
)

_NAMES = st.one_of(
    tokens,
    st.sampled_from(
        [b"Host", b"Connection", b"Content-Type", b"X-Forwarded-For", b"X-Session-Id", b"User-Agent",
         b"Upgrade", b"TE", b"Trailer", b"Keep-Alive", b"Proxy-Authorization", b"Authorization",
         b"Expect", b"Accept-Encoding", b"X-Forwarded-Host", b"Cookie"]
    ),
)
_VALUES = st.one_of(
    st.lists(st.sampled_from(_FIELD_BYTES), max_size=60).map(bytes).map(bytes.strip),
    st.sampled_from([b"close", b"keep-alive, Upgrade", b"100-continue", b"h2c", b"chunked", b"=cmd|' /C calc'!A0"]),
    st.integers(1000, 80_000).map(lambda n: b"v" * n),
)
headers = st.lists(st.tuples(_NAMES, _VALUES), max_size=8).flatmap(
    # Duplicates: repeat some of the headers.
    lambda pairs: st.lists(st.sampled_from(pairs), max_size=3).map(lambda extra: pairs + extra)
    if pairs else st.just(pairs)
)

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=2000),
    _json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["llama3.2", "all-minilm", "", "nope"]), "prompt": st.text(max_size=20)},
        optional={
            "stream": st.one_of(st.booleans(), st.none(), st.integers()),
            "options": st.dictionaries(st.sampled_from(["num_predict", "temperature", "x"]), _json, max_size=2),
            "messages": _json,
            "stream_options": _json,
        },
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 20_000).map(lambda depth: b'{"model":' + b"[" * depth + b"]" * depth + b"}"),
    st.integers(1, 20_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.sampled_from([b'{"model":"\xff\xfe"}', b"\xc3\x28", b'{"model":"llama3.2","prompt":"\xed\xa0\x80"}']),
)
framings = st.sampled_from(["length", "chunked", "none"])


class CountingRoot(Root):
    """
    The real root, counting the requests that reach it.
    """

    rendered = 0

    def render(self, request: Request) -> Any:
        self.rendered += 1
        return super().render(request)


class Harness:
    """
    The proxy's server side on L{StringTransport}s, its forwarder on the
    fake Ollama in memory, records kept and written to a real CSV log.
    """

    def __init__(self, directory: str) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.fake = FakeOllama(self.clock)
        self.agent = RequestTraversalAgent(self.fake.resource())
        self.records = Records()
        self.csv_log = CsvLog(directory, clock=self.clock, wall=lambda: WALL)
        self.csv_log.startService()
        self.forwarder = Forwarder(
            agent=self.agent,
            upstream=UPSTREAM,
            clock=self.clock,
            sinks=[self.records, self.csv_log],
            monotonic=self.clock.seconds,
            wall=lambda: WALL,
        )
        self.root = CountingRoot(self.forwarder, {})
        self.site = ProxySite(self.root, reactor=self.clock)

    def connect(self) -> tuple[Any, StringTransport]:
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, raw: bytes) -> tuple[Any, StringTransport]:
        protocol, transport = self.connect()
        protocol.dataReceived(raw)
        self.flush()
        return protocol, transport

    def flush(self) -> None:
        for _ in range(10):
            self.agent.flush()
            self.clock.advance(0)

    def close(self) -> None:
        self.csv_log.stopService()


def frame(method: bytes, target: bytes, pairs: list[tuple[bytes, bytes]], body: bytes, framing: str) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in pairs]
    if framing == "length" or (framing == "none" and body):
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in _pieces(body) if piece)
        payload += b"0\r\n\r\n"
    else:
        payload = b""
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def _pieces(body: bytes) -> list[bytes]:
    return [body[i:i + 700] for i in range(0, len(body), 700)]


class FuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.failures: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "log_failure" in event:
                self.failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def check(self, harness: Harness, raw: bytes) -> None:
        """
        Send C{raw} on a new connection and check every invariant.
        """
        protocol, transport = harness.send(raw)
        answer = transport.value()
        self.assertTrue(
            _STATUS_LINE.match(answer) or transport.disconnecting,
            f"no answer and not closed: {raw[:300]!r} -> {answer[:300]!r}",
        )
        self.assertEqual(self.failures, [], f"unhandled error for {raw[:300]!r}")
        for status in re.findall(rb"HTTP/1\.1 (\d\d\d) ", answer):
            event(f"answered {status.decode()}")
        event(f"{harness.root.rendered} reached the resource")
        self.assertEqual(harness.forwarder.active, set(), f"request still in flight: {raw[:300]!r}")
        self.assertEqual(len(harness.records.all), harness.root.rendered, f"rows != requests: {raw[:300]!r}")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(harness.records.all), harness.root.rendered)

        # The next client is served.
        protocol, transport = harness.send(b"GET /api/version HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"), transport.value()[:300])
        self.assertIn(b'{"version":"0.12.6"}', transport.value())
        protocol.connectionLost(Failure(ConnectionDone()))

        # Every row reads back whole.
        harness.csv_log.stopService()
        with open(harness.csv_log.path, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))
        self.assertEqual(table[0], list(COLUMNS))
        self.assertEqual(len(table) - 1, len(harness.records.all))
        self.assertTrue(all(len(row) == len(COLUMNS) for row in table))
        self.assertEqual([row[1] for row in table[1:]], [r.request_id for r in harness.records.all])

    @FUZZ
    @given(method=methods, target=paths, pairs=headers, body=bodies, framing=framings)
    def test_random_requests(
        self, method: bytes, target: bytes, pairs: list[tuple[bytes, bytes]], body: bytes, framing: str
    ) -> None:
        """
        Any request (random method, target, headers and body, framed with a
        Content-Length, chunked, or not at all) is answered or its
        connection closed, with no unhandled error; each one that reached
        the proxy's resource leaves exactly one row, the CSV reads back
        whole, and the next client is served.
        """
        harness = Harness(self.mktemp())
        self.check(harness, frame(method, target, pairs, body, framing))

    @FUZZ
    @given(
        requests=st.lists(
            st.tuples(methods, paths, headers, bodies, st.sampled_from(["length", "chunked"])),
            min_size=2,
            max_size=4,
        ),
        junk=st.binary(max_size=30),
    )
    def test_random_pipelines(self, requests: list[tuple[Any, ...]], junk: bytes) -> None:
        """
        Several random requests pipelined on one connection, then junk: the
        same holds, and each request that reached the resource has one row.
        """
        harness = Harness(self.mktemp())
        raw = b"".join(frame(*request) for request in requests) + junk
        self.check(harness, raw)

    @FUZZ
    @given(
        target=st.sampled_from(
            [b"/api/generate", b"/api/chat", b"/api/embed", b"/api/embeddings", b"/api/show", b"/api/pull",
             b"/api/create", b"/api/copy", b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings",
             b"/v1/responses", b"/v1/messages"]
        ),
        body=bodies,
        framing=st.sampled_from(["length", "chunked"]),
    )
    def test_random_bodies_on_every_route(self, target: bytes, body: bytes, framing: str) -> None:
        """
        Random bodies (bytes, JSON, JSON nested 20000 deep, invalid UTF-8)
        posted to every route that reads one, whole or chunked, are
        forwarded and answered with no unhandled error, one row each.
        """
        harness = Harness(self.mktemp())
        self.check(harness, frame(b"POST", target, [(b"Host", b"proxy")], body, framing))
        # It, then the check's GET /api/version.
        self.assertEqual(harness.root.rendered, 2)
        sent = harness.fake.received[0].body
        if sent != body:
            # Usage asked for on the client's behalf, and nothing else.
            self.assertIn(target, USAGE_INJECTABLE)
            self.assertEqual(sent, with_usage_requested(body))

    def test_example_is_answered_as_ollama_would(self) -> None:
        """
        The harness itself works: a plain generate through the real server
        side streams the fake's answer and leaves one row.
        """
        harness = Harness(self.mktemp())
        body = b'{"model":"llama3.2","prompt":"hi","options":{"num_predict":3}}'
        _, transport = harness.send(frame(b"POST", b"/api/generate", [], body, "length"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(transport.value().count(b'"done":'), 3)
        [record] = harness.records.all
        self.assertEqual((record.http_status, record.output_tokens), (200, 3))
