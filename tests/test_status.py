"""
The proxy's own endpoints (/health, /health/ready, /metrics) and its
orderly shutdown.
"""

from __future__ import annotations

import os

import treq
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed

from ollamaproxy.metrics import MODEL_LABEL_LIMIT, Metrics
from ollamaproxy.record import RequestRecord
from ollamaproxy.testing.fake_ollama import FakeOllama

from .rawhttp import connect
from .support import PATIENCE, LiveProxy, eventually, http_client, within



def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class HealthTests(TestCase):
    async def test_health_reports_upstream_log_and_load(self) -> None:
        """
        /health is 200 with the upstream's reachability and version, uptime,
        in-flight requests, and the log file's path and state; it writes no
        CSV row.
        """
        proxy = LiveProxy(self)
        response = await http_client(self).get(proxy.url + "/health")
        self.assertEqual(response.code, 200)
        health = await response.json()
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["upstream"]["reachable"], True)
        self.assertEqual(health["upstream"]["version"], "0.12.6")
        self.assertEqual(health["upstream"]["url"], f"http://127.0.0.1:{proxy.fake_port.getHost().port}")
        self.assertEqual(health["log"]["path"], os.path.abspath(proxy.csv))
        self.assertTrue(health["log"]["writable"])
        self.assertEqual(health["in_flight"], 0)
        self.assertGreaterEqual(health["uptime_seconds"], 0)
        ready = await http_client(self).get(proxy.url + "/health/ready")
        self.assertEqual(ready.code, 200)
        await ready.text()
        self.assertEqual(proxy.rows(), [])

    async def test_degraded_and_not_ready_when_upstream_is_down(self) -> None:
        """
        With Ollama down, /health still answers 200 but says degraded, and
        /health/ready answers 503 with the reason.
        """
        proxy = LiveProxy(self)
        await proxy.fake_port.stopListening()
        health = await (await http_client(self).get(proxy.url + "/health")).json()
        self.assertEqual(health["status"], "degraded")
        self.assertFalse(health["upstream"]["reachable"])
        self.assertIn("refused", health["upstream"]["error"].lower())
        ready = await http_client(self).get(proxy.url + "/health/ready")
        self.assertEqual(ready.code, 503)
        self.assertIn("upstream not answering", (await ready.json())["reasons"][0])


class ProbeCacheTests(SynchronousTestCase):
    def test_probe_result_is_reused_for_a_second(self) -> None:
        """
        Health checks cost Ollama at most one /api/version a second.
        """
        from ollamaproxy.health import UpstreamProbe
        from ollamaproxy.upstream import Upstream

        clock = Clock()
        fake = FakeOllama(clock)
        agent = RequestTraversalAgent(fake.resource())
        probe = UpstreamProbe(agent, Upstream(b"http://127.0.0.1:11434"), clock, clock.seconds)
        for _ in range(3):
            d = probe.check()
            agent.flush()
            self.assertTrue(self.successResultOf(d).reachable)
        self.assertEqual(len(fake.received), 1)
        clock.advance(1.5)
        d = probe.check()
        agent.flush()
        self.successResultOf(d)
        self.assertEqual(len(fake.received), 2)


    def test_a_probe_that_never_finishes_times_out(self) -> None:
        """
        An upstream that sends headers and then part of a body, and goes
        silent, makes the probe report it unreachable after its timeout
        instead of hanging /health.
        """
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        from ollamaproxy.health import UpstreamProbe
        from ollamaproxy.upstream import Upstream

        class Stuck(Resource):
            isLeaf = True

            def render(self, request):  # type: ignore[no-untyped-def]
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"version":')
                return NOT_DONE_YET

        clock = Clock()
        agent = RequestTraversalAgent(Stuck())
        probe = UpstreamProbe(agent, Upstream(b"http://127.0.0.1:11434"), clock, clock.seconds, timeout=2)
        d = probe.check()
        agent.flush()
        self.assertNoResult(d)
        clock.advance(2)
        agent.flush()
        result = self.successResultOf(d)
        self.assertFalse(result.reachable)
        self.assertEqual(result.error, "no answer within 2 s")


class ShutdownTests(TestCase):
    async def test_grace_period_then_abort_with_a_row(self) -> None:
        """
        A stream still running when the grace period ends is cut (long
        before its natural end, 200 s away), and its row is written whole,
        saying why.
        """
        proxy = LiveProxy(self, token_delay=0.02, args=["--grace-period", "0.3"])
        stream = await within(http_client(self).post(
            proxy.url + "/api/generate",
            json={"model": "llama3.2", "prompt": "x", "options": {"num_predict": 10_000}},
            unbuffered=True,
        ))
        body = treq.content(stream)
        await within(proxy.service.stopService())
        with self.assertRaises(ResponseFailed):
            await within(body)
        [row] = proxy.rows()
        self.assertEqual(row["http_status"], "200")
        self.assertEqual(row["error_message"], "proxy shut down before the request finished")

    async def test_stops_accepting_at_once(self) -> None:
        """
        Once shutdown begins, new connections are refused.
        """
        proxy = LiveProxy(self)
        await within(proxy.service.stopService())
        with self.assertRaises(ConnectionRefusedError):
            await within(http_client(self).get(proxy.url + "/health"))


