"""
Every CSV column, driven through the proxy for each kind of request and
each way a request can end.  Times come from a task.Clock, so they are
exact: the fake Ollama writes one token per second of that clock.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

import treq
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed
from twisted.web.iweb import IAgent
from zope.interface import implementer

from ollamaproxy.gate import Gate
from ollamaproxy.record import COLUMNS, RequestRecord
from ollamaproxy.testing.fake_ollama import Fault

from .support import WALL, HangUpAfter, InMemoryProxy, csv_dicts

CHAT_MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


def row(record: RequestRecord) -> dict[str, str]:
    return dict(zip(COLUMNS, record.cells()))


class StreamedGenerateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = InMemoryProxy(token_delay=1.0, host_load=(12.5, 40.25))
        pending = self.proxy.start(
            "POST",
            "/api/generate",
            {"model": "llama3.2", "prompt": "Why is the sky blue?", "options": {"num_predict": 3, "temperature": 0.2}, "keep_alive": "5m"},
            headers={b"user-agent": [b"ollama-python/0.6.3"], b"x-session-id": [b"s-42"]},
        )
        for _ in range(3):
            self.proxy.advance(1.0)
        response = self.successResultOf(pending)
        self.body = self.proxy.read(self, response)
        self.row = row(self.proxy.records.only)

    def test_identity_columns(self) -> None:
        """
        Who, what, which model, and the session, as received.
        """
        r = self.row
        arrived = datetime.fromtimestamp(WALL, timezone.utc)
        self.assertEqual(r["timestamp"], arrived.strftime("%Y-%m-%dT%H:%M:%S.") + "250Z")
        self.assertRegex(r["request_id"], r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
        self.assertEqual(r["ip_source"], "127.0.0.1")
        self.assertEqual(r["user_agent"], "ollama-python/0.6.3")
        self.assertEqual((r["http_method"], r["endpoint"], r["model"]), ("POST", "/api/generate", "llama3.2"))
        self.assertEqual(r["session_id"], "s-42")
        self.assertEqual(r["model_parameters"], '{"keep_alive":"5m","num_predict":3,"temperature":0.2}')
        self.assertEqual((r["http_status"], r["error_message"], r["stream_mode"]), ("200", "", "true"))

    def test_token_and_size_columns(self) -> None:
        """
        Tokens are Ollama's counts from the final line; sizes are body bytes.
        """
        r = self.row
        final = json.loads(self.body.splitlines()[-1])
        self.assertEqual(r["input_tokens"], str(final["prompt_eval_count"]))
        self.assertEqual(r["output_tokens"], "3")
        self.assertEqual(r["total_tokens"], str(final["prompt_eval_count"] + 3))
        self.assertEqual(r["response_size_bytes"], str(len(self.body)))
        sent = self.proxy.fake.received[0].body
        self.assertEqual(r["request_size_bytes"], str(len(sent)))
        self.assertEqual(r["done_reason"], "length")

    def test_time_columns(self) -> None:
        """
        Sent upstream at once; first token after 1 s; last after 3 s; Ollama's
        own durations come from its final line.
        """
        r = self.row
        self.assertEqual(r["queue_time_ms"], "0.000")
        self.assertEqual(r["processing_time_ms"], "3000.000")
        self.assertEqual(r["total_time_ms"], "3000.000")
        self.assertEqual(r["ttft_ms"], "1000.000")
        final = json.loads(self.body.splitlines()[-1])
        self.assertEqual(r["ollama_eval_ms"], f"{final['eval_duration'] / 1e6:.3f}")
        self.assertEqual(r["ollama_load_ms"], f"{final['load_duration'] / 1e6:.3f}")
        self.assertEqual(r["ollama_prompt_eval_ms"], f"{final['prompt_eval_duration'] / 1e6:.3f}")
        self.assertEqual(r["tokens_per_second"], f"{3 / (final['eval_duration'] / 1e9):.2f}")

    def test_host_load_and_concurrency(self) -> None:
        """
        Host load is the sampler's latest reading; concurrency counts this
        request itself.
        """
        r = self.row
        self.assertEqual((r["system_load_cpu"], r["system_load_memory"]), ("12.5", "40.2"))
        self.assertEqual(r["concurrent_requests"], "1")


class RouteColumnTests(SynchronousTestCase):
    """
    One request of each kind: what it puts in model, tokens, stream_mode,
    done_reason and error_message.
    """

    def one(self, method: str, path: str, body: Any = None, **options: Any) -> dict[str, str]:
        proxy = InMemoryProxy(**options)
        response = proxy.send(self, method, path, body)
        proxy.read(self, response)
        return row(proxy.records.only)

    def expect(self, r: dict[str, str], **expected: str) -> None:
        self.assertEqual({name: r[name] for name in expected}, expected)

    def test_generate_not_streamed(self) -> None:
        r = self.one("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi", "stream": False})
        self.expect(r, model="llama3.2", stream_mode="false", output_tokens="8", done_reason="stop", error_message="")
        self.assertTrue(int(r["input_tokens"]) > 0)

    def test_chat_streamed_and_not(self) -> None:
        for stream, mode in ((True, "true"), (False, "false")):
            r = self.one("POST", "/api/chat", {"model": "llama3.2", "messages": CHAT_MESSAGES, "stream": stream})
            self.expect(r, model="llama3.2", stream_mode=mode, output_tokens="8", done_reason="stop")

    def test_embed_counts_prompt_tokens_only(self) -> None:
        """
        /api/embed reports only prompt_eval_count: output stays empty, total
        equals input.
        """
        r = self.one("POST", "/api/embed", {"model": "all-minilm", "input": ["one two", "three"]})
        self.expect(r, model="all-minilm", output_tokens="", stream_mode="false")
        self.assertEqual(r["total_tokens"], r["input_tokens"])
        self.assertNotEqual(r["input_tokens"], "")

    def test_legacy_embeddings_report_nothing(self) -> None:
        """
        /api/embeddings reports no counts: empty cells, never 0.
        """
        r = self.one("POST", "/api/embeddings", {"model": "all-minilm", "prompt": "x"})
        self.expect(r, model="all-minilm", input_tokens="", output_tokens="", total_tokens="")

    def test_openai_chat_streamed_without_usage_still_counted(self) -> None:
        """
        The proxy asks Ollama for usage on the client's behalf.
        """
        r = self.one("POST", "/v1/chat/completions", {"model": "llama3.2", "stream": True, "max_tokens": 5, "messages": CHAT_MESSAGES})
        self.expect(r, stream_mode="true", output_tokens="5", done_reason="length", model_parameters='{"max_tokens":5}')
        self.assertNotEqual(r["input_tokens"], "")

    def test_openai_usage_injection_can_be_turned_off(self) -> None:
        """
        With usage injection off, an OpenAI stream without include_usage has
        empty token cells.
        """
        from ollamaproxy.proxy import Limits

        r = self.one(
            "POST", "/v1/chat/completions",
            {"model": "llama3.2", "stream": True, "max_tokens": 5, "messages": CHAT_MESSAGES},
            limits=Limits(inject_usage=False),
        )
        self.expect(r, stream_mode="true", input_tokens="", output_tokens="")

    def test_openai_chat_with_client_usage_and_not_streamed(self) -> None:
        for body in (
            {"model": "llama3.2", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4, "messages": CHAT_MESSAGES},
            {"model": "llama3.2", "max_tokens": 4, "messages": CHAT_MESSAGES},
        ):
            r = self.one("POST", "/v1/chat/completions", body)
            self.expect(r, output_tokens="4", stream_mode="true" if body.get("stream") else "false")

    def test_openai_embeddings_responses_and_messages(self) -> None:
        r = self.one("POST", "/v1/embeddings", {"model": "all-minilm", "input": "hello there"})
        self.expect(r, model="all-minilm", output_tokens="")
        self.assertNotEqual(r["input_tokens"], "")
        r = self.one("POST", "/v1/responses", {"model": "llama3.2", "input": "hi", "stream": True, "max_output_tokens": 3})
        self.expect(r, stream_mode="true", output_tokens="3")
        r = self.one("POST", "/v1/messages", {"model": "llama3.2", "max_tokens": 2, "messages": CHAT_MESSAGES, "stream": True})
        self.expect(r, stream_mode="true", output_tokens="2", done_reason="max_tokens")

    def test_model_from_the_path(self) -> None:
        r = self.one("GET", "/v1/models/llama3.2:latest")
        self.expect(r, model="llama3.2:latest", http_status="200")

    def test_pull_tags_show(self) -> None:
        self.expect(self.one("POST", "/api/pull", {"model": "llama3.2"}), model="llama3.2", stream_mode="true", input_tokens="")
        self.expect(self.one("GET", "/api/tags"), model="", stream_mode="false", http_status="200")
        self.expect(self.one("POST", "/api/show", {"name": "llama3.2"}), model="llama3.2")
        self.expect(self.one("POST", "/api/copy", {"source": "llama3.2", "destination": "x"}), model="llama3.2")

    def test_errors_from_ollama(self) -> None:
        """
        Unknown path, unknown model and a 500 carry Ollama's own text.
        """
        self.expect(self.one("GET", "/api/nowhere"), http_status="404", error_message="404 page not found")
        self.expect(
            self.one("POST", "/api/generate", {"model": "nope", "prompt": "x"}),
            http_status="404", error_message="model 'nope' not found", model="nope",
        )
        self.expect(
            self.one("POST", "/v1/chat/completions", {"model": "nope", "messages": CHAT_MESSAGES}),
            http_status="404", error_message="model 'nope' not found",
        )
        proxy = InMemoryProxy()
        proxy.fake.inject(Fault.status(500, "llama runner process has terminated: exit status 2"))
        proxy.read(self, proxy.send(self, "POST", "/api/chat", {"model": "llama3.2", "messages": CHAT_MESSAGES}))
        self.expect(row(proxy.records.only), http_status="500", error_message="llama runner process has terminated: exit status 2")

    def test_mid_stream_error_and_cut_stream(self) -> None:
        """
        A mid-stream error line is a failure under 200; a stream the upstream
        cuts says how many bytes got through.
        """
        proxy = InMemoryProxy()
        proxy.fake.inject(Fault.MIDSTREAM_ERROR, after_chunks=1)
        proxy.read(self, proxy.send(self, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x"}))
        r = row(proxy.records.only)
        self.expect(r, http_status="200", output_tokens="")
        self.assertNotEqual(r["error_message"], "")

        proxy = InMemoryProxy(token_delay=1.0)
        proxy.fake.inject(Fault.RESET_MIDSTREAM, after_chunks=2)
        pending = proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
        proxy.advance(1)
        received: list[bytes] = []
        done = treq.collect(self.successResultOf(pending), received.append)
        proxy.advance(1)
        proxy.advance(1)
        self.failureResultOf(done, ResponseFailed)
        body = b"".join(received)
        # Two chunks at 1 s and 2 s, the reset when the third was due.
        self.assertEqual(len(body.splitlines()), 2)
        r = row(proxy.records.only)
        self.assertEqual((r["http_status"], r["response_size_bytes"]), ("200", str(len(body))))
        self.assertEqual(r["error_message"], f"upstream connection lost after {len(body)} bytes of the response")
        self.assertEqual(r["processing_time_ms"], "3000.000")

    def test_unreachable_upstream(self) -> None:
        """
        A refused upstream connection: 502, and no processing time starts
        counting before the request was sent.
        """
        r = self.one("POST", "/api/chat", {"model": "llama3.2", "messages": CHAT_MESSAGES}, upstream_agent=RefusingAgent())
        self.expect(r, http_status="502", model="llama3.2", response_size_bytes=str(len(r["error_message"]) + len('{"error": ""}')))
        self.assertIn("connection refused", r["error_message"])


@implementer(IAgent)
class RefusingAgent:
    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        return fail(ConnectionRefusedError())


class ClientLeavesTests(SynchronousTestCase):
    def test_disconnect_mid_stream(self) -> None:
        """
        A client that leaves mid-stream: its status stays the one it got, and
        the row says how many bytes it had.
        """
        proxy = InMemoryProxy(token_delay=1.0)
        pending = proxy.start("POST", "/api/chat", {"model": "llama3.2", "messages": CHAT_MESSAGES})
        proxy.advance(1)
        response = self.successResultOf(pending)
        reader = HangUpAfter(1)
        response.deliverBody(reader)
        proxy.flush()
        self.successResultOf(reader.hung_up)
        proxy.advance(1)
        r = row(proxy.records.only)
        self.assertEqual(r["http_status"], "200")
        self.assertEqual(r["error_message"], f"client disconnected after {len(reader.received)} bytes")
        self.assertEqual(proxy.fake.disconnects, [b"/api/chat"])

    def test_disconnect_while_queued(self) -> None:
        """
        With --max-concurrent 1, a request waits for the slot (its queue time
        shows it); one that leaves while waiting never reaches Ollama and is
        logged as 499.
        """
        proxy = InMemoryProxy(token_delay=1.0, gate=Gate(1, 512))
        first = proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "a", "options": {"num_predict": 3}})
        second = proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "b", "options": {"num_predict": 1}})
        leaver = proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "c"})
        proxy.flush()
        self.assertEqual(len(proxy.fake.received), 1)
        leaver.cancel()
        self.failureResultOf(leaver)
        proxy.flush()
        for _ in range(5):
            proxy.advance(1)
        proxy.read(self, self.successResultOf(first))
        proxy.read(self, self.successResultOf(second))
        self.assertEqual(len(proxy.records.all), 3)
        gone = [row(rec) for rec in proxy.records.all if rec.http_status == 499]
        self.assertEqual(len(gone), 1)
        self.assertEqual(gone[0]["error_message"], "client disconnected while queued")
        self.assertEqual(gone[0]["processing_time_ms"], "")
        waited = [row(rec) for rec in proxy.records.all if rec.output_tokens == 1]
        self.assertEqual(waited[0]["queue_time_ms"], "3000.000")
        self.assertEqual(len(proxy.fake.received), 2)

    def test_queue_full(self) -> None:
        """
        Past --max-queue, requests get 503 with Ollama's queue-full text.
        """
        proxy = InMemoryProxy(token_delay=1.0, gate=Gate(1, 0))
        proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "a"})
        refused = proxy.send(self, "POST", "/api/chat", {"model": "llama3.2", "messages": CHAT_MESSAGES})
        self.assertEqual(refused.code, 503)
        body = json.loads(proxy.read(self, refused))
        self.assertEqual(body, {"error": "server busy, please try again.  maximum pending requests exceeded"})


HOSTILE = [
    '=HYPERLINK("http://evil.example","click")',
    "+1+1",
    "-2+3",
    "@SUM(A1:A2)",
    'comma, "quoted", and more',
    "ünïcødé ✓ 模型",
]


class FileTests(SynchronousTestCase):
    def test_hostile_values_round_trip_through_csv_and_pandas(self) -> None:
        """
        Commas, quotes, newlines, unicode and formula triggers in any
        outside text survive csv.reader and pandas.read_csv; formula
        triggers gain a leading quote so spreadsheets show them as text.
        """
        logs = self.mktemp()
        proxy = InMemoryProxy(csv_dir=logs)
        for value in HOSTILE:
            proxy.read(
                self,
                proxy.send(
                    self, "POST", "/api/generate",
                    {"model": value + "\nsecond line", "prompt": "x", "stream": False},
                    headers={b"user-agent": [value.encode()], b"x-session-id": [value.encode()]},
                ),
            )
        path = os.path.join(logs, "ollama-proxy.csv")
        rows = csv_dicts(path)
        self.assertEqual(len(rows), len(HOSTILE))
        for value, r in zip(HOSTILE, rows):
            guarded = ("'" + value) if value[0] in "=+-@" else value
            self.assertEqual(r["user_agent"], guarded)
            self.assertEqual(r["session_id"], guarded)
            self.assertEqual(r["model"], guarded + "\nsecond line")
            self.assertEqual(r["http_status"], "404")

        import pandas

        frame = pandas.read_csv(path, dtype={"session_id": str, "user_agent": str, "model": str})
        self.assertEqual(list(frame.columns), list(COLUMNS))
        self.assertEqual(len(frame), len(HOSTILE))
        self.assertEqual(list(frame["http_status"]), [404] * len(HOSTILE))
        self.assertEqual(frame["model"][5], HOSTILE[5] + "\nsecond line")


class ReportOnProxyLogTests(SynchronousTestCase):
    def test_report_reads_what_the_proxy_wrote(self) -> None:
        """
        The report, run on the CSV file the proxy wrote for a known set of
        requests, counts them per model with their errors, tokens, times and
        speeds.
        """
        import io

        from ollamaproxy.report import main

        logs = self.mktemp()
        proxy = InMemoryProxy(token_delay=1.0, csv_dir=logs)
        pending = [
            proxy.start("POST", "/api/generate", {"model": "llama3.2", "prompt": "a", "options": {"num_predict": n}})
            for n in (2, 4)
        ]
        pending.append(proxy.start("POST", "/api/embed", {"model": "all-minilm", "input": "one two three"}))
        pending.append(proxy.start("POST", "/api/generate", {"model": "nope", "prompt": "x"}))
        for _ in range(5):
            proxy.advance(1.0)
        for d in pending:
            proxy.read(self, self.successResultOf(d))
        out = io.StringIO()
        self.assertEqual(main(["--format", "json", logs], stdout=out, stderr=io.StringIO()), 0)
        groups = {g["model"]: g for g in json.loads(out.getvalue())["groups"]}
        llama = groups["llama3.2"]
        self.assertEqual((llama["requests"], llama["errors"], llama["output_tokens"]), (2, 0, 6))
        # Each token takes one second of the test clock: 2 s and 4 s.
        self.assertEqual((llama["p50_total_ms"], llama["p50_ttft_ms"]), (3000.0, 1000.0))
        self.assertEqual(llama["median_tokens_per_second"], 1.0)
        self.assertEqual(groups["nope"]["errors"], 1)
        self.assertIsNone(groups["all-minilm"]["output_tokens"])  # never reported
        self.assertGreater(groups["all-minilm"]["input_tokens"], 0)


class LongLineTests(SynchronousTestCase):
    def test_an_8_mb_line_passes_whole_and_is_read(self) -> None:
        """
        A single 8 MB NDJSON line (a final line with a huge context array)
        reaches the client intact, however the network cuts it, and its
        counts still reach the row.
        """
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET
        from treq.testing import RequestTraversalAgent

        context = ",".join(["123456"] * 1_200_000)
        final = (
            '{"model":"m","response":"","done":true,"done_reason":"stop","context":[' + context + '],'
            '"prompt_eval_count":7,"eval_count":1200000,"eval_duration":1000000000}\n'
        ).encode()
        self.assertGreater(len(final), 8 * 1024 * 1024)

        class Upstream(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                request.setHeader(b"content-type", b"application/x-ndjson")
                request.write(b'{"model":"m","response":"hi","done":false}\n')
                for start in range(0, len(final), 65536):
                    request.write(final[start : start + 65536])
                request.finish()
                return NOT_DONE_YET

        proxy = InMemoryProxy(upstream_agent=RequestTraversalAgent(Upstream()))
        body = proxy.read(self, proxy.send(self, "POST", "/api/generate", {"model": "m", "prompt": "x"}))
        self.assertEqual(body, b'{"model":"m","response":"hi","done":false}\n' + final)
        r = row(proxy.records.only)
        self.assertEqual((r["input_tokens"], r["output_tokens"], r["done_reason"]), ("7", "1200000", "stop"))
