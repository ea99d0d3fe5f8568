"""
Test harnesses: the proxy in memory in front of the fake Ollama (both on
L{treq.testing}), and the proxy on real loopback sockets; and the helpers
the tests share: bounded waits, CSV readers, a body reader that hangs up,
a port that refuses connections, an environment without our settings.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IResponse

from ollamaproxy.auth import ApiKeys
from ollamaproxy.config import SETTINGS
from ollamaproxy.csvlog import CsvLog
from ollamaproxy.gate import Gate
from ollamaproxy.proxy import Forwarder, Limits
from ollamaproxy.upstream import Upstream
from ollamaproxy.record import COLUMNS, RequestRecord
from ollamaproxy.resource import Root
from ollamaproxy.testing.fake_ollama import FakeOllama

UPSTREAM = Upstream(b"http://127.0.0.1:11434")
WALL = 1_795_000_000.25

# How long any wait on real time gives up after: only an upper bound for
# "it never happens", far beyond how long anything takes even on a slow,
# loaded machine; never a measure of speed (those belong in bench/).
PATIENCE = 30.0


async def eventually(condition: Callable[[], object], timeout: float = PATIENCE) -> None:
    """
    Poll C{condition} on the real reactor every 10 ms until it returns
    something true; fail after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition still false after {timeout:g} s")
        await deferLater(reactor, 0.01, lambda: None)


def eventually_blocking(condition: Callable[[], object], what: str, timeout: float = PATIENCE) -> None:
    """
    L{eventually} for tests that block (a process of their own, not the
    reactor, does the work): poll every 20 ms, fail after C{timeout}.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"still not {what} after {timeout:g} s")
        time.sleep(0.02)


def within(d: Deferred[Any], timeout: float = PATIENCE) -> Deferred[Any]:
    """
    C{d}, failed with L{twisted.internet.defer.TimeoutError} if it has not
    fired after C{timeout} seconds.
    """
    return d.addTimeout(timeout, reactor)


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


def refused_port(test: Any) -> int:
    """
    A loopback port that refuses connections until the test ends: a socket
    is bound to it but never listens, so no other process can take it
    meanwhile (as it could a port bound, closed and named later).
    """
    held = socket.socket()
    test.addCleanup(held.close)
    held.bind(("127.0.0.1", 0))
    return int(held.getsockname()[1])


def read_csv(path: str) -> list[list[str]]:
    """
    Every row of a CSV file through L{csv.reader}, the header first, as it
    is: for polling a file still being written.
    """
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def csv_rows(path: str) -> list[list[str]]:
    """
    The data rows of the proxy's CSV file, after checking that it starts
    with the header and that every row has exactly the column count.
    """
    header, *rows = read_csv(path)
    assert header == list(COLUMNS), f"bad header: {header}"
    for row in rows:
        assert len(row) == len(COLUMNS), f"{len(row)} cells, expected {len(COLUMNS)}: {row}"
    return rows


def csv_dicts(path: str) -> list[dict[str, str]]:
    """
    L{csv_rows}, each as a dictionary keyed by column name.
    """
    return [dict(zip(COLUMNS, row)) for row in csv_rows(path)]


class HangUpAfter(Protocol):
    """
    Reads a response body (give it to C{response.deliverBody}) and hangs
    up once it holds C{after} bytes or more: never, if C{after} is C{None},
    until L{hang_up}.  C{hung_up} fires when it has.
    """

    def __init__(self, after: int | None = 1) -> None:
        self.after = after
        self.received = b""
        self.hung_up: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.after is not None and len(self.received) >= self.after:
            self.hang_up()

    def hang_up(self) -> None:
        if not self.hung_up.called:
            self.transport.stopProducing()
            self.hung_up.callback(None)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        pass


# Settings a developer may have exported that would change what is tested.
_OUR_VARIABLES = frozenset(setting.env_name for setting in SETTINGS)


def clean_environment() -> dict[str, str]:
    """
    C{os.environ} without any variable the proxy reads its settings from.
    """
    return {
        name: value for name, value in os.environ.items()
        if name not in _OUR_VARIABLES and not name.startswith("OLLAMAPROXY_")
    }


def use_clean_environment(test: Any) -> None:
    """
    Until C{test} ends, C{os.environ} is L{clean_environment}.
    """
    patcher = mock.patch.dict(os.environ, clean_environment(), clear=True)
    patcher.start()
    test.addCleanup(patcher.stop)


def in_reactor_thread(function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    """
    Run a blocking client call (httpx, the official clients) off the reactor
    thread, so the servers it talks to keep running.
    """
    from twisted.internet.threads import deferToThread

    return deferToThread(function, *args, **kwargs)


class LiveProxy:
    """
    The whole service (CSV log included) on a real loopback port, in front
    of the fake Ollama on another, both on the real reactor.

    The proxy's Host check (a loopback proxy without keys answers only local
    names) is off unless C{host_check}: most tests send raw requests with a
    made-up Host and are about something else.

    The fake's chunks are timed by C{fake_clock}: the real reactor unless a
    test passes a L{Clock} to release each chunk itself.
    """

    def __init__(
        self, test: Any, token_delay: float = 0.0, args: list[str] | None = None,
        environ: dict[str, str] | None = None, host_check: bool = False,
        fake_clock: IReactorTime | None = None, **fake_options: Any,
    ) -> None:
        from twisted.web.server import Site

        from ollamaproxy.service import ProxyService
        from ollamaproxy.tap import Options

        self.fake = FakeOllama(fake_clock or reactor, token_delay=token_delay, **fake_options)
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
        """
        The CSV file's rows (L{csv_dicts}: the header and every row's
        column count checked).
        """
        return csv_dicts(self.csv)


async def _nothing() -> None:
    return None
