"""
The running proxy: listening endpoints, the upstream connection pool, the
CSV log, the host sampler, and an orderly shutdown.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from typing import Any, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IAgent

from .auth import ApiKeys, read_keys_file
from .config import exposed_endpoints, listen_endpoints
from .csvlog import CsvLog
from .forwarded import ClientAddress
from .gate import Gate
from .hostcheck import HostPolicy, this_machine
from .health import UpstreamProbe
from .metrics import Metrics
from .proxy import Forwarder, Limits
from .resource import build_root
from .sampler import HostSampler
from .site import BUFFERED_BODY_LIMIT, ProxySite
from .upstream import upstream_agent


class ProxyService(Service):
    """
    Everything C{twist ollamaproxy} runs, started and stopped in order:
    the log opens before the first request can arrive and closes after the
    last one has been written down.
    """

    log = Logger()

    def __init__(
        self,
        settings: Mapping[str, Any],
        reactor: Any,
        agent: IAgent | None = None,
        owns_process: bool = True,
    ) -> None:
        """
        @param owns_process: this service is the program (C{twist},
            C{twistd}): it handles SIGHUP, and exits non-zero when it cannot
            listen.  Tests that run it in their own process pass C{False}.
        """
        self._settings = settings
        self._reactor = reactor
        self._owns_process = owns_process
        self._endpoints = listen_endpoints(settings)
        self._ports: list[IListeningPort] = []
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        # Twisted keeps 2 idle connections per host by default; a proxy
        # wants one per concurrent request, or it reconnects all the time.
        self.pool.maxPersistentPerHost = 256
        self.agent = agent or upstream_agent(reactor, self.pool, settings["connect-timeout"])
        self.csv_log = CsvLog(
            settings["log-path"],
            clock=reactor,
            guard_formulas=settings["formula-guard"],
            max_bytes=settings["log-max-bytes"],
            rotate_daily=settings["log-rotate"] == "daily",
        )
        self.sampler = HostSampler(reactor)
        self.keys = ApiKeys(settings["api-key"]) if self._keys_configured() else None
        self.metrics = Metrics()
        self.forwarder = Forwarder(
            agent=self.agent,
            upstream=settings["ollama-url"],
            clock=reactor,
            sinks=(self.csv_log, self.metrics),
            gate=Gate(settings["max-concurrent"], settings["max-queue"]),
            limits=Limits(
                header_timeout=settings["header-timeout"],
                idle_timeout=settings["idle-timeout"],
                client_timeout=settings["client-timeout"],
                max_body_bytes=settings["max-body-bytes"],
                inject_usage=settings["usage-injection"],
            ),
            keys=self.keys,
            client_address=ClientAddress(settings["trusted-proxy"]),
            host_load=lambda: (self.sampler.cpu, self.sampler.memory),
        )
        self.probe = UpstreamProbe(self.agent, settings["ollama-url"], reactor, time.monotonic)
        self.metrics.watch(self.forwarder, self.csv_log, self.sampler, self.probe)
        self.root = build_root(
            forwarder=self.forwarder,
            probe=self.probe,
            csv_log=self.csv_log,
            metrics=self.metrics,
            draining=lambda: self.draining,
            status_needs_key=not settings["open-status"],
            monotonic=time.monotonic,
            host_policy=self._host_policy(),
        )
        self.site = ProxySite(
            self.root,
            timeout=settings["client-timeout"],
            reactor=reactor,
            buffered_body_limit=min(BUFFERED_BODY_LIMIT, settings["max-body-bytes"]),
        )
        self.draining = False

    def _host_policy(self) -> HostPolicy | None:
        """
        Ollama checks Host only when it listens on loopback; the proxy does
        the same for its own listening endpoints, and not when API keys
        stand in the way anyway.
        """
        settings = self._settings
        if not settings["host-check"] or self.keys is not None or exposed_endpoints(self._endpoints):
            return None
        return this_machine()

    def _keys_configured(self) -> bool:
        return bool(self._settings["api-key"] or self._settings["api-keys-file"])

    def startService(self) -> None:
        super().startService()
        self.csv_log.startService()
        self.sampler.startService()
        if self._settings["api-keys-file"]:
            self.reload_keys()
        if self._owns_process:
            if hasattr(signal, "SIGHUP"):
                signal.signal(signal.SIGHUP, self._on_sighup)
            # Everything built so far (imported modules, this service) lives
            # as long as the process: keep it out of the garbage collector's
            # scans, which otherwise pause every stream for ~25 ms now and
            # then.
            gc.freeze()
        self._warn_if_exposed()
        for description in self._endpoints:
            endpoint = serverFromString(self._reactor, description)
            endpoint.listen(self.site).addCallbacks(
                self._listening, self._cannot_listen, errbackArgs=(description,)
            )

    def _listening(self, port: IListeningPort) -> None:
        self._ports.append(port)
        self.log.info(
            "ollamaproxy listening on {address}, forwarding to {upstream}, logging to {csv}",
            address=port.getHost(),
            upstream=self.forwarder.upstream.display,
            csv=self.csv_log.path,
        )

    def _cannot_listen(self, failure: Any, description: str) -> None:
        self.log.critical(
            "Cannot listen on {endpoint}: {error}",
            endpoint=description,
            error=failure.getErrorMessage(),
        )
        # A TCP or UNIX listen fails at once, inside startService, before the
        # reactor runs: stop() then would raise ReactorNotRunning into this
        # Deferred and the process would run on, listening on nothing.
        self._reactor.callWhenRunning(self._reactor.stop)
        if self._owns_process:
            # twist would exit 0 after a clean stop; this was a failure.
            self._reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)

    def _warn_if_exposed(self) -> None:
        exposed = exposed_endpoints(self._endpoints)
        if not exposed:
            return
        if self.keys is None:
            self.log.warn(
                "WARNING: listening on {endpoints}: the proxy, and through it Ollama, is now "
                "reachable from the network WITHOUT authentication. Set --api-key or "
                "--api-keys-file, or listen on 127.0.0.1.",
                endpoints=", ".join(exposed),
            )
        else:
            self.log.warn(
                "Listening on {endpoints}: the proxy is reachable from the network "
                "(API keys are required).",
                endpoints=", ".join(exposed),
            )

    def _on_sighup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        SIGHUP: reopen the CSV file (after logrotate) and re-read the keys file.
        """
        self.csv_log.reopen()
        if self._settings["api-keys-file"]:
            self.reload_keys()

    def reload_keys(self) -> None:
        path = self._settings["api-keys-file"]
        try:
            from_file = read_keys_file(path)
        except (OSError, ValueError) as e:
            self.log.error("Keeping the previous API keys: cannot read {path}: {error}", path=path, error=e)
            return
        assert self.keys is not None
        self.keys.replace([*self._settings["api-key"], *from_file])
        self.log.info("Loaded {count} API keys", count=len(self.keys))

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting, give in-flight requests the grace period, abort the
        rest (each still gets its row), then close the pool and the log.
        """
        super().stopService()
        self.draining = self.forwarder.draining = True
        self.site.close_idle_connections()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        ports, self._ports = self._ports, []
        await gatherResults([maybeDeferred(port.stopListening) for port in ports])
        if self.forwarder.active:
            self.log.info(
                "Waiting up to {grace} s for {count} requests in flight",
                grace=self._settings["grace-period"],
                count=len(self.forwarder.active),
            )
            idle = self.forwarder.when_idle()
            timer = self._reactor.callLater(self._settings["grace-period"], idle.cancel)
            await DeferredList([idle], consumeErrors=True)
            if timer.active():
                timer.cancel()
            self.forwarder.abort_all("proxy shut down before the request finished")
        await self.site.close_connections()
        await self.pool.closeCachedConnections()
        self.sampler.stopService()
        await maybeDeferred(self.csv_log.stopService)


def _exit_failed() -> None:
    """
    End the process with status 1 once the reactor has shut down (and the
    log has been written).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
