"""
What only a real network shows: lines streamed through the agent and pool
the proxy really uses, the official clients, streamed uploads, pooling and
framing on the wire, over loopback sockets.  (Upstream and client faults
over sockets are in tests/test_faults.py.)
"""

from __future__ import annotations

import json

import treq
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from .rawhttp import chunk, connect
from .support import LiveProxy, eventually, http_client, in_reactor_thread, refused_port, within


class StreamingOverSocketsTests(TestCase):
    async def test_each_line_arrives_before_the_next_is_written(self) -> None:
        """
        Over real sockets, through the agent and connection pool the proxy
        really uses, the client has each line before Ollama has written the
        next one: nothing on the way holds a line back waiting for more.
        (The fake writes a line each time the test advances its clock.)
        """
        clock = Clock()
        proxy = LiveProxy(self, token_delay=1.0, fake_clock=clock)
        pending = http_client(self).post(
            proxy.url + "/api/generate",
            json={"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 4}},
            unbuffered=True,
        )
        await eventually(lambda: len(proxy.fake.received) == 1)
        clock.advance(1)  # the first line, and the headers with it
        response = await within(pending)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        for written in range(1, 5):
            if written > 1:
                clock.advance(1)
            await eventually(lambda: b"".join(chunks).count(b"\n") == written)
        await within(done)
        lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
        self.assertEqual([line["done"] for line in lines], [False, False, False, True])
        await eventually(lambda: proxy.rows())
        [row] = proxy.rows()
        self.assertEqual((row["output_tokens"], row["stream_mode"]), ("4", "true"))


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

        port = refused_port(self)
        dead = LiveProxy(self, args=["--ollama-url", f"http://127.0.0.1:{port}"])

        def dead_upstream() -> Exception:
            try:
                ollama.Client(host=dead.url).list()
            except ollama.ResponseError as e:
                return e
            raise AssertionError("no error")

        error = await in_reactor_thread(dead_upstream)
        self.assertEqual(error.status_code, 502)
        self.assertIn(f"127.0.0.1:{port} unreachable: connection refused", error.error)

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
        A chunked request body (no Content-Length) is on its way upstream
        before it is complete, and reaches Ollama whole.
        """
        proxy = LiveProxy(self)
        pieces = [b'{"model": "llama3.2", ', b'"prompt": "hi", ', b'"stream": false}']
        client = await connect(self, proxy.port)
        client.send(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + chunk(pieces[0])
        )
        await eventually(lambda: len(proxy.service.forwarder.active) == 1)
        for piece in pieces[1:]:
            client.send(chunk(piece))
        client.send(b"0\r\n\r\n")
        await client.when_closed()
        [response] = client.responses
        self.assertEqual(response.status, 200, client.received[:100])
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


async def _raw_headers(test: TestCase, port: int, request: bytes) -> list[bytes]:
    """
    The status line and header lines of the answer to C{request} (which
    asks the server to close the connection), as they came on the wire.
    """
    client = await connect(test, port)
    client.send(request)
    await client.when_closed()
    head = client.received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
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
            direct = await _raw_headers(self, fake, request)
            proxied = await _raw_headers(self, proxy.port, request)
            self.assertEqual(sorted(proxied), sorted(direct), request)
