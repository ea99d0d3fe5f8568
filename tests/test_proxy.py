"""
The proxy is invisible: every request reaches the fake Ollama as the client
sent it, and every response comes back as Ollama wrote it, chunk by chunk.
"""

from __future__ import annotations

import json

import treq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from ollamaproxy.proxy import Limits
from ollamaproxy.testing.fake_ollama import Fault

from .support import InMemoryProxy

GENERATE = {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}]}

# Every route of the table in ollama-api.md, and a few Ollama does not have.
ROUTES = [
    ("GET", "/", None),
    ("HEAD", "/", None),
    ("GET", "/api/version", None),
    ("HEAD", "/api/tags", None),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("POST", "/api/show", {"model": "llama3.2"}),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "hello"}),
    ("POST", "/api/generate", GENERATE),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": ""}),
    ("POST", "/api/chat", CHAT),
    ("POST", "/api/chat", {**CHAT, "stream": False}),
    ("POST", "/api/embed", {"model": "all-minilm", "input": ["a", "b"]}),
    ("POST", "/api/embeddings", {"model": "all-minilm", "prompt": "a"}),
    ("POST", "/api/pull", {"model": "llama3.2"}),
    ("POST", "/api/pull", {"model": "llama3.2", "stream": False}),
    ("POST", "/api/push", {"model": "llama3.2"}),
    ("POST", "/api/create", {"model": "mine", "from": "llama3.2"}),
    ("POST", "/api/copy", {"source": "llama3.2", "destination": "copy"}),
    ("DELETE", "/api/delete", {"model": "llama3.2"}),
    ("HEAD", "/api/blobs/sha256:" + "0" * 64, None),
    ("POST", "/v1/chat/completions", {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/v1/chat/completions", {"model": "llama3.2", "stream": True, "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/v1/chat/completions", {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/v1/chat/completions", {"model": "llama3.2", "stream": True, "stream_options": {"include_usage": False}, "messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/v1/completions", {"model": "llama3.2", "prompt": "Hi", "stream": True}),
    ("POST", "/v1/embeddings", {"model": "all-minilm", "input": "Hi"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/llama3.2:latest", None),
    ("POST", "/v1/responses", {"model": "llama3.2", "input": "Hi", "stream": True}),
    ("POST", "/v1/messages", {"model": "llama3.2", "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}], "stream": True}),
    ("GET", "/api/nothing-here", None),
    ("GET", "/api/generate", None),
    ("POST", "/api/chat", b"{not json"),
    ("POST", "/api/chat", None),
    ("GET", "/api/tags/", None),
]

_VARYING = {b"date", b"x-request-id"}


def comparable(headers: Headers) -> list[tuple[bytes, list[bytes]]]:
    return sorted(
        (name.lower(), values)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in _VARYING
    )


class InvisibleTests(SynchronousTestCase):
    def test_every_route_looks_the_same_through_the_proxy(self) -> None:
        """
        For every Ollama route (and unknown ones), the status, headers and
        body bytes through the proxy equal those straight from Ollama.
        """
        for method, path, body in ROUTES:
            proxied_side, direct_side = InMemoryProxy(), InMemoryProxy()
            direct = direct_side.send(self, method, path, body, via=direct_side.direct)
            proxied = proxied_side.send(self, method, path, body)
            where = f"{method} {path} {body!r}"
            self.assertEqual(proxied.code, direct.code, where)
            self.assertEqual(proxied.phrase, direct.phrase, where)
            self.assertEqual(comparable(proxied.headers), comparable(direct.headers), where)
            self.assertEqual(
                proxied_side.read(self, proxied), direct_side.read(self, direct), where
            )
            self.assertEqual(len(proxied_side.records.all), 1, where)


class RequestFidelityTests(SynchronousTestCase):
    def test_body_bytes_and_query_pass_untouched(self) -> None:
        """
        Bodies reach Ollama byte for byte (odd whitespace, invalid JSON,
        non-UTF-8), and query strings are kept.
        """
        for body in (
            b' {\n "model" :"llama3.2",  "prompt":"x"}\t\n',
            b"{not json",
            b"\xff\xfe\x00binary",
            b"",
        ):
            proxy = InMemoryProxy()
            proxy.send(self, "POST", "/api/generate?x=1&y=%20", body)
            [received] = proxy.fake.received
            self.assertEqual(received.body, body)
            self.assertEqual(received.uri, b"/api/generate?x=1&y=%20")

    def test_host_is_rewritten_and_forwarded_headers_set(self) -> None:
        """
        Ollama sees its own host:port in Host (it refuses others when bound
        to loopback); the client's host and address go in X-Forwarded-*.
        """
        proxy = InMemoryProxy(check_host=True)
        response = proxy.send(
            self, "GET", "/api/tags", headers={b"host": [b"ollama.example.com"], b"x-forwarded-for": [b"198.51.100.1"]}
        )
        self.assertEqual(response.code, 200)
        headers = proxy.fake.received[0].headers
        self.assertEqual(headers.getRawHeaders(b"host"), [b"127.0.0.1:11434"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-host"), [b"ollama.example.com"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for"), [b"198.51.100.1, 127.0.0.1"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-proto"), [b"http"])

    def test_hop_by_hop_headers_are_not_forwarded(self) -> None:
        """
        Connection, Keep-Alive, TE, Upgrade, Proxy-* and headers named by
        Connection stay between the client and the proxy; others pass.
        """
        proxy = InMemoryProxy()
        proxy.send(
            self,
            "POST",
            "/api/show",
            {"model": "llama3.2"},
            headers={
                b"connection": [b"keep-alive, x-private"],
                b"x-private": [b"secret"],
                b"keep-alive": [b"timeout=5"],
                b"te": [b"trailers"],
                b"upgrade": [b"h2c"],
                b"proxy-authorization": [b"Basic abc"],
                b"authorization": [b"Bearer for-ollama"],
                b"x-custom": [b"kept"],
            },
        )
        headers = proxy.fake.received[0].headers
        for name in (b"x-private", b"keep-alive", b"te", b"upgrade", b"proxy-authorization"):
            self.assertFalse(headers.hasHeader(name), name)
        # The agent's own connection management, never the client's.
        self.assertNotIn(b"x-private", b"".join(headers.getRawHeaders(b"connection", [])))
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer for-ollama"])
        self.assertEqual(headers.getRawHeaders(b"x-custom"), [b"kept"])

    def test_request_id_header_names_the_row(self) -> None:
        """
        Every response carries X-Request-Id, the request_id of its CSV row.
        """
        proxy = InMemoryProxy()
        response = proxy.send(self, "GET", "/api/tags")
        self.assertEqual(
            response.headers.getRawHeaders(b"x-request-id"), [proxy.records.only.request_id.encode()]
        )


class StreamingTests(SynchronousTestCase):
    def test_client_holds_chunk_one_before_chunk_two_exists(self) -> None:
        """
        Each NDJSON line reaches the client as soon as Ollama writes it: the
        client has line 1 while Ollama has not written line 2.
        """
        proxy = InMemoryProxy(token_delay=1.0)
        pending = proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 3}})
        proxy.flush()
        self.assertNoResult(pending)  # headers come with the first chunk, as from Ollama
        proxy.advance(1.0)
        response = self.successResultOf(pending)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        proxy.flush()
        self.assertEqual(len(b"".join(chunks).splitlines()), 1)
        self.assertNoResult(done)
        proxy.advance(1.0)
        self.assertEqual(len(b"".join(chunks).splitlines()), 2)
        proxy.advance(1.0)
        proxy.advance(1.0)
        self.successResultOf(done)
        lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
        self.assertTrue(lines[-1]["done"])
        self.assertNotIn(b"\n\n", b"".join(chunks))

    def test_sse_events_arrive_one_by_one(self) -> None:
        """
        /v1 streams pass event by event too, even while the proxy strips the
        usage event it asked for.
        """
        proxy = InMemoryProxy(token_delay=1.0)
        pending = proxy.start(
            "POST", "/v1/chat/completions",
            {"model": "llama3.2", "stream": True, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]},
        )
        proxy.advance(1.0)
        chunks: list[bytes] = []
        done = treq.collect(self.successResultOf(pending), chunks.append)
        proxy.flush()
        self.assertEqual(b"".join(chunks).count(b"data: "), 1)
        for _ in range(6):
            proxy.advance(1.0)
        self.successResultOf(done)
        body = b"".join(chunks)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertNotIn(b'"usage"', body)
        self.assertEqual(proxy.records.only.output_tokens, 3)


class UpstreamFailureTests(SynchronousTestCase):
    def test_header_timeout_gives_504(self) -> None:
        """
        No response headers within the header timeout: 504, in the route
        family's error shape, and the upstream request is abandoned.
        """
        proxy = InMemoryProxy(limits=Limits(header_timeout=30))
        proxy.fake.inject(Fault.HANG_BEFORE_HEADERS)
        pending = proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"})
        proxy.advance(29)
        self.assertNoResult(pending)
        proxy.advance(1)
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 504)
        self.assertIn("no response headers within 30 s", json.loads(proxy.read(self, response))["error"])
        record = proxy.records.only
        self.assertEqual(record.http_status, 504)

    def test_idle_upstream_mid_stream_is_cut(self) -> None:
        """
        An upstream silent for the idle timeout mid-stream is given up on;
        the client's response ends abnormally and the row says why.
        """
        proxy = InMemoryProxy(token_delay=1.0, limits=Limits(idle_timeout=10))
        proxy.fake.inject(Fault.HANG_MIDSTREAM, after_chunks=2)
        pending = proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"})
        proxy.advance(1)
        response = self.successResultOf(pending)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        proxy.advance(1)
        proxy.advance(9)
        self.assertNoResult(done)
        proxy.advance(1)
        self.failureResultOf(done)
        self.assertEqual(len(b"".join(chunks).splitlines()), 2)
        record = proxy.records.only
        self.assertEqual(record.http_status, 200)
        self.assertIn("sent nothing for 10 s", record.error_message)

    def test_mid_stream_error_line_passes_and_counts_as_failure(self) -> None:
        """
        Ollama's mid-stream {"error"} line reaches the client unchanged (its
        clients raise on it) and the row records the error under status 200.
        """
        proxy = InMemoryProxy()
        proxy.fake.inject(Fault.MIDSTREAM_ERROR, after_chunks=2)
        response = proxy.send(self, "POST", "/api/chat", CHAT)
        lines = proxy.read(self, response).splitlines()
        self.assertIn("error", json.loads(lines[-1]))
        record = proxy.records.only
        self.assertEqual(record.http_status, 200)
        self.assertEqual(record.error_message, json.loads(lines[-1])["error"])

    def test_upstream_error_status_passes_through(self) -> None:
        """
        Ollama's own error statuses and bodies come back as they are.
        """
        proxy = InMemoryProxy()
        proxy.fake.inject(Fault.status(500, "llama runner process has terminated"))
        response = proxy.send(self, "POST", "/api/generate", GENERATE)
        self.assertEqual(response.code, 500)
        self.assertEqual(json.loads(proxy.read(self, response)), {"error": "llama runner process has terminated"})
        self.assertEqual(proxy.records.only.error_message, "llama runner process has terminated")

    def test_queue_full_503_passes_through(self) -> None:
        """
        Ollama's 503 reaches the client as 503 (the OpenAI SDK retries it).
        """
        proxy = InMemoryProxy()
        proxy.fake.inject(Fault.QUEUE_FULL)
        response = proxy.send(self, "POST", "/v1/chat/completions", {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(response.code, 503)
        self.assertIn("maximum pending requests exceeded", proxy.records.only.error_message)
