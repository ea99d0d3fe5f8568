"""
The proxy's own endpoints: C{/health} (liveness, always 200 while the
process runs) and C{/health/ready} (200 only when requests can succeed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .csvlog import CsvLog
from .proxy import Forwarder
from .upstream import Upstream


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    version: str | None = None
    error: str | None = None


class UpstreamProbe:
    """
    Asks the upstream C{GET /api/version}, with a short timeout, and keeps
    the answer for C{ttl} seconds so that frequent health checks cost the
    upstream at most one cheap request a second.
    """

    def __init__(
        self,
        agent: IAgent,
        upstream: Upstream,
        clock: IReactorTime,
        monotonic: Callable[[], float],
        ttl: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        self._client = HTTPClient(agent)
        self._url = upstream.url_for(b"/api/version").decode("ascii")
        self._clock = clock
        self._monotonic = monotonic
        self._ttl = ttl
        self._timeout = timeout
        self._latest: ProbeResult | None = None
        self._checked_at = float("-inf")
        self._probing = False
        self._waiters: list[Deferred[ProbeResult]] = []

    @property
    def latest(self) -> ProbeResult | None:
        return self._latest

    def check(self) -> Deferred[ProbeResult]:
        """
        The upstream's state, at most C{ttl} seconds old; callers that ask
        while a probe is under way share it.
        """
        if self._latest is not None and self._monotonic() - self._checked_at < self._ttl:
            return succeed(self._latest)
        waiter: Deferred[ProbeResult] = Deferred()
        self._waiters.append(waiter)
        if not self._probing:
            self._probing = True
            # treq's timeout covers only the wait for headers; this one covers
            # a body that never ends as well.
            probe = Deferred.fromCoroutine(self._ask())
            probe.addTimeout(self._timeout, self._clock)
        return waiter

    async def _ask(self) -> None:
        try:
            response = await self._client.get(
                self._url, timeout=self._timeout, reactor=self._clock, allow_redirects=False
            )
            body = await treq.content(response)
            if response.code != 200:
                result = ProbeResult(False, error=f"HTTP {response.code} from /api/version")
            else:
                version = json.loads(body).get("version")
                result = ProbeResult(True, version=version if isinstance(version, str) else None)
        except CancelledError:
            result = ProbeResult(False, error=f"no answer within {self._timeout:g} s")
        except Exception as e:
            result = ProbeResult(False, error=_describe(e))
        self._latest = result
        self._checked_at = self._monotonic()
        self._probing = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result)


def _describe(error: Exception) -> str:
    text = Failure(error).getErrorMessage() if not str(error) else str(error)
    return f"{type(error).__name__}: {text}"[:200]


class _JsonResource(Resource):
    isLeaf = True

    def render_HEAD(self, request: Request) -> Any:
        return self.render_GET(request)

    def _reply(self, request: Request, status: int, payload: dict[str, Any]) -> None:
        if request.finished or request.channel is None:
            return
        body = json.dumps(payload, indent=2).encode("utf-8") + b"\n"
        request.setResponseCode(status)
        request.responseHeaders.removeHeader(b"server")
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()


class HealthResource(_JsonResource):
    """
    C{GET /health}: 200 while the process runs; C{status} says C{ok} or
    C{degraded} (upstream not answering, or the CSV log failing).  Nothing
    secret is shown: no keys, no client data; and when C{shows_details}
    says no (API keys on, none given), only the status.
    """

    def __init__(
        self,
        forwarder: Forwarder,
        probe: UpstreamProbe,
        csv_log: CsvLog,
        monotonic: Callable[[], float],
        draining: Callable[[], bool],
        shows_details: Callable[[Request], bool] = lambda request: True,
    ) -> None:
        super().__init__()
        self._forwarder = forwarder
        self._probe = probe
        self._csv_log = csv_log
        self._monotonic = monotonic
        self._started = monotonic()
        self._draining = draining
        self._shows_details = shows_details

    def render_GET(self, request: Request) -> Any:
        self._probe.check().addCallback(self._answer, request)
        return NOT_DONE_YET

    def _answer(self, probe: ProbeResult, request: Request) -> None:
        csv_log, gate = self._csv_log, self._forwarder.gate
        healthy = probe.reachable and csv_log.healthy
        payload = {
            "status": "ok" if healthy else "degraded",
            "upstream": {
                "url": self._forwarder.upstream.display,
                "reachable": probe.reachable,
                "version": probe.version,
                "error": probe.error,
            },
            "uptime_seconds": round(self._monotonic() - self._started, 3),
            "in_flight": len(self._forwarder.active),
            "queued": gate.queued,
            "draining": self._draining(),
            "log": {
                "path": csv_log.path,
                "writable": csv_log.healthy,
                "error": csv_log.last_error,
                "rows_written": csv_log.rows_written,
                "rows_buffered": csv_log.rows_buffered,
                "rows_dropped": csv_log.rows_dropped,
            },
        }
        if not self._shows_details(request):
            payload = {"status": payload["status"]}
        self._reply(request, 200, payload)


class ReadyResource(HealthResource):
    """
    C{GET /health/ready}: 200 only when the upstream answers, the log is
    being written and the proxy is not shutting down; 503 otherwise, so a
    load balancer sends traffic elsewhere.
    """

    def _answer(self, probe: ProbeResult, request: Request) -> None:
        reasons = []
        if self._draining():
            reasons.append("shutting down")
        if not probe.reachable:
            reasons.append(f"upstream not answering: {probe.error}")
        if not self._csv_log.healthy:
            reasons.append(f"CSV log not writable: {self._csv_log.last_error}")
        if reasons:
            self._reply(request, 503, {"status": "not ready", "reasons": reasons})
        else:
            self._reply(request, 200, {"status": "ready"})