class MetricsTests(TestCase):
    async def test_scrape_counts_a_known_set_of_requests(self) -> None:
        """
        After two chats, one embed and one failing request, /metrics counts
        them by endpoint, model and status, with their tokens and durations.
        """
        proxy = LiveProxy(self)
        http = http_client(self)
        for _ in range(2):
            await (await http.post(proxy.url + "/api/chat", json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False})).text()
        await (await http.post(proxy.url + "/api/embed", json={"model": "all-minilm", "input": "a b c"})).text()
        await (await http.post(proxy.url + "/api/generate", json={"model": "nope", "prompt": "x"})).text()
        scrape = await http.get(proxy.url + "/metrics")
        self.assertEqual(scrape.code, 200)
        self.assertTrue(scrape.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        found = samples(await scrape.text())

        def requests(endpoint: str, model: str, status: str) -> float:
            key = ("ollamaproxy_requests_total", (("endpoint", endpoint), ("model", model), ("status", status)))
            return found.get(key, 0)

        self.assertEqual(requests("/api/chat", "llama3.2", "200"), 2)
        self.assertEqual(requests("/api/embed", "all-minilm", "200"), 1)
        self.assertEqual(requests("/api/generate", "nope", "404"), 1)
        self.assertEqual(found[("ollamaproxy_tokens_total", (("model", "llama3.2"), ("type", "output")))], 16)
        self.assertNotIn(("ollamaproxy_tokens_total", (("model", "all-minilm"), ("type", "output"))), found)
        self.assertEqual(
            found[("gen_ai_client_operation_duration_seconds_count", (("gen_ai_request_model", "llama3.2"),))], 2
        )
        self.assertEqual(found[("ollamaproxy_csv_rows_written_total", ())], 4)
        self.assertEqual(found[("ollamaproxy_upstream_up", ())], 1)
        self.assertEqual(found[("ollamaproxy_requests_in_flight", ())], 0)
        self.assertEqual(len(proxy.rows()), 4, "scrapes are not logged")


class LabelBoundTests(SynchronousTestCase):
    def test_hostile_model_names_cannot_break_a_scrape(self) -> None:
        """
        A model name with a lone surrogate or of absurd length still scrapes.
        """
        from prometheus_client import generate_latest

        metrics = Metrics()
        for model in ("bad\ud800name", "x" * 100_000):
            metrics.request_finished(
                RequestRecord(request_id="r", arrived_wall=0, arrived=0, ended=1, model=model, endpoint="/api/chat", http_status=200)
            )
        text = generate_latest(metrics.registry).decode()
        self.assertIn("bad\\\\ud800name", text)
        self.assertLess(len(text), 50_000)

    def test_models_past_the_limit_fold_into_other(self) -> None:
        """
        Label values stay bounded: model 101 and beyond count as "other",
        unknown paths as "other", and clients never become labels.
        """
        metrics = Metrics()
        for n in range(MODEL_LABEL_LIMIT + 5):
            metrics.request_finished(
                RequestRecord(
                    request_id=str(n), arrived_wall=0, arrived=0, ended=1, model=f"m{n}",
                    endpoint=f"/random/{n}", http_status=200, ip_source=f"10.0.0.{n}",
                    user_agent=f"ua{n}", session_id=f"s{n}",
                )
            )
        from prometheus_client import generate_latest

        text = generate_latest(metrics.registry).decode()
        found = samples(text)
        other = found[("ollamaproxy_requests_total", (("endpoint", "other"), ("model", "other"), ("status", "200")))]
        self.assertEqual(other, 5)
        self.assertNotIn("10.0.0.", text)
        self.assertNotIn("ua1", text)
        self.assertNotIn('"s1"', text)



class DrainTests(TestCase):
    async def test_kept_alive_connections_are_closed_or_refused_while_draining(self) -> None:
        """
        At shutdown an idle kept-alive connection is closed at once; while
        requests are still in flight, a new request on a kept-alive
        connection gets 503 and its connection is closed.  (The fake writes
        a line each time the test advances its clock, so the long stream is
        still in flight for as long as the test needs.)
        """
        clock = Clock()
        proxy = LiveProxy(self, token_delay=1.0, fake_clock=clock, args=["--grace-period", str(PATIENCE)])
        pending = http_client(self).post(
            proxy.url + "/api/generate",
            json={"model": "llama3.2", "prompt": "x", "options": {"num_predict": 40}},
            unbuffered=True,
        )
        await eventually(lambda: len(proxy.fake.received) == 1)
        clock.advance(1)
        long_stream = await within(pending)
        idle = await connect(self, proxy.port)
        idle.send(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        busy = await connect(self, proxy.port)
        body = b'{"model":"llama3.2","prompt":"x","options":{"num_predict":3}}'
        busy.send(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await eventually(lambda: b"0.12.6" in idle.received and len(proxy.fake.received) == 3)
        clock.advance(1)
        await eventually(lambda: b'"response"' in busy.received)
        stopping = proxy.service.stopService()
        await idle.when_closed()
        clock.advance(2)  # the busy connection's last two lines: its response ends
        await eventually(lambda: b"0\r\n\r\n" in busy.received)
        busy.send(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await busy.when_closed()
        self.assertIn(b"HTTP/1.1 503 ", busy.received)
        self.assertIn(b"proxy is shutting down", busy.received)
        clock.advance(40)  # the rest of the long stream
        self.assertEqual(len((await within(treq.content(long_stream))).splitlines()), 40)
        await within(stopping)
        statuses = sorted(row["http_status"] for row in proxy.rows())
        self.assertEqual(statuses, ["200", "200", "200", "503"])


class HealthDetailTests(TestCase):
    async def test_with_keys_health_says_only_the_status_without_one(self) -> None:
        """
        With API keys on, /health stays open but tells a caller without a
        key only the status; the details (upstream, log path) need a key.
        """
        proxy = LiveProxy(self, args=["--api-key", "ops:sk-ops-secret"])
        http = http_client(self)
        anonymous = await (await http.get(proxy.url + "/health")).json()
        self.assertEqual(anonymous, {"status": "ok"})
        detailed = await (await http.get(proxy.url + "/health", headers={"X-API-Key": "sk-ops-secret"})).json()
        self.assertIn("upstream", detailed)
        self.assertIn("log", detailed)
