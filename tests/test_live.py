"""
What only a real network shows: chunk timing, disconnects, resets, pooling,
streamed uploads, and the official clients, over loopback sockets.
"""

from __future__ import annotations

import json
import socket
import time

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed

from ollamaproxy.testing.fake_ollama import Fault

from .support import LiveProxy, free_port, http_client, in_reactor_thread




class StreamingOverSocketsTests(TestCase):
    async def test_chunks_arrive_as_they_are_generated(self) -> None:
        """
        Over real sockets each line arrives about one token delay after the
        previous one, not all at the end.
        """
        proxy = LiveProxy(self, token_delay=0.1)
        response = await http_client(self).post(
            proxy.url + "/api/generate",
            json={"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 4}},
            unbuffered=True,
        )
        arrivals: list[tuple[float, bytes]] = []
        await treq.collect(response, lambda data: arrivals.append((time.monotonic(), data)))
        lines = b"".join(data for _, data in arrivals).splitlines()
        self.assertEqual(len(lines), 4)
        first, last = arrivals[0][0], arrivals[-1][0]
        self.assertGreater(last - first, 0.2, "lines arrived in one burst")
        [row] = proxy.rows()
        self.assertEqual(row["output_tokens"], "4")
        self.assertEqual(row["stream_mode"], "true")

    async def test_client_disconnect_closes_the_upstream_connection(self) -> None:
        """
        When the client goes away mid-stream, the proxy closes its upstream
        connection at once (Ollama then stops generating); the row says so.
        """
        proxy = LiveProxy(self, token_delay=0.05)
        upstream_gone = proxy.fake.when_disconnected()
        response = await http_client(self).post(
            proxy.url + "/api/chat",
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "go"}], "options": {"num_predict": 1000}},
            unbuffered=True,
        )
        got_data: Deferred[None] = Deferred()
        response.deliverBody(_FirstChunkThenHangUp(got_data))
        await got_data
        started = time.monotonic()
        await upstream_gone
        self.assertLess(time.monotonic() - started, 1.0)
        await deferLater(reactor, 0.05, lambda: None)
        [row] = proxy.rows()
        self.assertEqual(row["http_status"], "200")
        self.assertRegex(row["error_message"], r"client disconnected after \d+ bytes")

    async def test_upstream_reset_mid_stream_cuts_the_client_response(self) -> None:
        """
        If Ollama's connection resets mid-stream, the client's chunked body
        is not terminated, so the client can tell it was cut.
        """
        proxy = LiveProxy(self, token_delay=0.01)
        proxy.fake.inject(Fault.RESET_MIDSTREAM, after_chunks=2)
        response = await http_client(self).post(
            proxy.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}, unbuffered=True
        )
        with self.assertRaises(ResponseFailed):
            await treq.content(response)
        await deferLater(reactor, 0.05, lambda: None)
        [row] = proxy.rows()
        self.assertIn("upstream connection lost", row["error_message"])


class _FirstChunkThenHangUp:
    def __init__(self, got_data: Deferred[None]) -> None:
        self._got_data = got_data

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        if not self._got_data.called:
            self.transport.stopProducing()
            self._got_data.callback(None)

    def connectionLost(self, reason) -> None:
        pass


class UnreachableUpstreamTests(TestCase):
    async def test_refused_connection_gives_502_naming_the_upstream(self) -> None:
        """
        Nothing listening upstream: 502 with an Ollama-shaped error saying
        where; /v1 routes get the OpenAI shape.
        """
        proxy = LiveProxy(self, args=["--ollama-url", f"http://127.0.0.1:{free_port()}"])
        http = http_client(self)
        native = await http.get(proxy.url + "/api/tags")
        self.assertEqual(native.code, 502)
        error = (await native.json())["error"]
        self.assertIn("unreachable: connection refused", error)
        self.assertIn("127.0.0.1", error)
        openai = await http.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": []})
        self.assertEqual(openai.code, 502)
        body = await openai.json()
        self.assertEqual(body["error"]["type"], "api_error")
        self.assertEqual([row["http_status"] for row in proxy.rows()], ["502", "502"])


