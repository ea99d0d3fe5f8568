"""
Tests for the fake Ollama (L{ollamaproxy.testing.fake_ollama} and its /v1
layers).  Most run in memory: through L{StubTreq}, or byte-exact over a
L{StringTransport} when the wire format itself is the point.  A few run the
official C{ollama} and C{openai} clients against the fake over loopback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ollama
import openai
import treq
from treq.testing import StubTreq
from twisted.internet import task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IResponse
from twisted.web.server import Site

from ollamaproxy.testing.fake_ollama import FakeModel, FakeOllama, Fault, HostPolicy

QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"
METRIC_FIELDS = ("total_duration", "load_duration", "prompt_eval_count",
                 "prompt_eval_duration", "eval_count", "eval_duration")


# ---------------------------------------------------------------------------
# Harnesses

@dataclass
class Answer:
    """A response as a client saw it."""

    code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[dict[str, Any]]:
        """NDJSON: every line must be one JSON object."""
        assert self.body.endswith(b"\n"), self.body
        return [json.loads(line) for line in self.body.split(b"\n")[:-1]]

    def sse(self) -> list[str]:
        """C{data:} payloads of an SSE body framed as C{data: x\\n\\n}."""
        assert self.body.endswith(b"\n\n"), self.body
        frames = self.body.decode().split("\n\n")[:-1]
        assert all(f.startswith("data: ") and "\n" not in f for f in frames), frames
        return [f[len("data: "):] for f in frames]

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """C{event:}-framed SSE: C{event: name\\ndata: json\\n\\n}."""
        assert self.body.endswith(b"\n\n"), self.body
        pairs = []
        for frame in self.body.decode().split("\n\n")[:-1]:
            event, data = frame.split("\n")
            pairs.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
        return pairs


def parse_wire(raw: bytes) -> tuple[Answer, list[bytes]]:
    """Parse one raw HTTP/1.1 response; also return its chunks, if chunked."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    chunks: list[bytes] = []
    if headers.get("transfer-encoding") == "chunked":
        while rest:
            size_text, _, rest = rest.partition(b"\r\n")
            size = int(size_text, 16)
            chunks.append(rest[:size])
            rest = rest[size + 2:]
        body = b"".join(chunks)
    else:
        body = rest
    return Answer(int(status_line.split(" ")[1]), headers, body), chunks


class Wire:
    """One HTTP connection to the fake, seen byte for byte."""

    def __init__(self, fake: FakeOllama) -> None:
        self.transport = StringTransport()
        site = Site(fake.resource(), reactor=MemoryReactorClock())
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, method: str, path: str, body: object = None,
             headers: Iterable[tuple[str, str]] = (("Host", "localhost"),)) -> None:
        payload = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
        if payload or method in ("POST", "DELETE"):
            lines.append(f"Content-Length: {len(payload)}")
        self.protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    def output(self) -> bytes:
        return self.transport.value()

    def answer(self) -> tuple[Answer, list[bytes]]:
        return parse_wire(self.output())

    def client_leaves(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class Collector(Protocol):
    """Receives a response body chunk by chunk, and can hang up."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.first_data: Deferred[None] = Deferred()
        self.done: Deferred[BaseException] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)
        if not self.first_data.called:
            self.first_data.callback(None)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback(reason.value)

    def hang_up(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


class FakeTestCase(SynchronousTestCase):
    """A fake on a L{task.Clock}, reached through L{StubTreq}."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.use(FakeOllama(self.clock))

    def use(self, fake: FakeOllama) -> FakeOllama:
        self.fake = fake
        self.stub = StubTreq(fake.resource())
        return fake

    def start(self, method: str, path: str, body: object = None,
              headers: dict[str, str] | None = None) -> Deferred[IResponse]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body)
        response = self.stub.request(method, "http://localhost" + path, data=data, headers=headers,
                                     allow_redirects=False, unbuffered=True)
        self.stub.flush()
        return response

    def call(self, method: str, path: str, body: object = None,
             headers: dict[str, str] | None = None) -> Answer:
        response = self.successResultOf(self.start(method, path, body, headers))
        content = self.stub.content(response)
        self.stub.flush()
        names = {name.decode().lower(): values[-1].decode()
                 for name, values in response.headers.getAllRawHeaders()}
        return Answer(response.code, names, self.successResultOf(content))

    def post(self, path: str, body: object) -> Answer:
        return self.call("POST", path, body)

    def stream_into(self, response: IResponse) -> Collector:
        collector = Collector()
        response.deliverBody(collector)
        self.stub.flush()
        return collector


