"""
Options that reach their effect only through the service's wiring: the
connect timeout, CSV rotation, and readiness while draining.
"""

from __future__ import annotations

import glob
import os

import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.error import TimeoutError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from ollamaproxy.proxy import Forwarder
from ollamaproxy.resource import Root
from ollamaproxy.service import ProxyService
from ollamaproxy.tap import Options
from ollamaproxy.upstream import Upstream, upstream_agent

from .support import LiveProxy, Records, eventually, http_client


def settings(*args: str) -> dict:
    options = Options(environ={}, dotenv={})
    options.parseOptions(["--log-path", os.path.abspath("logs"), *args])
    return options.settings


class ConnectTimeoutTests(SynchronousTestCase):
    def test_connect_timeout_reaches_the_connection_and_gives_504(self) -> None:
        """
        The upstream connection is attempted with --connect-timeout, and a
        connection that times out is answered 504 "connection timed out".
        """
        memory = MemoryReactorClock()
        agent = upstream_agent(memory, HTTPConnectionPool(memory), connect_timeout=7.5)
        records = Records()
        forwarder = Forwarder(
            agent=agent, upstream=Upstream(b"http://127.0.0.1:11434"), clock=Clock(), sinks=[records]
        )
        client = StubTreq(Root(forwarder, {}))
        pending = client.get("http://proxy/api/tags")
        client.flush()
        [(host, port, factory, timeout, _)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 11434, 7.5))
        factory.clientConnectionFailed(None, Failure(TimeoutError()))
        client.flush()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 504)
        self.assertIn("connection timed out", records.only.error_message)


class RotationOptionTests(TestCase):
    async def test_log_max_bytes_rotates_the_file(self) -> None:
        """
        With --log-max-bytes, the proxy's CSV log is rotated before it would
        grow past the limit; every file starts with the header and no row is
        lost.
        """
        proxy = LiveProxy(self, args=["--log-max-bytes", "1500"])
        http = http_client(self)
        for _ in range(12):
            await (await http.get(proxy.url + "/api/version")).content()
        files = glob.glob(os.path.join(proxy.logs, "ollama-proxy*.csv"))
        self.assertGreaterEqual(len(files), 2)
        rows = 0
        for path in files:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            self.assertTrue(lines[0].startswith("timestamp,request_id,"), path)
            self.assertLessEqual(os.path.getsize(path), 1500)
            rows += len(lines) - 1
        self.assertEqual(rows, 12)

    def test_log_rotate_daily_reaches_the_writer(self) -> None:
        """
        --log-rotate daily turns on the writer's daily rotation (whose
        behaviour tests/test_csvlog.py covers with an injected clock).
        """
        self.assertTrue(ProxyService(settings("--log-rotate", "daily"), reactor, owns_process=False).csv_log._rotate_daily)
        self.assertFalse(ProxyService(settings(), reactor, owns_process=False).csv_log._rotate_daily)


class DrainingReadinessTests(TestCase):
    async def test_ready_is_503_while_draining(self) -> None:
        """
        Once shutdown begins, /health/ready answers 503 "shutting down" (so
        a load balancer moves traffic away) while a stream still finishes.
        """
        proxy = LiveProxy(self, token_delay=0.05, args=["--grace-period", "10"])
        http = http_client(self)
        stream = await http.post(
            proxy.url + "/api/generate",
            json={"model": "llama3.2", "prompt": "x", "options": {"num_predict": 20}},
            unbuffered=True,
        )
        before = await http.get(proxy.url + "/health/ready")
        self.assertEqual(before.code, 200)
        await before.content()
        stopping = proxy.service.stopService()
        # The listening port is closed by now: ask the site's resource tree
        # in memory (its upstream probe still runs on the real reactor).
        client = StubTreq(proxy.service.root)
        pending = client.get("http://proxy/health/ready")

        def answered() -> bool:
            client.flush()
            return pending.called

        await eventually(answered)
        during = await pending
        self.assertEqual(during.code, 503)
        self.assertIn("shutting down", (await during.json())["reasons"])
        self.assertEqual(len((await treq.content(stream)).splitlines()), 20)
        await stopping