class OfficialClientTests(TestCase):
    async def test_ollama_python_client_through_the_proxy(self) -> None:
        """
        The official ollama client works through the proxy: generate, chat,
        embed, list, show and pull, streamed and not; each call leaves a row
        with its model and tokens.
        """
        import ollama

        proxy = LiveProxy(self)
        api = ollama.Client(host=proxy.url)

        def session() -> dict[str, object]:
            results: dict[str, object] = {}
            results["generate"] = api.generate(model="llama3.2", prompt="Why?", options={"num_predict": 5})
            results["generate_stream"] = list(api.generate(model="llama3.2", prompt="Why?", stream=True))
            results["chat"] = api.chat(model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
            results["chat_stream"] = list(api.chat(model="llama3.2", messages=[{"role": "user", "content": "Hi"}], stream=True))
            results["embed"] = api.embed(model="all-minilm", input=["a", "b"])
            results["list"] = api.list()
            results["show"] = api.show("llama3.2")
            results["pull"] = api.pull("llama3.2")
            results["pull_stream"] = list(api.pull("llama3.2", stream=True))
            return results

        results = await in_reactor_thread(session)
        self.assertEqual(results["generate"].eval_count, 5)
        self.assertTrue(results["generate_stream"][-1].done)
        self.assertEqual(results["chat"].message.role, "assistant")
        self.assertTrue(results["chat_stream"][-1].done)
        self.assertEqual(len(results["embed"].embeddings), 2)
        self.assertIn("llama3.2:latest", [m.model for m in results["list"].models])
        self.assertEqual(results["pull"].status, "success")
        self.assertEqual(results["pull_stream"][-1].status, "success")
        rows = proxy.rows()
        self.assertEqual(
            [(row["endpoint"], row["model"], row["stream_mode"]) for row in rows],
            [
                ("/api/generate", "llama3.2", "false"),
                ("/api/generate", "llama3.2", "true"),
                ("/api/chat", "llama3.2", "false"),
                ("/api/chat", "llama3.2", "true"),
                ("/api/embed", "all-minilm", "false"),
                ("/api/tags", "", "false"),
                ("/api/show", "llama3.2", "false"),
                ("/api/pull", "llama3.2", "false"),
                ("/api/pull", "llama3.2", "true"),
            ],
        )
        self.assertEqual(rows[0]["output_tokens"], "5")
        self.assertTrue(all(row["user_agent"].startswith("ollama-python/") for row in rows))
        self.assertTrue(all(row["http_status"] == "200" and not row["error_message"] for row in rows))

    async def test_ollama_client_sees_errors_as_ollama_would(self) -> None:
        """
        A missing model comes back as the client's ResponseError with
        Ollama's text and status; a dead upstream as a 502 ResponseError
        naming it.
        """
        import ollama

        proxy = LiveProxy(self)
        api = ollama.Client(host=proxy.url)

        def missing_model() -> Exception:
            try:
                api.generate(model="nope", prompt="x")
            except ollama.ResponseError as e:
                return e
            raise AssertionError("no error")

        error = await in_reactor_thread(missing_model)
        self.assertEqual(error.status_code, 404)
        self.assertEqual(error.error, "model 'nope' not found")
        self.assertEqual(proxy.rows()[0]["error_message"], "model 'nope' not found")

    async def test_openai_client_through_the_proxy(self) -> None:
        """
        The openai client works through the proxy: chat completions streamed
        and not, embeddings, models.  Streamed usage is logged although the
        client did not ask for it, and the client never sees it.
        """
        import openai

        proxy = LiveProxy(self)
        api = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Hi"}]

        def session() -> dict[str, object]:
            return {
                "chat": api.chat.completions.create(model="llama3.2", messages=messages, max_tokens=4),
                "stream": list(api.chat.completions.create(model="llama3.2", messages=messages, max_tokens=4, stream=True)),
                "embeddings": api.embeddings.create(model="all-minilm", input=["a"]),
                "models": api.models.list(),
            }

        results = await in_reactor_thread(session)
        self.assertEqual(results["chat"].usage.completion_tokens, 4)
        chunks = results["stream"]
        self.assertTrue(all(chunk.usage is None for chunk in chunks))
        self.assertTrue(all(chunk.choices for chunk in chunks))
        self.assertEqual(len(results["embeddings"].data), 1)
        self.assertIn("llama3.2:latest", [m.id for m in results["models"].data])
        rows = proxy.rows()
        self.assertEqual([row["endpoint"] for row in rows], ["/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models"])
        self.assertEqual((rows[1]["stream_mode"], rows[1]["output_tokens"]), ("true", "4"))
        self.assertTrue(rows[1]["input_tokens"])


class StreamedUploadTests(TestCase):
    async def test_large_json_body_streams_and_is_still_read_for_the_log(self) -> None:
        """
        A 3 MB chat body (an image) goes to Ollama byte for byte, streamed
        rather than collected, and the row still names its model and
        parameters, read from the body as it passed.
        """
        import hashlib

        proxy = LiveProxy(self)
        body = json.dumps(
            {
                "model": "llama3.2",
                "messages": [{"role": "user", "content": "what is this?", "images": ["QUFB" * 750_000]}],
                "options": {"temperature": 0.5},
                "stream": False,
            }
        ).encode()
        response = await http_client(self).post(proxy.url + "/api/chat", data=body)
        self.assertEqual(response.code, 200)
        await response.content()
        [received] = proxy.fake.received
        self.assertEqual(received.body_length, len(body))
        self.assertEqual(received.body_sha256, hashlib.sha256(body).hexdigest())
        [row] = proxy.rows()
        self.assertEqual(row["request_size_bytes"], str(len(body)))
        self.assertEqual((row["model"], row["model_parameters"], row["stream_mode"]), ("llama3.2", '{"temperature":0.5}', "false"))

    async def test_chunked_upload_streams_through(self) -> None:
        """
        A chunked request body (no Content-Length) reaches Ollama whole.
        """
        proxy = LiveProxy(self)
        pieces = [b'{"model": "llama3.2", ', b'"prompt": "hi", ', b'"stream": false}']
        with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
            raw.setblocking(False)
            head = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            raw.sendall(head)
            for piece in pieces:
                raw.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                await deferLater(reactor, 0.01, lambda: None)
            raw.sendall(b"0\r\n\r\n")
            reply = b""
            for _ in range(200):
                await deferLater(reactor, 0.01, lambda: None)
                try:
                    data = raw.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    break
                reply += data
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 OK"), reply[:100])
        self.assertEqual(proxy.fake.received[0].body, b"".join(pieces))
        [row] = proxy.rows()
        self.assertEqual((row["model"], row["request_size_bytes"]), ("llama3.2", str(len(b"".join(pieces)))))


class PoolingTests(TestCase):
    async def test_upstream_connections_are_reused(self) -> None:
        """
        Sequential requests, even from different clients, share one
        persistent upstream connection.
        """
        proxy = LiveProxy(self)
        opened = []
        build = proxy.fake_site.buildProtocol
        self.patch(proxy.fake_site, "buildProtocol", lambda addr: opened.append(addr) or build(addr))
        for _ in range(5):
            response = await http_client(self).get(proxy.url + "/api/tags")
            await response.content()
        self.assertEqual(len(opened), 1)
        self.assertEqual(len(proxy.fake.received), 5)


def _raw_headers(port: int, request: bytes) -> list[bytes]:
    """
    The status line and header lines of the answer to C{request}, read with
    a plain socket (blocking: call it off the reactor thread).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = raw.recv(65536)
            if not piece:
                break
            data += piece
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    return [line for line in head if not line.lower().startswith((b"date:", b"x-request-id:"))]


class FramingTests(TestCase):
    async def test_length_and_chunking_as_ollama_sent_them(self) -> None:
        """
        On the wire, a reply Ollama sent with a Content-Length keeps it, and
        a stream stays chunked: the client sees the same framing either way.
        """
        proxy = LiveProxy(self)
        fake = proxy.fake_port.getHost().port
        body = b'{"model":"llama3.2","prompt":"hi"}'
        for request in (
            b"GET /api/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body),
        ):
            direct = await in_reactor_thread(_raw_headers, fake, request)
            proxied = await in_reactor_thread(_raw_headers, proxy.port, request)
            self.assertEqual(sorted(proxied), sorted(direct), request)
