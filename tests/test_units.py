"""
The small parts: routing decisions, request facts, admission, host
sampling, API keys and client addresses.
"""

from __future__ import annotations

import ipaddress
import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from ollamaproxy.auth import ApiKeys, parse_key, read_keys_file
from ollamaproxy.facts import facts_for, fields_of, parse_object
from ollamaproxy.forwarded import ClientAddress
from ollamaproxy.gate import Gate, QueueFull
from ollamaproxy.routes import Family, decoded_path, error_body, family
from ollamaproxy.sampler import HostSampler


class RoutesTests(SynchronousTestCase):
    def test_refused_targets(self) -> None:
        """
        Absolute-form, authority-form, '*', dot segments (raw or
        percent-encoded), backslashes and NUL are refused.
        """
        for target in (
            b"http://elsewhere/api/tags",
            b"elsewhere:443",
            b"*",
            b"/api/../health",
            b"/api/%2e%2e/health",
            b"/api/%2E./x",
            b"/./api/tags",
            b"/api\\tags",
            b"/api/%00",
        ):
            self.assertIsNone(decoded_path(target), target)

    def test_paths_are_percent_decoded_and_query_dropped(self) -> None:
        """
        Decisions use the decoded path, without the query string.
        """
        self.assertEqual(decoded_path(b"/api%2Fchat?x=1"), b"/api/chat")
        self.assertEqual(decoded_path(b"/v1/models/hf.co%2Fa%2Fb"), b"/v1/models/hf.co/a/b")

    def test_families_and_error_shapes(self) -> None:
        """
        /v1 errors are OpenAI-shaped, /v1/messages Anthropic-shaped, the rest
        Ollama-shaped.
        """
        self.assertEqual(family(b"/api/chat"), Family.NATIVE)
        self.assertEqual(family(b"/v1/chat/completions"), Family.OPENAI)
        self.assertEqual(family(b"/v1/messages"), Family.ANTHROPIC)
        _, native = error_body(Family.NATIVE, 502, "down")
        self.assertEqual(json.loads(native), {"error": "down"})
        _, openai = error_body(Family.OPENAI, 404, "gone")
        self.assertEqual(
            json.loads(openai),
            {"error": {"message": "gone", "type": "not_found_error", "param": None, "code": None}},
        )
        _, anthropic = error_body(Family.ANTHROPIC, 503, "busy")
        self.assertEqual(
            json.loads(anthropic),
            {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
        )


class FactsTests(SynchronousTestCase):
    def facts(self, path: bytes, body: object):
        parsed = parse_object(json.dumps(body).encode())
        return facts_for(path, fields_of(parsed) if parsed is not None else None)

    def test_native_stream_defaults_to_true(self) -> None:
        """
        Native generate/chat/pull/push/create stream unless "stream": false.
        """
        self.assertTrue(self.facts(b"/api/generate", {"model": "m"}).wants_stream)
        self.assertTrue(self.facts(b"/api/pull", {"model": "m", "stream": None}).wants_stream)
        self.assertFalse(self.facts(b"/api/chat", {"model": "m", "stream": False}).wants_stream)
        self.assertFalse(self.facts(b"/api/embed", {"model": "m"}).wants_stream)

    def test_openai_streams_only_when_asked(self) -> None:
        """
        /v1 streams only with "stream": true.
        """
        self.assertFalse(self.facts(b"/v1/chat/completions", {"model": "m"}).wants_stream)
        self.assertTrue(self.facts(b"/v1/chat/completions", {"model": "m", "stream": True}).wants_stream)

    def test_model_names(self) -> None:
        """
        model, else the legacy name; source for copy; the path for
        /v1/models/<m>; empty when none is named.
        """
        self.assertEqual(self.facts(b"/api/show", {"name": "old"}).model, "old")
        self.assertEqual(self.facts(b"/api/copy", {"source": "a", "destination": "b"}).model, "a")
        self.assertEqual(facts_for(b"/v1/models/llama3.2:latest", None).model, "llama3.2:latest")
        self.assertEqual(self.facts(b"/api/tags", {}).model, "")
        self.assertEqual(self.facts(b"/api/chat", {"MODEL": "folded"}).model, "folded")

    def test_parameters_are_compact_sorted_json(self) -> None:
        """
        Native: options plus format, keep_alive, think, raw, truncate; /v1:
        the sampling fields.  Sorted keys, no spaces, empty when none.
        """
        native = self.facts(
            b"/api/generate",
            {"model": "m", "options": {"top_k": 5, "temperature": 0.2}, "keep_alive": "5m",
             "think": True, "prompt": "ignored"},
        )
        self.assertEqual(native.parameters, '{"keep_alive":"5m","temperature":0.2,"think":true,"top_k":5}')
        openai = self.facts(
            b"/v1/chat/completions",
            {"model": "m", "temperature": 1, "max_tokens": 9, "messages": [], "stream_options": {"include_usage": True}},
        )
        self.assertEqual(openai.parameters, '{"max_tokens":9,"temperature":1}')
        self.assertTrue(openai.asked_for_usage)
        self.assertEqual(self.facts(b"/api/chat", {"model": "m"}).parameters, "")

    def test_hostile_bodies_yield_no_facts(self) -> None:
        """
        Invalid JSON, invalid UTF-8, non-objects and absurd nesting are not
        facts, and do not raise.
        """
        for body in (b"{", b"\xff\xfe", b"[1]", b'"x"', b"[" * 100000 + b"]" * 100000):
            self.assertIsNone(parse_object(body))


class GateTests(SynchronousTestCase):
    def test_no_limit_never_queues(self) -> None:
        """
        Without a limit every request is admitted at once.
        """
        gate = Gate(None, 0)
        for _ in range(1000):
            self.assertIsNone(gate.enter())

    def test_fifo_queue_and_full_queue(self) -> None:
        """
        Past the limit requests wait in arrival order; past the queue limit
        they are refused.
        """
        gate = Gate(1, 2)
        self.assertIsNone(gate.enter())
        first, second = gate.enter(), gate.enter()
        self.assertRaises(QueueFull, gate.enter)
        order = []
        first.addCallback(lambda _: order.append("first"))
        second.addCallback(lambda _: order.append("second"))
        gate.leave()
        self.assertEqual(order, ["first"])
        gate.leave()
        self.assertEqual(order, ["first", "second"])
        gate.leave()
        self.assertEqual(gate.in_flight, 0)

    def test_leaving_the_queue(self) -> None:
        """
        A cancelled waiter leaves the queue and never takes a slot.
        """
        gate = Gate(1, 5)
        gate.enter()
        leaver, stayer = gate.enter(), gate.enter()
        leaver.cancel()
        self.failureResultOf(leaver, CancelledError)
        self.assertEqual(gate.queued, 1)
        gate.leave()
        self.successResultOf(stayer)
        self.assertEqual(gate.in_flight, 1)


class SamplerTests(SynchronousTestCase):
    def test_samples_every_second_and_survives_errors(self) -> None:
        """
        The first sample comes one interval after start (psutil's first CPU
        reading means nothing), then each second; a failing sample is logged
        once and the loop keeps running.
        """
        clock = Clock()
        readings = iter([(10.0, 20.0), RuntimeError("boom"), RuntimeError("boom"), (30.0, 40.0)])

        def sample() -> tuple[float, float]:
            value = next(readings)
            if isinstance(value, Exception):
                raise value
            return value

        warnings: list[dict] = []
        observer = lambda event: event["log_level"] >= LogLevel.warn and warnings.append(event)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        sampler = HostSampler(clock, sample)
        sampler.startService()
        self.addCleanup(sampler.stopService)
        self.assertEqual((sampler.cpu, sampler.memory), (None, None))
        clock.advance(1)
        self.assertEqual((sampler.cpu, sampler.memory), (10.0, 20.0))
        clock.advance(1)
        clock.advance(1)
        self.assertEqual((sampler.cpu, sampler.memory), (10.0, 20.0))
        self.assertEqual(len(warnings), 1)
        clock.advance(1)
        self.assertEqual((sampler.cpu, sampler.memory), (30.0, 40.0))


class ApiKeyTests(SynchronousTestCase):
    def test_bearer_and_x_api_key(self) -> None:
        """
        Either header identifies the key by name; a wrong secret does not.
        """
        keys = ApiKeys([("alice", "s3cret"), ("bob", "other")])
        self.assertEqual(keys.identify(Headers({b"authorization": [b"Bearer s3cret"]})), "alice")
        self.assertEqual(keys.identify(Headers({b"x-api-key": [b"other"]})), "bob")
        self.assertIsNone(keys.identify(Headers({b"authorization": [b"Bearer s3cre"]})))
        self.assertIsNone(keys.identify(Headers({b"authorization": [b"Basic s3cret"]})))
        self.assertIsNone(keys.identify(Headers()))

    def test_key_syntax_and_files(self) -> None:
        """
        Keys are NAME:SECRET; a keys file skips blanks and comments and names
        the bad line.
        """
        self.assertEqual(parse_key(" ci : tok:with:colons "), ("ci", "tok:with:colons"))
        self.assertRaises(ValueError, parse_key, "nocolon")
        self.assertRaises(ValueError, parse_key, ":secret")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# team keys\n\nalice:one\nbob:two\n")
        self.assertEqual(read_keys_file(path), [("alice", "one"), ("bob", "two")])
        with open(path, "a") as f:
            f.write("broken\n")
        error = self.assertRaises(ValueError, read_keys_file, path)
        self.assertIn(":5:", str(error))


class ClientAddressTests(SynchronousTestCase):
    def request(self, peer: str, forwarded: str | None) -> DummyRequest:
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", peer, 1234)
        if forwarded is not None:
            request.requestHeaders.setRawHeaders(b"x-forwarded-for", [forwarded.encode()])
        return request

    def test_forwarded_for_ignored_from_untrusted_peers(self) -> None:
        """
        Without trusted proxies, or from an untrusted peer, the peer is the
        client whatever X-Forwarded-For claims.
        """
        self.assertEqual(ClientAddress()(self.request("203.0.113.9", "1.2.3.4")), "203.0.113.9")
        trusted = ClientAddress([ipaddress.ip_network("10.0.0.0/8")])
        self.assertEqual(trusted(self.request("203.0.113.9", "1.2.3.4")), "203.0.113.9")

    def test_last_untrusted_hop(self) -> None:
        """
        From a trusted proxy, the client is the rightmost untrusted hop.
        """
        trusted = ClientAddress([ipaddress.ip_network("10.0.0.0/8")])
        self.assertEqual(trusted(self.request("10.0.0.1", "6.6.6.6, 198.51.100.7, 10.0.0.2")), "198.51.100.7")
        self.assertEqual(trusted(self.request("10.0.0.1", "10.0.0.3")), "10.0.0.3")
        self.assertEqual(trusted(self.request("10.0.0.1", "junk, 10.0.0.3")), "10.0.0.3")
        self.assertEqual(trusted(self.request("10.0.0.1", None)), "10.0.0.1")
