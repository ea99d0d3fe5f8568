"""
Test harnesses: the proxy in memory in front of the fake Ollama (both on
L{treq.testing}), and the proxy on real loopback sockets.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IResponse

from ollamaproxy.auth import ApiKeys
from ollamaproxy.csvlog import CsvLog
from ollamaproxy.gate import Gate
from ollamaproxy.proxy import Forwarder, Limits
from ollamaproxy.upstream import Upstream
from ollamaproxy.record import RequestRecord
from ollamaproxy.resource import Root
from ollamaproxy.testing.fake_ollama import FakeOllama

UPSTREAM = Upstream(b"http://127.0.0.1:11434")
WALL = 1_795_000_000.25


class Records:
    """
    A sink that keeps every finished record.
    """

    def __init__(self) -> None:
        self.all: list[RequestRecord] = []

    def request_finished(self, record: RequestRecord) -> None:
        self.all.append(record)

    @property
    def only(self) -> RequestRecord:
        assert len(self.all) == 1, f"expected one record, got {len(self.all)}"
        return self.all[0]


class InMemoryProxy:
    """
    Client --StubTreq--> proxy --RequestTraversalAgent--> fake Ollama, all
    driven by one L{Clock}.
    """

    def __init__(
        self,
        token_delay: float = 0.0,
        limits: Limits | None = None,
        gate: Gate | None = None,
        keys: ApiKeys | None = None,
        upstream_agent: Any = None,
        csv_dir: str | None = None,
        host_load: tuple[float | None, float | None] = (None, None),
        **fake_options: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.fake = FakeOllama(self.clock, token_delay=token_delay, **fake_options)
        self.upstream = upstream_agent or RequestTraversalAgent(self.fake.resource())
        self.records = Records()
        sinks: list[Any] = [self.records]
        self.csv_log: CsvLog | None = None
        if csv_dir is not None:
            self.csv_log = CsvLog(csv_dir, clock=self.clock, wall=lambda: WALL)
            self.csv_log.startService()
            sinks.append(self.csv_log)
        self.forwarder = Forwarder(
            agent=self.upstream,
            upstream=UPSTREAM,
            clock=self.clock,
            sinks=sinks,
            host_load=lambda: host_load,
            gate=gate or Gate(None, 512),
            limits=limits or Limits(),
            keys=keys,
            monotonic=self.clock.seconds,
            wall=lambda: WALL,
        )
        self.root = Root(self.forwarder, {})
        self.client = StubTreq(self.root)
        self.direct = StubTreq(self.fake.resource())

    def flush(self) -> None:
        for _ in range(6):
            if hasattr(self.upstream, "flush"):
                self.upstream.flush()
            self.client.flush()
            self.direct.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def send(
        self, test: SynchronousTestCase, method: str, path: str, body: bytes | dict | None = None,
        headers: dict[bytes, list[bytes]] | None = None, via: Any = None,
    ) -> IResponse:
        """
        A complete request and its response (headers only; read the body
        with L{read}).
        """
        d = self.start(method, path, body, headers, via)
        self.flush()
        return test.successResultOf(d)

    def start(
        self, method: str, path: str, body: bytes | dict | None = None,
        headers: dict[bytes, list[bytes]] | None = None, via: Any = None,
    ) -> Deferred[IResponse]:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        client = via or self.client
        return client.request(
            method, "http://proxy" + path, data=body, headers=headers or {}, unbuffered=True,
            allow_redirects=False,
        )

    def read(self, test: SynchronousTestCase, response: IResponse) -> bytes:
        d = treq.content(response)
        self.flush()
        return test.successResultOf(d)


def http_client(test: Any) -> HTTPClient:
    """
    A treq client on its own non-persistent pool, closed when the test ends
    (trial fails a test that leaves connections open).
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


def free_port() -> int:
    """
    A loopback port nothing listens on (for "connection refused").
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_reactor_thread(function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    """
    Run a blocking client call (httpx, the official clients) off the reactor
    thread, so the servers it talks to keep running.
    """
    from twisted.internet.threads import deferToThread

    return deferToThread(function, *args, **kwargs)


__all__ = ["InMemoryProxy", "LiveProxy", "Records", "UPSTREAM", "WALL", "free_port", "http_client", "in_reactor_thread"]


class LiveProxy:
    """
    The whole service (CSV log included) on a real loopback port, in front
    of the fake Ollama on another, both on the real reactor.

    The proxy's Host check (a loopback proxy without keys answers only local
    names) is off unless C{host_check}: most tests send raw requests with a
    made-up Host and are about something else.
    """

    def __init__(
        self, test: Any, token_delay: float = 0.0, args: list[str] | None = None,
        environ: dict[str, str] | None = None, host_check: bool = False, **fake_options: Any,
    ) -> None:
        from twisted.web.server import Site

        from ollamaproxy.service import ProxyService
        from ollamaproxy.tap import Options

        self.fake = FakeOllama(reactor, token_delay=token_delay, **fake_options)
        self.fake_site = Site(self.fake.resource())
        self.fake_port = reactor.listenTCP(0, self.fake_site, interface="127.0.0.1")
        test.addCleanup(self.fake_port.stopListening)
        self.logs = test.mktemp()
        options = Options(environ=environ or {}, dotenv={})
        options.parseOptions(
            [
                "--listen", "tcp:0:interface=127.0.0.1",
                "--ollama-url", f"http://127.0.0.1:{self.fake_port.getHost().port}",
                "--log-path", self.logs,
                "--host-check", "true" if host_check else "false",
                *(args or []),
            ]
        )
        self.service = ProxyService(options.settings, reactor, owns_process=False)
        self.service.startService()
        test.addCleanup(self.stop)
        self.port = self.service._ports[0].getHost().port
        self.url = f"http://127.0.0.1:{self.port}"
        self.csv = f"{self.logs}/ollama-proxy.csv"

    def stop(self) -> Deferred[None]:
        if self.service.running:
            return self.service.stopService()
        return Deferred.fromCoroutine(_nothing())

    def rows(self) -> list[dict[str, str]]:
        import csv

        with open(self.csv, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))


async def _nothing() -> None:
    return None
