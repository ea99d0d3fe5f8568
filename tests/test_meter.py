"""
Reading metrics out of response bodies as they stream past.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from ollamaproxy import meter
from ollamaproxy.meter import meter_for
from ollamaproxy.record import RequestRecord

DONE_LINE = (
    b'{"model":"llama3.2","created_at":"2025-10-26T17:15:24Z","response":"!","done":true,'
    b'"done_reason":"stop","context":[1,2,3],"total_duration":4935886791,'
    b'"load_duration":534986708,"prompt_eval_count":26,"prompt_eval_duration":107345000,'
    b'"eval_count":237,"eval_duration":4289432000}\n'
)
CHUNK_LINE = b'{"model":"llama3.2","created_at":"2025-10-26T17:15:24Z","response":"Hi","done":false}\n'


def new_record() -> RequestRecord:
    return RequestRecord(request_id="r", arrived_wall=0.0, arrived=0.0)


def feed_in_pieces(m: meter.Meter, body: bytes, size: int) -> bytes:
    out = [m.feed(body[i : i + size]) for i in range(0, len(body), size)]
    out.append(m.end())
    return b"".join(out)


class NdjsonMeterTests(SynchronousTestCase):
    def test_done_line_metrics_whatever_the_chunking(self) -> None:
        """
        The final line's counts and durations are read however the network
        cut the stream, down to one byte per chunk, and the bytes pass
        unchanged.
        """
        body = CHUNK_LINE * 3 + DONE_LINE
        for size in (1, 7, 64, len(body)):
            record = new_record()
            m = meter_for(record, b"/api/generate", 200, b"application/x-ndjson", False)
            self.assertEqual(feed_in_pieces(m, body, size), body)
            self.assertEqual(
                (record.input_tokens, record.output_tokens, record.done_reason),
                (26, 237, "stop"),
            )
            self.assertEqual(record.ollama_load_ns, 534986708)
            self.assertEqual(record.ollama_prompt_eval_ns, 107345000)
            self.assertEqual(record.ollama_eval_ns, 4289432000)
            self.assertEqual(record.error_message, "")

    def test_generated_text_that_looks_like_a_marker_is_not_parsed(self) -> None:
        """
        Quotes inside generated text are escaped, so text that reads
        "done":true does not count as the final line.
        """
        tricky = b'{"response":"say \\"done\\":true and \\"error\\"","done":false}\n'
        record = new_record()
        m = meter_for(record, b"/api/generate", 200, b"application/x-ndjson", False)
        m.feed(tricky)
        m.end()
        self.assertIsNone(record.output_tokens)
        self.assertEqual(record.error_message, "")

    def test_mid_stream_error_line(self) -> None:
        """
        A final {"error": ...} line under status 200 is the request's error.
        """
        record = new_record()
        m = meter_for(record, b"/api/chat", 200, b"application/x-ndjson", False)
        feed_in_pieces(m, CHUNK_LINE + b'{"error":"an error was encountered while running the model"}\n', 5)
        self.assertEqual(record.error_message, "an error was encountered while running the model")
        self.assertIsNone(record.output_tokens)

    def test_missing_counts_stay_empty(self) -> None:
        """
        Ollama omits zero counts; an omitted count is None, never 0.
        """
        record = new_record()
        m = meter_for(record, b"/api/generate", 200, b"application/x-ndjson", False)
        m.feed(b'{"done":true,"done_reason":"load"}\n')
        m.end()
        self.assertEqual(record.done_reason, "load")
        self.assertIsNone(record.input_tokens)
        self.assertIsNone(record.output_tokens)

    def test_overlong_line_is_given_up_not_misread(self) -> None:
        """
        A line longer than the meter will hold is forwarded but not parsed,
        and the line after it is still read.
        """
        self.patch(meter, "RECORD_LIMIT", 100)
        record = new_record()
        m = meter_for(record, b"/api/generate", 200, b"application/x-ndjson", False)
        long_line = b'{"response":"' + b"x" * 500 + b'","done":true,"eval_count":1}\n'
        body = long_line + b'{"done":true,"eval_count":5}\n'
        self.assertEqual(feed_in_pieces(m, body, 30), body)
        self.assertEqual(record.output_tokens, 5)


class JsonMeterTests(SynchronousTestCase):
    def test_embed_counts_without_keeping_vectors(self) -> None:
        """
        /api/embed reports prompt_eval_count; the vectors are skipped.
        """
        body = json.dumps(
            {"model": "all-minilm", "embeddings": [[0.1] * 2000], "total_duration": 1,
             "load_duration": 2, "prompt_eval_count": 8}
        ).encode()
        record = new_record()
        m = meter_for(record, b"/api/embed", 200, b"application/json; charset=utf-8", False)
        self.assertEqual(feed_in_pieces(m, body, 1000), body)
        self.assertEqual((record.input_tokens, record.output_tokens), (8, None))

    def test_openai_usage_and_error_shapes(self) -> None:
        """
        /v1 replies carry usage and {"error": {"message": ...}}.
        """
        record = new_record()
        m = meter_for(record, b"/v1/chat/completions", 200, b"application/json", False)
        feed_in_pieces(
            m,
            b'{"id":"chatcmpl-1","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},'
            b'"finish_reason":"length"}],"usage":{"prompt_tokens":26,"completion_tokens":5,"total_tokens":31}}\n',
            9,
        )
        self.assertEqual((record.input_tokens, record.output_tokens, record.done_reason), (26, 5, "length"))
        record = new_record()
        m = meter_for(record, b"/v1/chat/completions", 404, b"application/json", False)
        feed_in_pieces(
            m,
            b'{"error":{"message":"model \'x\' not found","type":"not_found_error","param":null,"code":null}}\n',
            4,
        )
        self.assertEqual(record.error_message, "model 'x' not found")

    def test_plain_text_error(self) -> None:
        """
        A plain-text error body becomes the error message.
        """
        record = new_record()
        m = meter_for(record, b"/nope", 404, b"text/plain", False)
        feed_in_pieces(m, b"404 page not found", 3)
        self.assertEqual(record.error_message, "404 page not found")


def sse(*events: dict | str) -> bytes:
    out = b""
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
        out += b"data: " + data.encode() + b"\n\n"
    return out


CHAT_EVENTS = [
    {"id": "chatcmpl-7", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]},
    {"id": "chatcmpl-7", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
]
USAGE_EVENT = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}}


class SseMeterTests(SynchronousTestCase):
    def test_strip_removes_exactly_the_usage_event(self) -> None:
        """
        In strip mode the client gets exactly the stream Ollama sends when
        usage was not asked for, however the chunks fall, and the record
        still has the counts.
        """
        with_usage = sse(*CHAT_EVENTS, USAGE_EVENT, "[DONE]")
        without_usage = sse(*CHAT_EVENTS, "[DONE]")
        for size in (1, 3, 50, len(with_usage)):
            record = new_record()
            m = meter_for(record, b"/v1/chat/completions", 200, b"text/event-stream", True)
            self.assertEqual(feed_in_pieces(m, with_usage, size), without_usage)
            self.assertEqual((record.input_tokens, record.output_tokens), (11, 4))
            self.assertEqual(record.done_reason, "stop")
            self.assertEqual(record.error_message, "")

    def test_client_asked_for_usage_keeps_it(self) -> None:
        """
        Without strip mode every byte passes, the usage event included.
        """
        body = sse(*CHAT_EVENTS, USAGE_EVENT, "[DONE]")
        record = new_record()
        m = meter_for(record, b"/v1/chat/completions", 200, b"text/event-stream", False)
        self.assertEqual(feed_in_pieces(m, body, 10), body)
        self.assertEqual(record.output_tokens, 4)

    def test_stream_without_done_is_a_failure(self) -> None:
        """
        Ollama's /v1 layer drops a mid-stream error's text and ends without
        [DONE]; that is recorded as a failure.
        """
        record = new_record()
        m = meter_for(record, b"/v1/chat/completions", 200, b"text/event-stream", False)
        feed_in_pieces(m, sse(CHAT_EVENTS[0]), 100)
        self.assertIn("[DONE]", record.error_message)

    def test_overlong_event_stops_stripping_without_losing_bytes(self) -> None:
        """
        An event too long to hold passes through whole and stripping stops.
        """
        self.patch(meter, "RECORD_LIMIT", 50)
        body = sse(CHAT_EVENTS[0], {"big": "x" * 200}, USAGE_EVENT, "[DONE]")
        record = new_record()
        m = meter_for(record, b"/v1/chat/completions", 200, b"text/event-stream", True)
        self.assertEqual(feed_in_pieces(m, body, 20), body)

    def test_anthropic_and_responses_usage(self) -> None:
        """
        /v1/messages reports input tokens on message_start and output tokens
        on message_delta; /v1/responses reports both on response.completed.
        """
        messages = (
            b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":9,"output_tokens":0}}}\n\n'
            b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":"hi"}}\n\n'
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":3}}\n\n'
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        )
        record = new_record()
        m = meter_for(record, b"/v1/messages", 200, b"text/event-stream", False)
        feed_in_pieces(m, messages, 13)
        self.assertEqual((record.input_tokens, record.output_tokens, record.done_reason), (9, 3, "end_turn"))
        self.assertEqual(record.error_message, "")
        responses = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
            b'event: response.completed\ndata: {"type":"response.completed","response":{"status":"completed",'
            b'"usage":{"input_tokens":12,"output_tokens":6,"total_tokens":18}}}\n\n'
        )
        record = new_record()
        m = meter_for(record, b"/v1/responses", 200, b"text/event-stream", False)
        feed_in_pieces(m, responses, 17)
        self.assertEqual((record.input_tokens, record.output_tokens), (12, 6))