def chat_body(model: str = "llama3.2", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello there"}], **extra}


# ---------------------------------------------------------------------------
# Native streaming

class NativeStreamTests(FakeTestCase):
    def test_generate_streams_ndjson_ending_with_a_done_chunk(self) -> None:
        """Each line is one object; only the last is done and it carries every metric and the last token."""
        answer = self.post("/api/generate", {"model": "llama3.2", "prompt": "one two three",
                                             "options": {"num_predict": 4}})
        self.assertEqual((answer.code, answer.headers["content-type"]), (200, "application/x-ndjson"))
        lines = answer.lines()
        self.assertEqual([line["done"] for line in lines], [False, False, False, True])
        final = lines[-1]
        self.assertEqual(final["done_reason"], "length")
        self.assertNotEqual(final["response"], "")
        for name in METRIC_FIELDS:
            self.assertIsInstance(final[name], int, name)
        self.assertEqual((final["eval_count"], final["prompt_eval_count"]), (4, 3))
        self.assertEqual(len(final["context"]), 3 + 4)
        self.assertEqual(final["total_duration"], final["load_duration"]
                         + final["prompt_eval_duration"] + final["eval_duration"])
        self.assertTrue(all("total_duration" not in line for line in lines[:-1]))

    def test_generate_echoes_the_model_name_as_sent(self) -> None:
        """C{llama3.2}, C{LLAMA3.2} and C{llama3.2:latest} are one model, echoed verbatim."""
        for name in ("llama3.2", "LLAMA3.2", "llama3.2:latest", "library/llama3.2"):
            lines = self.post("/api/generate", {"model": name, "prompt": "hi"}).lines()
            self.assertEqual({line["model"] for line in lines}, {name})

    def test_stream_false_answers_one_json_object(self) -> None:
        """The whole text in one object, gin's c.JSON framing, C{done_reason} stop by default."""
        answer = self.post("/api/generate", {"model": "llama3.2", "prompt": "hi", "stream": False})
        self.assertEqual(answer.headers["content-type"], "application/json; charset=utf-8")
        self.assertFalse(answer.body.endswith(b"\n"))
        whole = answer.json()
        self.assertEqual((whole["done"], whole["done_reason"], whole["eval_count"]), (True, "stop", 8))
        streamed = self.post("/api/generate", {"model": "llama3.2", "prompt": "hi"}).lines()
        self.assertEqual(whole["response"], "".join(line["response"] for line in streamed))

    def test_raw_generate_has_no_context(self) -> None:
        final = self.post("/api/generate", {"model": "llama3.2", "prompt": "hi", "raw": True}).lines()[-1]
        self.assertNotIn("context", final)

    def test_chat_streams_assistant_messages(self) -> None:
        lines = self.post("/api/chat", chat_body(options={"num_predict": 3})).lines()
        self.assertEqual([line["message"]["role"] for line in lines], ["assistant"] * 3)
        self.assertTrue(lines[-1]["done"])
        self.assertNotIn("context", lines[-1])
        self.assertEqual(lines[-1]["eval_count"], 3)

    def test_thinking_model_thinks_first_unless_told_not_to(self) -> None:
        """qwen3 puts text in C{thinking} before the answer; C{think:false} turns it off."""
        lines = self.post("/api/chat", chat_body("qwen3")).lines()
        thinking = [line["message"].get("thinking", "") for line in lines]
        self.assertTrue(thinking[0])
        self.assertEqual(lines[0]["message"]["content"], "")
        self.assertFalse(thinking[-1])
        quiet = self.post("/api/chat", chat_body("qwen3", think=False)).lines()
        self.assertTrue(all("thinking" not in line["message"] for line in quiet))

    def test_generate_with_thinking_uses_the_thinking_field(self) -> None:
        first = self.post("/api/generate", {"model": "qwen3", "prompt": "hi"}).lines()[0]
        self.assertEqual(first["response"], "")
        self.assertTrue(first["thinking"])

    def test_empty_prompt_loads_and_keep_alive_zero_unloads(self) -> None:
        """Load/unload replies are single c.JSON objects even when streaming was asked."""
        load = self.post("/api/generate", {"model": "llama3.2"})
        self.assertEqual(load.headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(load.json()["done_reason"], "load")
        self.assertEqual(self.call("GET", "/api/ps").json()["models"][0]["name"], "llama3.2:latest")
        unload = self.post("/api/generate", {"model": "llama3.2", "keep_alive": 0}).json()
        self.assertEqual((unload["done"], unload["done_reason"], unload["response"]), (True, "unload", ""))
        self.assertEqual(self.call("GET", "/api/ps").json(), {"models": []})
        chat = self.post("/api/chat", {"model": "llama3.2", "messages": []}).json()
        self.assertEqual(chat["message"], {"role": "assistant", "content": ""})
        self.assertEqual(chat["done_reason"], "load")


class WireTests(SynchronousTestCase):
    """What goes on the wire, byte for byte."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.fake = FakeOllama(self.clock, token_delay=0.5, load_delay=2.0)
        self.wire = Wire(self.fake)

    def test_chunks_are_released_by_the_clock_headers_with_the_first(self) -> None:
        """Nothing, not even the status line, exists before the first token; then one chunk per delay."""
        self.wire.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi",
                                                 "options": {"num_predict": 3}})
        self.clock.advance(2.4)
        self.assertEqual(self.wire.output(), b"")
        self.clock.advance(0.1)
        answer, chunks = self.wire.answer()
        self.assertEqual((answer.code, answer.headers["transfer-encoding"]), (200, "chunked"))
        self.assertEqual(len(chunks), 1)
        self.assertFalse(json.loads(chunks[0])["done"])
        self.clock.advance(0.5)
        self.assertEqual(len(self.wire.answer()[1]), 2)
        self.clock.advance(0.5)
        answer, chunks = self.wire.answer()
        self.assertEqual(len(chunks), 4)  # three objects and the terminating empty chunk
        self.assertTrue(all(chunk.count(b"\n") == 1 for chunk in chunks[:3]))
        self.assertTrue(json.loads(chunks[2])["done"])
        self.assertEqual(self.fake.in_flight, 0)

    def test_json_replies_have_a_content_length_and_no_server_header(self) -> None:
        self.wire.send("GET", "/api/version")
        answer, _ = self.wire.answer()
        self.assertEqual(answer.body, b'{"version":"0.12.6"}')
        self.assertEqual(answer.headers["content-length"], str(len(answer.body)))
        self.assertEqual(answer.headers["content-type"], "application/json; charset=utf-8")
        self.assertNotIn("server", answer.headers)
        self.assertNotIn("transfer-encoding", answer.headers)
        self.assertIn("date", answer.headers)

    def test_delete_and_copy_answer_200_with_an_empty_body(self) -> None:
        self.wire.send("POST", "/api/copy", {"source": "llama3.2", "destination": "mine"})
        answer, _ = self.wire.answer()
        self.assertEqual((answer.code, answer.body, answer.headers.get("content-type")), (200, b"", None))
        self.assertEqual(answer.headers["content-length"], "0")

    def test_unknown_path_is_gins_plain_404(self) -> None:
        self.wire.send("GET", "/api/nothing")
        answer, _ = self.wire.answer()
        self.assertEqual((answer.code, answer.headers["content-type"], answer.body),
                         (404, "text/plain", b"404 page not found"))

    def test_wrong_method_is_405_with_allow(self) -> None:
        """gin lists the path's methods in its method-tree order."""
        for method, path, allow in (("POST", "/api/tags", "HEAD, GET"), ("GET", "/api/generate", "POST"),
                                    ("HEAD", "/api/ps", "GET"), ("GET", "/api/blobs/sha256:00", "HEAD, POST"),
                                    ("POST", "/api/delete", "DELETE")):
            wire = Wire(self.fake)
            wire.send(method, path)
            answer, _ = wire.answer()
            self.assertEqual((answer.code, answer.headers["allow"], answer.headers["content-type"]),
                             (405, allow, "text/plain"), path)
            if method != "HEAD":
                self.assertEqual(answer.body, b"405 method not allowed")

    def test_head_answers_headers_only_where_registered(self) -> None:
        self.wire.send("HEAD", "/")
        answer, _ = self.wire.answer()
        self.assertEqual((answer.code, answer.body, answer.headers["content-length"]), (200, b"", "17"))
        self.assertEqual(answer.headers["content-type"], "text/plain; charset=utf-8")
        for path in ("/api/version", "/api/tags"):
            wire = Wire(self.fake)
            wire.send("HEAD", path)
            self.assertEqual(wire.answer()[0].code, 200, path)

    def test_trailing_slash_redirects(self) -> None:
        """301 for GET (query kept), 307 for other methods, 404 when no route matches."""
        self.wire.send("GET", "/api/tags/?verbose=1")
        answer, _ = self.wire.answer()
        self.assertEqual((answer.code, answer.headers["location"]), (301, "/api/tags?verbose=1"))
        self.assertEqual(answer.body, b'<a href="/api/tags?verbose=1">Moved Permanently</a>.\n')
        for method, path, code in (("POST", "/api/chat/", 307), ("GET", "/nothing/", 404),
                                   ("POST", "/api/tags/", 404)):
            wire = Wire(self.fake)
            wire.send(method, path, b"")
            self.assertEqual(wire.answer()[0].code, code, path)

    def test_client_disconnect_stops_generation(self) -> None:
        """The pending token is cancelled, the URI recorded, waiters fired, nothing written after."""
        left = self.fake.when_disconnected()
        self.wire.send("POST", "/api/chat", chat_body())
        self.clock.advance(2.5)
        written = self.wire.output()
        self.assertEqual(self.fake.in_flight, 1)
        self.wire.client_leaves()
        self.assertEqual(self.successResultOf(left), b"/api/chat")
        self.assertEqual(self.fake.disconnects, [b"/api/chat"])
        self.assertEqual((self.clock.getDelayedCalls(), self.fake.in_flight), ([], 0))
        self.clock.advance(100)
        self.assertEqual(self.wire.output(), written)

    def test_disconnect_before_headers_is_recorded(self) -> None:
        self.wire.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"})
        self.wire.client_leaves()
        self.assertEqual(self.fake.disconnects, [b"/api/generate"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_finished_requests_are_not_disconnects(self) -> None:
        self.wire.send("GET", "/api/tags")
        self.wire.client_leaves()
        self.assertEqual(self.fake.disconnects, [])


# ---------------------------------------------------------------------------
# Errors

class NativeErrorTests(FakeTestCase):
    def assertError(self, answer: Answer, code: int, message: str) -> None:
        self.assertEqual((answer.code, answer.json()), (code, {"error": message}))
        self.assertEqual(answer.headers["content-type"], "application/json; charset=utf-8")

    def test_body_errors_use_gos_decoder_wording(self) -> None:
        self.assertError(self.post("/api/chat", b""), 400, "missing request body")
        self.assertError(self.post("/api/chat", b"  \n"), 400, "missing request body")
        self.assertError(self.post("/api/generate", b"{bad"), 400,
                         "invalid character 'b' looking for beginning of object key string")
        self.assertError(self.post("/api/generate", b"xyz"), 400,
                         "invalid character 'x' looking for beginning of value")
        self.assertError(self.post("/api/generate", b'{"model": "x"'), 400, "unexpected EOF")
        self.assertError(self.post("/api/generate", b'{"model": 3}'), 400,
                         "json: cannot unmarshal number into Go struct field GenerateRequest.model of type string")
        self.assertError(self.post("/api/chat", b"[1]"), 400,
                         "json: cannot unmarshal array into Go value of type api.ChatRequest")

    def test_trailing_bytes_after_the_json_value_are_ignored(self) -> None:
        """Like Go's json.Decoder, and whatever the request Content-Type says."""
        answer = self.call("POST", "/api/show", b'{"model":"llama3.2"} trailing',
                           headers={"Content-Type": "text/plain"})
        self.assertEqual(answer.code, 200)

    def test_missing_model_statuses_differ_per_endpoint(self) -> None:
        self.assertError(self.post("/api/generate", {}), 404, "model '' not found")
        self.assertError(self.post("/api/generate", b"null"), 404, "model '' not found")
        self.assertError(self.post("/api/embed", {"input": "x"}), 404, "model '' not found")
        for path in ("/api/chat", "/api/show", "/api/push", "/api/embeddings"):
            self.assertError(self.post(path, {}), 400, "model is required")
        self.assertError(self.post("/api/pull", {}), 400, "invalid model name")

    def test_unknown_model_texts_differ_per_endpoint(self) -> None:
        for path, body in (("/api/generate", {"model": "ghost", "prompt": "hi"}),
                           ("/api/chat", chat_body("ghost")), ("/api/show", {"model": "ghost"})):
            self.assertError(self.post(path, body), 404, "model 'ghost' not found")
        self.assertError(self.post("/api/embed", {"model": "ghost", "input": "x"}), 404,
                         'model "ghost" not found, try pulling it first')
        self.assertError(self.post("/api/embeddings", {"model": "ghost", "prompt": "x"}), 404,
                         'model "ghost" not found, try pulling it first')
        self.assertError(self.post("/api/copy", {"source": "ghost", "destination": "b"}), 404,
                         'model "ghost" not found')
        self.assertError(self.call("DELETE", "/api/delete", {"model": "ghost"}), 404, "model 'ghost' not found")

    def test_capability_errors(self) -> None:
        self.assertError(self.post("/api/generate", {"model": "all-minilm", "prompt": "hi"}), 400,
                         '"all-minilm" does not support generate')
        self.assertError(self.post("/api/chat", chat_body("all-minilm")), 400,
                         '"all-minilm" does not support chat')
        self.assertError(self.post("/api/chat", chat_body(think=True)), 400,
                         '"llama3.2" does not support thinking')
        self.assertError(self.post("/api/chat", chat_body(think="loud")), 400,
                         'invalid think value: "loud" (must be "high", "medium", "low", true, or false)')

    def test_tools_need_the_tools_capability(self) -> None:
        """The message names the model in full, as Ollama's scheduler does."""
        self.use(FakeOllama(self.clock, models=[FakeModel("tiny:1b", ("completion",))]))
        tool = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
        self.assertError(self.post("/api/chat", chat_body("tiny:1b", tools=[tool])), 400,
                         "registry.ollama.ai/library/tiny:1b does not support tools")
        self.assertEqual(self.post("/api/chat", chat_body("tiny:1b", tools=[])).code, 200)

    def test_option_and_keep_alive_type_errors(self) -> None:
        self.assertError(self.post("/api/chat", chat_body(options={"temperature": "hot"})), 500,
                         'option "temperature" must be of type float32')
        self.assertError(self.post("/api/chat", chat_body(keep_alive=True)), 400, "Unsupported type: 'bool'")
        self.assertError(self.post("/api/chat", chat_body(keep_alive="soon")), 400,
                         'time: invalid duration "soon"')
        self.assertEqual(self.post("/api/chat", chat_body(keep_alive="5m")).code, 200)

    def test_embed_rejects_non_string_inputs(self) -> None:
        self.assertError(self.post("/api/embed", {"model": "all-minilm", "input": [1]}), 400,
                         "invalid input type")


# ---------------------------------------------------------------------------
# Models, embeddings, blobs, progress

class ModelManagementTests(FakeTestCase):
    def test_tags_show_and_version(self) -> None:
        names = [m["name"] for m in self.call("GET", "/api/tags").json()["models"]]
        self.assertEqual(names, ["llama3.2:latest", "qwen3:latest", "all-minilm:latest"])
        show = self.post("/api/show", {"model": "qwen3"}).json()
        self.assertEqual(show["capabilities"], ["completion", "thinking", "tools"])
        self.assertEqual(show["details"]["family"], "qwen3")
        self.assertEqual(self.call("GET", "/api/version").json(), {"version": "0.12.6"})
        self.assertEqual(self.call("GET", "/").body, b"Ollama is running")

    def test_copy_adds_and_delete_removes(self) -> None:
        self.assertEqual(self.post("/api/copy", {"source": "llama3.2", "destination": "mine"}).body, b"")
        self.assertEqual(self.post("/api/show", {"model": "mine:latest"}).code, 200)
        deleted = self.call("DELETE", "/api/delete", {"model": "mine"})
        self.assertEqual((deleted.code, deleted.body), (200, b""))
        self.assertEqual(self.post("/api/show", {"model": "mine"}).code, 404)

    def test_pull_streams_progress_then_installs(self) -> None:
        lines = self.post("/api/pull", {"model": "phi3"}).lines()
        self.assertEqual(lines[0], {"status": "pulling manifest"})
        self.assertEqual(lines[-1], {"status": "success"})
        self.assertTrue(any("completed" in line and "total" in line for line in lines))
        self.assertIn("phi3:latest", [m["name"] for m in self.call("GET", "/api/tags").json()["models"]])

    def test_pull_without_stream_answers_the_last_object(self) -> None:
        answer = self.post("/api/pull", {"model": "llama3.2", "stream": False})
        self.assertEqual((answer.body, answer.headers["content-type"]), (b'{"status":"success"}', "application/json"))

    def test_push_and_create(self) -> None:
        self.assertEqual(self.post("/api/push", {"model": "llama3.2"}).lines()[-1], {"status": "success"})
        created = self.post("/api/create", {"model": "custom", "from": "qwen3", "stream": False})
        self.assertEqual(created.json(), {"status": "success"})
        self.assertIn("thinking", self.post("/api/show", {"model": "custom"}).json()["capabilities"])

    def test_embed_vectors_are_deterministic_unit_vectors(self) -> None:
        first = self.post("/api/embed", {"model": "all-minilm", "input": ["a cat", "a dog"]}).json()
        again = self.post("/api/embed", {"model": "all-minilm", "input": "a cat"}).json()
        self.assertEqual(len(first["embeddings"]), 2)
        self.assertEqual(first["embeddings"][0], again["embeddings"][0])
        self.assertNotEqual(first["embeddings"][0], first["embeddings"][1])
        self.assertEqual(len(first["embeddings"][0]), 8)
        self.assertAlmostEqual(sum(v * v for v in first["embeddings"][0]), 1.0, places=5)
        self.assertEqual((first["prompt_eval_count"], first["model"]), (4, "all-minilm"))
        short = self.post("/api/embed", {"model": "all-minilm", "input": "x", "dimensions": 4}).json()
        self.assertEqual(len(short["embeddings"][0]), 4)
        empty = self.post("/api/embed", {"model": "all-minilm", "input": ""}).json()
        self.assertEqual(empty, {"model": "all-minilm", "embeddings": []})

    def test_legacy_embeddings(self) -> None:
        answer = self.post("/api/embeddings", {"model": "all-minilm", "prompt": "a cat"}).json()
        self.assertEqual(list(answer), ["embedding"])
        self.assertEqual(len(answer["embedding"]), 8)
        self.assertEqual(self.post("/api/embeddings", {"model": "all-minilm"}).json(), {"embedding": []})

    def test_blob_upload_checks_the_digest(self) -> None:
        data = b"weights" * 1000
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.assertEqual(self.call("HEAD", f"/api/blobs/{digest}").code, 404)
        self.assertEqual(self.post(f"/api/blobs/{digest}", data).code, 201)
        self.assertEqual(self.post(f"/api/blobs/{digest}", data).code, 200)
        self.assertEqual(self.call("HEAD", f"/api/blobs/{digest}").code, 200)
        other = "sha256:" + "0" * 64
        wrong = self.post(f"/api/blobs/{other}", data)
        self.assertEqual((wrong.code, wrong.json()["error"]),
                         (400, f'digest mismatch, expected "{other}", got "{digest}"'))
        self.assertEqual(self.post("/api/blobs/sha256:xyz", data).json(), {"error": "invalid digest format"})

    def test_received_requests_are_recorded_big_bodies_by_digest_only(self) -> None:
        big = b"x" * (1024 * 1024 + 1)
        self.post("/api/blobs/sha256:" + hashlib.sha256(big).hexdigest(), big)
        self.call("GET", "/api/tags", headers={"X-Probe": "1"})
        upload, listing = self.fake.received
        self.assertEqual((upload.method, upload.body, upload.body_length), (b"POST", b"", len(big)))
        self.assertEqual(upload.body_sha256, hashlib.sha256(big).hexdigest())
        self.assertEqual((listing.method, listing.uri, listing.body), (b"GET", b"/api/tags", b""))
        self.assertEqual(listing.headers.getRawHeaders(b"x-probe"), [b"1"])


# ---------------------------------------------------------------------------
# Faults and concurrency

class FaultTests(FakeTestCase):
    def test_midstream_error_is_a_final_error_line_with_status_200(self) -> None:
        self.fake.inject(Fault.MIDSTREAM_ERROR, after_chunks=2)
        answer = self.post("/api/generate", {"model": "llama3.2", "prompt": "hi"})
        lines = answer.lines()
        self.assertEqual(answer.code, 200)
        self.assertEqual(len(lines), 3)
        self.assertEqual(list(lines[-1]), ["error"])
        self.assertFalse(any(line.get("done") for line in lines))

    def test_midstream_error_before_any_chunk_is_a_500(self) -> None:
        self.fake.inject(Fault.MIDSTREAM_ERROR)
        answer = self.post("/api/chat", chat_body())
        self.assertEqual((answer.code, answer.headers["content-type"]), (500, "application/json"))
        self.assertEqual(answer.json(), {"error": Fault.MIDSTREAM_ERROR.message})

    def test_status_fault_and_queue_full(self) -> None:
        self.fake.inject(Fault.status(502, "runner crashed"))
        self.fake.inject(Fault.QUEUE_FULL)
        crashed = self.post("/api/generate", {"model": "llama3.2", "prompt": "hi"})
        self.assertEqual((crashed.code, crashed.json()), (502, {"error": "runner crashed"}))
        full = self.post("/api/chat", chat_body())
        self.assertEqual((full.code, full.json()), (503, {"error": QUEUE_FULL}))
        self.assertEqual(self.post("/api/chat", chat_body()).code, 200)

    def test_faults_wait_for_a_generating_request(self) -> None:
        """Listing, load requests and rejected requests leave the fault queued."""
        self.fake.inject(Fault.status(500, "boom"))
        self.call("GET", "/api/tags")
        self.post("/api/generate", {"model": "llama3.2"})
        self.post("/api/generate", {"model": "ghost", "prompt": "hi"})
        self.assertEqual(self.post("/api/embed", {"model": "all-minilm", "input": "x"}).code, 500)

    def test_reset_midstream_aborts_the_connection(self) -> None:
        self.fake.inject(Fault.RESET_MIDSTREAM, after_chunks=1)
        response = self.successResultOf(self.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"}))
        collector = self.stream_into(response)
        self.assertIsInstance(self.successResultOf(collector.done), ResponseFailed)
        self.assertEqual(len(b"".join(collector.data).split(b"\n")), 2)
        self.assertEqual((self.fake.disconnects, self.fake.in_flight), ([], 0))

    def test_reset_before_headers(self) -> None:
        self.fake.inject(Fault.RESET_BEFORE_HEADERS)
        self.failureResultOf(self.start("POST", "/api/chat", chat_body()), ResponseFailed)

    def test_hang_before_headers_until_the_client_gives_up(self) -> None:
        self.fake.inject(Fault.HANG_BEFORE_HEADERS)
        response = self.start("POST", "/api/chat", chat_body())
        self.clock.advance(3600)
        self.stub.flush()
        self.assertNoResult(response)
        self.assertEqual(self.fake.in_flight, 1)
        response.cancel()
        self.stub.flush()
        self.failureResultOf(response, ResponseNeverReceived)
        self.assertEqual((self.fake.disconnects, self.fake.in_flight), ([b"/api/chat"], 0))

    def test_hang_midstream_writes_nothing_more(self) -> None:
        self.fake.inject(Fault.HANG_MIDSTREAM, after_chunks=2)
        left = self.fake.when_disconnected()
        response = self.successResultOf(self.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"}))
        collector = self.stream_into(response)
        self.clock.advance(3600)
        self.stub.flush()
        self.assertEqual(b"".join(collector.data).count(b"\n"), 2)
        self.assertNoResult(left)
        collector.hang_up()
        self.stub.flush()
        self.assertEqual(self.successResultOf(left), b"/api/generate")

    def test_midstream_faults_fire_by_the_last_chunk_at_the_latest(self) -> None:
        self.fake.inject(Fault.MIDSTREAM_ERROR, after_chunks=50)
        lines = self.post("/api/generate", {"model": "llama3.2", "prompt": "hi"}).lines()
        self.assertEqual((len(lines), list(lines[-1])), (8, ["error"]))

    def test_max_pending_answers_queue_full(self) -> None:
        """Generations beyond the limit get Ollama's 503 while the others run."""
        self.use(FakeOllama(self.clock, token_delay=1.0, max_pending=1))
        first = self.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"})
        second = self.post("/api/generate", {"model": "llama3.2", "prompt": "hi"})
        self.assertEqual((second.code, second.json()), (503, {"error": QUEUE_FULL}))
        self.assertEqual(self.fake.in_flight, 1)
        self.clock.advance(8)
        self.stub.flush()
        self.assertEqual(self.successResultOf(first).code, 200)
        self.assertEqual(self.fake.in_flight, 0)
        third = self.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"})
        self.clock.advance(8)
        self.stub.flush()
        self.assertEqual(self.successResultOf(third).code, 200)

    def test_response_is_not_there_before_the_clock_moves(self) -> None:
        self.use(FakeOllama(self.clock, token_delay=0.25))
        response = self.start("POST", "/api/chat", chat_body())
        self.assertNoResult(response)
        self.clock.advance(0.25)
        self.stub.flush()
        collector = self.stream_into(self.successResultOf(response))
        self.assertEqual(b"".join(collector.data).count(b"\n"), 1)
        self.clock.advance(0.25)
        self.stub.flush()
        self.assertEqual(b"".join(collector.data).count(b"\n"), 2)

    def test_non_streamed_answers_wait_for_every_token(self) -> None:
        self.use(FakeOllama(self.clock, token_delay=0.5))
        response = self.start("POST", "/api/chat", chat_body(stream=False))
        self.clock.advance(3.5)
        self.stub.flush()
        self.assertNoResult(response)
        self.clock.advance(0.5)
        self.stub.flush()
        self.assertEqual(self.successResultOf(response).code, 200)


class HostCheckTests(FakeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.use(FakeOllama(self.clock, check_host=True,
                            host_policy=HostPolicy("buildbox", frozenset({"203.0.113.7"}))))

    def test_allowed_hosts(self) -> None:
        for host in ("localhost:11434", "127.0.0.1:11434", "[::1]:11434", "10.0.0.8", "foo.internal",
                     "app.localhost", "printer.local", "BuildBox", "203.0.113.7:80", "0.0.0.0"):
            self.assertEqual(self.call("GET", "/api/version", headers={"Host": host}).code, 200, host)

    def test_other_hosts_get_an_empty_403_even_on_unknown_paths(self) -> None:
        for path in ("/api/version", "/no/such/path"):
            answer = self.call("GET", path, headers={"Host": "example.com"})
            self.assertEqual((answer.code, answer.body), (403, b""), path)
        self.assertEqual(self.call("GET", "/", headers={"Host": "8.8.8.8"}).code, 403)

    def test_options_to_an_allowed_name_is_204(self) -> None:
        self.assertEqual(self.call("OPTIONS", "/api/chat", headers={"Host": "localhost"}).code, 204)


# ---------------------------------------------------------------------------
# /v1 layers

class OpenAIChatTests(FakeTestCase):
    def test_stream_is_sse_with_a_separate_finish_chunk_and_done(self) -> None:
        answer = self.post("/v1/chat/completions", chat_body(stream=True, max_tokens=3))
        self.assertEqual(answer.headers["content-type"], "text/event-stream")
        frames = answer.sse()
        self.assertEqual(frames[-1], "[DONE]")
        chunks = [json.loads(frame) for frame in frames[:-1]]
        self.assertEqual(len(chunks), 4)
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertNotIn("role", chunks[1]["choices"][0]["delta"])
        self.assertEqual(chunks[-1]["choices"], [{"index": 0, "delta": {}, "finish_reason": "length"}])
        self.assertTrue(all("usage" not in chunk for chunk in chunks))
        self.assertEqual({chunk["id"] for chunk in chunks}, {chunks[0]["id"]})
        self.assertEqual({chunk["object"] for chunk in chunks}, {"chat.completion.chunk"})

    def test_include_usage_adds_a_usage_chunk_before_done(self) -> None:
        frames = self.post("/v1/chat/completions", chat_body(stream=True, stream_options={"include_usage": True})).sse()
        usage = json.loads(frames[-2])
        self.assertEqual(usage["choices"], [])
        self.assertEqual(usage["usage"], {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10})

    def test_reasoning_goes_to_its_own_field(self) -> None:
        first = json.loads(self.post("/v1/chat/completions", chat_body("qwen3", stream=True)).sse()[0])
        self.assertEqual(first["choices"][0]["delta"]["reasoning"], "Let")
        whole = self.post("/v1/chat/completions", chat_body("qwen3", reasoning_effort="none")).json()
        self.assertNotIn("reasoning", whole["choices"][0]["message"])

    def test_non_stream_completion(self) -> None:
        answer = self.post("/v1/chat/completions", chat_body())
        self.assertEqual(answer.headers["content-type"], "application/json")
        self.assertTrue(answer.body.endswith(b"}\n"))
        completion = answer.json()
        self.assertEqual(completion["object"], "chat.completion")
        self.assertEqual(completion["choices"][0]["finish_reason"], "stop")
        self.assertEqual(completion["usage"]["completion_tokens"], 8)

    def test_errors_use_openais_shape(self) -> None:
        missing = self.post("/v1/chat/completions", chat_body("ghost"))
        self.assertEqual((missing.code, missing.headers["content-type"]), (404, "application/json"))
        self.assertEqual(missing.json(), {"error": {"message": "model 'ghost' not found",
                                                    "type": "not_found_error", "param": None, "code": None}})
        empty = self.post("/v1/chat/completions", {"model": "llama3.2", "messages": []})
        self.assertEqual((empty.code, empty.headers["content-type"]), (400, "application/json; charset=utf-8"))
        self.assertEqual(empty.json()["error"]["message"], "[] is too short - 'messages'")
        self.assertEqual(empty.json()["error"]["type"], "invalid_request_error")
        self.assertEqual(self.post("/v1/chat/completions", b"").json()["error"]["message"], "EOF")

    def test_queue_full_is_an_api_error(self) -> None:
        self.fake.inject(Fault.QUEUE_FULL)
        full = self.post("/v1/chat/completions", chat_body())
        self.assertEqual((full.code, full.json()["error"]["type"]), (503, "api_error"))

    def test_midstream_error_loses_its_text_and_done(self) -> None:
        self.fake.inject(Fault.MIDSTREAM_ERROR, after_chunks=2)
        frames = self.post("/v1/chat/completions", chat_body(stream=True)).sse()
        self.assertNotIn("[DONE]", frames)
        last = json.loads(frames[-1])
        self.assertEqual((last["model"], last["choices"][0]["delta"]), ("", {"content": ""}))


class OpenAIOtherTests(FakeTestCase):
    def test_completions_with_include_usage_carry_zero_usage_on_every_chunk(self) -> None:
        frames = self.post("/v1/completions", {"model": "llama3.2", "prompt": "hi", "stream": True,
                                               "max_tokens": 2, "stream_options": {"include_usage": True}}).sse()
        chunks = [json.loads(frame) for frame in frames[:-1]]
        zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self.assertEqual([chunk["usage"] for chunk in chunks[:-1]], [zero, zero])
        self.assertEqual(chunks[1]["choices"][0]["finish_reason"], "length")
        self.assertEqual((chunks[-1]["choices"], chunks[-1]["usage"]["completion_tokens"]), ([], 2))
        self.assertEqual(frames[-1], "[DONE]")

    def test_embeddings_in_float_and_base64(self) -> None:
        floats = self.post("/v1/embeddings", {"model": "all-minilm", "input": ["a cat"]}).json()
        encoded = self.post("/v1/embeddings", {"model": "all-minilm", "input": "a cat",
                                               "encoding_format": "base64"}).json()
        vector = floats["data"][0]["embedding"]
        decoded = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
        self.assertEqual([round(v, 5) for v in decoded], [round(v, 5) for v in vector])
        self.assertEqual(floats["usage"], {"prompt_tokens": 2, "total_tokens": 2})
        bad = self.post("/v1/embeddings", {"model": "all-minilm", "input": [], "encoding_format": "hex"})
        self.assertEqual(bad.code, 400)

    def test_models_list_and_retrieve(self) -> None:
        listing = self.call("GET", "/v1/models").json()
        self.assertEqual(listing["data"][0], {"id": "llama3.2:latest", "object": "model",
                                              "created": 1759320000, "owned_by": "library"})
        self.assertEqual(self.call("GET", "/v1/models/qwen3").json()["id"], "qwen3")
        self.assertEqual(self.call("GET", "/v1/models/ghost").json()["error"]["type"], "not_found_error")

    def test_empty_model_list_is_data_null(self) -> None:
        self.use(FakeOllama(self.clock, models=[]))
        self.assertEqual(self.call("GET", "/v1/models").body, b'{"object":"list","data":null}\n')

    def test_responses_stream_events(self) -> None:
        answer = self.post("/v1/responses", {"model": "qwen3", "input": "hi", "stream": True,
                                             "max_output_tokens": 5})
        self.assertEqual((answer.headers["content-type"], answer.headers["cache-control"]),
                         ("text/event-stream", "no-cache"))
        events = answer.events()
        names = [name for name, _ in events]
        self.assertEqual(names[:2], ["response.created", "response.in_progress"])
        self.assertEqual(names[-1], "response.completed")
        self.assertIn("response.output_text.delta", names)
        self.assertIn("response.reasoning_summary_text.delta", names)
        self.assertEqual([data["sequence_number"] for _, data in events], list(range(len(events))))
        self.assertEqual(events[-1][1]["response"]["usage"]["output_tokens"], 5)

    def test_responses_without_stream(self) -> None:
        response = self.post("/v1/responses", {"model": "llama3.2", "instructions": "be brief",
                                               "input": [{"role": "user", "content": "hi"}]}).json()
        self.assertEqual((response["object"], response["status"]), ("response", "completed"))
        self.assertEqual(response["output"][0]["content"][0]["text"], "The quick brown fox jumps over the lazy")
        bad = self.post("/v1/responses", {"model": "llama3.2", "input": [{"type": "weird"}]})
        self.assertEqual(bad.json()["error"]["message"], 'input[0]: unknown input item type: "weird"')

    def test_anthropic_messages_stream(self) -> None:
        answer = self.post("/v1/messages", {"model": "qwen3", "max_tokens": 6, "stream": True,
                                            "messages": [{"role": "user", "content": "hi"}]})
        names = [name for name, _ in answer.events()]
        self.assertEqual(names[0], "message_start")
        self.assertEqual(names[-2:], ["message_delta", "message_stop"])
        self.assertEqual(names.count("content_block_start"), 2)
        self.assertEqual(names.count("content_block_stop"), 2)
        delta = dict(answer.events())["message_delta"]
        self.assertEqual(delta["delta"], {"stop_reason": "max_tokens"})
        self.assertEqual(delta["usage"]["output_tokens"], 6)

    def test_anthropic_messages_errors(self) -> None:
        missing = self.post("/v1/messages", {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual((missing.code, missing.json()["error"]),
                         (400, {"type": "invalid_request_error",
                                "message": "max_tokens is required and must be positive"}))
        self.fake.inject(Fault.QUEUE_FULL)
        full = self.post("/v1/messages", {"model": "llama3.2", "max_tokens": 5, "stream": True,
                                          "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual((full.code, full.json()["type"], full.json()["error"]["type"]),
                         (503, "error", "overloaded_error"))
        self.assertTrue(full.json()["request_id"].startswith("req_"))

    def test_anthropic_messages_without_stream(self) -> None:
        message = self.post("/v1/messages", {"model": "llama3.2", "max_tokens": 3, "thinking": {"type": "enabled"},
                                             "messages": [{"role": "user", "content": "hi"}]}).json()
        self.assertEqual((message["type"], message["role"], message["stop_reason"]),
                         ("message", "assistant", "max_tokens"))
        self.assertEqual(message["content"], [{"type": "text", "text": "The quick brown"}])


# ---------------------------------------------------------------------------
# Real clients over loopback

class _ConnectionTracker(WrappingFactory):
    """Knows the open server connections, to close them all at cleanup."""

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, protocol: Any) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        for protocol in list(self.protocols):
            protocol.transport.loseConnection()
        return waiter


class RealClientTests(TestCase):
    """The official clients, in a thread, against the fake on 127.0.0.1."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.fake = FakeOllama(reactor)  # type: ignore[arg-type]
        self.tracker = _ConnectionTracker(Site(self.fake.resource()))
        port = reactor.listenTCP(0, self.tracker, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.addCleanup(self.tracker.close_all)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    def post_generate(self) -> Deferred[IResponse]:
        """A streamed generate through treq, on a connection that is never pooled."""
        return treq.post(self.base + "/api/generate", json={"model": "llama3.2", "prompt": "hi"},
                         unbuffered=True, persistent=False)

    async def test_ollama_client_inference(self) -> None:
        def work() -> dict[str, Any]:
            with ollama.Client(host=self.base) as client:
                return {
                    "generate": client.generate(model="llama3.2", prompt="Hello"),
                    "generate_stream": list(client.generate(model="llama3.2", prompt="Hello", stream=True)),
                    "chat": client.chat(model="qwen3", messages=[{"role": "user", "content": "Hi"}]),
                    "chat_stream": list(client.chat(model="llama3.2", stream=True,
                                                    messages=[{"role": "user", "content": "Hi"}])),
                    "embed": client.embed(model="all-minilm", input=["a", "b"]),
                }

        got = await threads.deferToThread(work)
        self.assertEqual(got["generate"].response, "The quick brown fox jumps over the lazy")
        self.assertEqual(got["generate"].eval_count, 8)
        self.assertEqual("".join(c.response for c in got["generate_stream"]), got["generate"].response)
        self.assertTrue(got["generate_stream"][-1].done)
        self.assertTrue(got["chat"].message.thinking)
        self.assertEqual(got["chat_stream"][-1].done_reason, "stop")
        self.assertEqual(len(got["embed"].embeddings), 2)

    async def test_ollama_client_management_and_errors(self) -> None:
        def work() -> dict[str, Any]:
            with ollama.Client(host=self.base) as client:
                try:
                    client.generate(model="ghost", prompt="hi")
                except ollama.ResponseError as error:
                    missing = error
                return {
                    "list": client.list(), "show": client.show("qwen3"),
                    "pull": client.pull("phi3"), "pull_stream": list(client.pull("phi3", stream=True)),
                    "copy": client.copy("llama3.2", "mine"), "delete": client.delete("mine"),
                    "missing": missing,
                }

        got = await threads.deferToThread(work)
        self.assertEqual([m.model for m in got["list"].models],
                         ["llama3.2:latest", "qwen3:latest", "all-minilm:latest"])
        self.assertIn("thinking", got["show"].capabilities)
        self.assertEqual(got["pull"].status, "success")
        self.assertEqual(got["pull_stream"][-1].status, "success")
        self.assertEqual((got["copy"].status, got["delete"].status), ("success", "success"))
        self.assertEqual((got["missing"].status_code, got["missing"].error), (404, "model 'ghost' not found"))

    async def test_ollama_client_sees_midstream_errors(self) -> None:
        self.fake.inject(Fault.MIDSTREAM_ERROR, after_chunks=2)

        def work() -> tuple[int, ollama.ResponseError]:
            seen = 0
            with ollama.Client(host=self.base) as client:
                try:
                    for _ in client.generate(model="llama3.2", prompt="hi", stream=True):
                        seen += 1
                except ollama.ResponseError as error:
                    return seen, error
            raise AssertionError("no error raised")

        seen, error = await threads.deferToThread(work)
        self.assertEqual((seen, error.status_code, error.error), (2, -1, Fault.MIDSTREAM_ERROR.message))

    async def test_openai_client(self) -> None:
        def work() -> dict[str, Any]:
            with openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0) as client:
                messages: Any = [{"role": "user", "content": "Hello"}]
                return {
                    "chat": client.chat.completions.create(model="llama3.2", messages=messages),
                    "stream": list(client.chat.completions.create(
                        model="llama3.2", messages=messages, stream=True,
                        stream_options={"include_usage": True})),
                    "embed": client.embeddings.create(model="all-minilm", input=["a cat"]),
                    "models": list(client.models.list()),
                }

        got = await threads.deferToThread(work)
        self.assertEqual(got["chat"].choices[0].message.content, "The quick brown fox jumps over the lazy")
        self.assertEqual(got["chat"].usage.completion_tokens, 8)
        text = "".join(c.choices[0].delta.content or "" for c in got["stream"] if c.choices)
        self.assertEqual(text, got["chat"].choices[0].message.content)
        self.assertEqual(got["stream"][-1].usage.total_tokens, 1 + 8)
        self.assertEqual(len(got["embed"].data[0].embedding), 8)
        self.assertEqual([m.id for m in got["models"]], ["llama3.2:latest", "qwen3:latest", "all-minilm:latest"])

    async def test_client_disconnect_over_tcp_is_recorded(self) -> None:
        """A real socket closing mid-stream reaches the fake as a disconnect."""
        self.fake.inject(Fault.HANG_MIDSTREAM, after_chunks=1)
        left = self.fake.when_disconnected()
        response = await self.post_generate()
        collector = Collector()
        response.deliverBody(collector)
        await collector.first_data
        collector.hang_up()
        self.assertEqual(await left, b"/api/generate")
        await collector.done

    async def test_reset_over_tcp_fails_the_client(self) -> None:
        """An abort loses even what was written: the client sees no response at all."""
        self.fake.inject(Fault.RESET_BEFORE_HEADERS)
        with self.assertRaises(ResponseNeverReceived):
            await self.post_generate()
        self.assertEqual(self.fake.disconnects, [])
