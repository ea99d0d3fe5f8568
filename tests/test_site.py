"""
The server side in memory: when a request is rendered, how its body gets
to the upstream, and the channel's own limits.  These also pin the few
private attributes of Twisted's HTTPChannel that ollamaproxy.site relies
on: a Twisted release that renames them fails here first.
"""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ollamaproxy.auth import ApiKeys
from ollamaproxy.proxy import Forwarder
from ollamaproxy.resource import Root
from ollamaproxy.site import BUFFERED_BODY_LIMIT, ProxyChannel, ProxySite, StreamingBody
from ollamaproxy.testing.fake_ollama import FakeOllama
from ollamaproxy.upstream import Upstream

from .support import Records

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Recorder(Resource):
    """
    Remembers each request as it is rendered, and answers only when asked.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def render(self, request: Any) -> Any:
        self.seen.append((request.method, request.uri, request.body))
        self.request = request
        return NOT_DONE_YET


def connect(site: ProxySite) -> tuple[ProxyChannel, StringTransport]:
    channel = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    channel.makeConnection(transport)
    return channel, transport


class TwistedInternalsTests(SynchronousTestCase):
    def test_channel_attributes_the_site_relies_on(self) -> None:
        """
        HTTPChannel still keeps the request line and its parsing state in
        the attributes ProxyRequest and ProxyChannel read.
        """
        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST /api/chat HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual(
            (channel._command, channel._path, channel._version),
            (b"POST", b"/api/chat", b"HTTP/1.1"),
        )
        for name in ("_receivedHeaderSize", "_handlingRequest", "_waitingForTransport", "_buffer", "line_mode"):
            self.assertTrue(hasattr(channel, name), name)
        channel.connectionLost(None)


class BodyModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = Recorder()
        self.site = ProxySite(self.resource, reactor=MemoryReactorClock())
        self.channel, self.transport = connect(self.site)

    def test_small_body_is_read_whole_first(self) -> None:
        """
        A body with a Content-Length up to 1 MiB is collected, then the
        request is rendered with it as bytes.
        """
        self.channel.dataReceived(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        self.assertEqual(self.resource.seen, [])
        self.channel.dataReceived(b"cde")
        self.assertEqual(self.resource.seen, [(b"POST", b"/api/chat", b"abcde")])

    def test_large_or_chunked_body_streams(self) -> None:
        """
        A larger body, or a chunked one, is rendered as soon as the headers
        are in; its bytes follow through a StreamingBody.
        """
        length = BUFFERED_BODY_LIMIT + 1
        self.channel.dataReceived(
            b"POST /api/blobs/sha256:00?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length
        )
        [(method, uri, body)] = self.resource.seen
        self.assertEqual((method, uri), (b"POST", b"/api/blobs/sha256:00?x=1"))
        self.assertIsInstance(body, StreamingBody)
        self.assertEqual(self.resource.request.args, {b"x": [b"1"]})
        self.channel.dataReceived(b"z" * 1000)
        self.assertEqual(body.received, 1000)
        self.assertFalse(body.complete)

        other = connect(self.site)[0]
        other.dataReceived(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunked = self.resource.seen[-1][2]
        self.assertIsInstance(chunked, StreamingBody)
        other.dataReceived(b"3\r\nabc\r\n0\r\n\r\n")
        self.assertTrue(chunked.complete)
        self.assertEqual(chunked.received, 3)


class EarlyAnswerTests(SynchronousTestCase):
    def test_rest_of_an_unread_body_is_never_taken_for_a_request(self) -> None:
        """
        When the proxy answers before the body is in (here, 401 for a missing
        key), the connection closes after the answer: the rest of the body,
        even if it looks like a request, is never parsed as one.
        """
        clock = MemoryReactorClock()
        fake = FakeOllama(clock)
        records = Records()
        forwarder = Forwarder(
            agent=RequestTraversalAgent(fake.resource()),
            upstream=Upstream(b"http://127.0.0.1:11434"),
            clock=clock,
            sinks=[records],
            keys=ApiKeys([("alice", "secret")]),
        )
        site = ProxySite(Root(forwarder, {}), reactor=clock)
        channel, transport = connect(site)
        smuggled = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"
        channel.dataReceived(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(smuggled), smuggled))
        reply = transport.value()
        self.assertTrue(reply.startswith(b"HTTP/1.1 401 "), reply[:40])
        self.assertIn(b"Connection: close", reply)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(reply.count(b"HTTP/1.1 "), 1)
        self.assertEqual(len(records.all), 1)
        self.assertEqual(fake.received, [])


class ChannelLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.site = ProxySite(Recorder(), reactor=self.clock, timeout=60)

    def test_headers_must_arrive_within_the_deadline(self) -> None:
        """
        A client that sends its headers a byte now and then, never going
        quiet long enough for the idle timeout, is cut at the header
        deadline with 408.
        """
        channel, transport = connect(self.site)
        for byte in b"GET /api/tags HTTP/1.1\r\nHost: x":
            channel.dataReceived(bytes([byte]))
            self.clock.advance(1)
            if transport.disconnecting:
                break
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(self.clock.seconds(), ProxyChannel.headerTimeout + 1)

    def test_idle_timeout_applies_again_between_requests(self) -> None:
        """
        After a response, an idle keep-alive connection is closed after the
        client timeout.
        """
        channel, transport = connect(self.site)
        channel.dataReceived(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        request = self.site.resource.request
        request.setHeader(b"content-length", b"2")
        request.write(b"{}")
        request.finish()
        self.assertFalse(transport.disconnecting)
        self.clock.advance(61)
        self.assertTrue(transport.disconnecting)

    def test_too_many_or_too_large_headers_get_400(self) -> None:
        """
        More than 100 headers, or more than 64 KiB of them, are refused.
        """
        for headers in (
            b"".join(b"X-%d: y\r\n" % n for n in range(101)),
            b"X-Big: " + b"y" * 15000 + b"\r\n" + b"X-Big2: " + b"y" * 15000 + b"\r\n"
            + b"X-Big3: " + b"y" * 15000 + b"\r\n" + b"X-Big4: " + b"y" * 15000 + b"\r\n"
            + b"X-Big5: " + b"y" * 15000 + b"\r\n",
        ):
            channel, transport = connect(self.site)
            channel.dataReceived(b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value()[:40])
            self.assertTrue(transport.disconnecting)

