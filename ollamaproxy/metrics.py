"""
Live metrics for Prometheus, from the same finished-request records that
become CSV rows.

Names follow the OpenTelemetry GenAI semantic conventions where one exists
(C{gen_ai.client.token.usage}, C{gen_ai.client.operation.duration},
C{gen_ai.server.time_to_first_token}, C{gen_ai.server.time_per_output_token}),
spelled the way Prometheus spells them; the rest are C{ollamaproxy_*}.

Label values are bounded: endpoints are Ollama's route names (anything else
is C{other}), models beyond the first L{MODEL_LABEL_LIMIT} distinct names
fold into C{other}, and client addresses, user agents, sessions and keys are
never labels.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from .record import RequestRecord

MODEL_LABEL_LIMIT = 100
MODEL_LABEL_LENGTH = 200

# From milliseconds to ten minutes: LLM requests span all of it.
SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600,
)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1)

_KNOWN_ENDPOINTS = frozenset(
    {
        "/", "/api/version", "/api/status", "/api/tags", "/api/show", "/api/ps",
        "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/pull",
        "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/me", "/api/signout",
        "/api/experimental/web_search", "/api/experimental/web_fetch",
        "/api/experimental/model-recommendations", "/v1/chat/completions",
        "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/responses",
        "/v1/messages", "/v1/audio/transcriptions",
    }
)


def endpoint_label(endpoint: str) -> str:
    if endpoint in _KNOWN_ENDPOINTS:
        return endpoint
    if endpoint.startswith("/api/blobs/"):
        return "/api/blobs/:digest"
    if endpoint.startswith("/v1/models/"):
        return "/v1/models/:model"
    return "other"


class Metrics:
    """
    A L{RecordSink} that counts every finished request, plus collectors that
    read the proxy's live state at scrape time.
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._models: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._refresh: Callable[[], Deferred[Any]] | None = None
        self.requests = Counter(
            "ollamaproxy_requests",
            "Requests by endpoint, model and HTTP status",
            ["endpoint", "model", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "ollamaproxy_tokens", "Tokens reported by Ollama", ["model", "type"], registry=registry
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request (OpenTelemetry gen_ai.client.token.usage)",
            ["gen_ai_request_model", "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Request duration as the client sees it (gen_ai.client.operation.duration)",
            ["gen_ai_request_model"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Arrival to first body byte sent (gen_ai.server.time_to_first_token)",
            ["gen_ai_request_model"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.time_per_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Decode time per output token (gen_ai.server.time_per_output_token)",
            ["gen_ai_request_model"],
            buckets=PER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "ollamaproxy_output_tokens_per_second",
            "Output tokens per second of decode time (eval_count / eval_duration)",
            ["model"],
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "ollamaproxy_queue_wait_seconds",
            "Arrival until the request was sent upstream (includes --max-concurrent waits)",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )

    def model_label(self, model: str) -> str:
        """
        C{model} as a label value: one of the first L{MODEL_LABEL_LIMIT}
        names seen, else C{other}; cut to a sane length and made encodable
        (a lone surrogate from a hostile body would break every scrape).
        """
        model = model[:MODEL_LABEL_LENGTH].encode("utf-8", "backslashreplace").decode("utf-8")
        if model in self._models:
            return model
        if len(self._models) >= MODEL_LABEL_LIMIT:
            return "other"
        self._models.add(model)
        return model

    def request_finished(self, record: RequestRecord) -> None:
        model = self.model_label(record.model)
        status = "" if record.http_status is None else str(record.http_status)
        self._child(self.requests, endpoint_label(record.endpoint), model, status).inc()
        for kind, count in (("input", record.input_tokens), ("output", record.output_tokens)):
            if count is not None:
                self._child(self.tokens, model, kind).inc(count)
                self._child(self.token_usage, model, kind).observe(count)
        if record.ended is not None:
            self._child(self.duration, model).observe(record.ended - record.arrived)
        if record.first_byte is not None:
            self._child(self.ttft, model).observe(record.first_byte - record.arrived)
        if record.sent_upstream is not None:
            self.queue_wait.observe(record.sent_upstream - record.arrived)
        if record.output_tokens and record.ollama_eval_ns:
            self._child(self.tokens_per_second, model).observe(
                record.output_tokens / record.ollama_eval_ns * 1e9
            )
            self._child(self.time_per_token, model).observe(
                record.ollama_eval_ns / 1e9 / record.output_tokens
            )

    def _child(self, metric: Any, *labels: str) -> Any:
        """
        C{metric.labels(*labels)}, remembered: the lookup takes a lock and
        builds a key each time, and these few children are used per request.
        """
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def watch(self, forwarder: Any, csv_log: Any, sampler: Any, probe: Any) -> None:
        """
        Also report, at each scrape, the live state of these parts; a scrape
        first refreshes the upstream probe (it is cached for a second).
        """
        self.registry.register(_LiveState(forwarder, csv_log, sampler, probe))
        self._refresh = probe.check

    def resource(self) -> Resource:
        return MetricsResource(self.registry, self._refresh)


class _LiveState(Collector):
    def __init__(self, forwarder: Any, csv_log: Any, sampler: Any, probe: Any) -> None:
        self._forwarder = forwarder
        self._csv_log = csv_log
        self._sampler = sampler
        self._probe = probe

    def collect(self) -> Iterator[Any]:
        gate = self._forwarder.gate
        yield GaugeMetricFamily(
            "ollamaproxy_requests_in_flight",
            "Requests in the proxy now (queued ones included)",
            value=len(self._forwarder.active),
        )
        yield GaugeMetricFamily(
            "ollamaproxy_requests_queued", "Requests waiting for a slot", value=gate.queued
        )
        latest = self._probe.latest
        yield GaugeMetricFamily(
            "ollamaproxy_upstream_up",
            "1 if the upstream answered the last health probe, 0 if not, absent if never probed",
            value=(1 if latest.reachable else 0) if latest is not None else float("nan"),
        )
        log = self._csv_log
        yield CounterMetricFamily(
            "ollamaproxy_csv_rows_written", "CSV rows written", value=log.rows_written
        )
        yield CounterMetricFamily(
            "ollamaproxy_csv_rows_dropped", "CSV rows lost (buffer full)", value=log.rows_dropped
        )
        yield GaugeMetricFamily(
            "ollamaproxy_csv_rows_buffered",
            "CSV rows held in memory while the file cannot be written",
            value=log.rows_buffered,
        )
        for name, value, text in (
            ("ollamaproxy_host_cpu_percent", self._sampler.cpu, "Host CPU use, all cores"),
            ("ollamaproxy_host_memory_percent", self._sampler.memory, "Host memory use"),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)


class MetricsResource(Resource):
    """
    The registry in Prometheus' text (or OpenMetrics, if asked) format.

    prometheus_client's own Twisted resource is a WSGI wrapper that imports
    the global reactor when imported and renders every scrape on a thread
    pool; this renders on the reactor with the same encoder, which takes
    about a millisecond.
    """

    isLeaf = True

    def __init__(
        self, registry: CollectorRegistry, refresh: Callable[[], Deferred[Any]] | None = None
    ) -> None:
        super().__init__()
        self._registry = registry
        self._refresh = refresh

    def render_GET(self, request: Request) -> Any:
        if self._refresh is None:
            return self._render(request)
        self._refresh().addBoth(lambda _: self._send(request))
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> Any:
        return self.render_GET(request)

    def _send(self, request: Request) -> None:
        if request.finished or request.channel is None:
            return
        body = self._render(request)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _render(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.responseHeaders.removeHeader(b"server")
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self._registry)
