"""
The resource tree: the proxy's own few paths, and everything else forwarded.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .csvlog import CsvLog
from .health import HealthResource, ReadyResource, UpstreamProbe
from .hostcheck import HostPolicy
from .metrics import Metrics
from .proxy import Forwarder
from .routes import Family, decoded_path, error_body


class Root(Resource):
    """
    Every request lands here.  C{local} maps the proxy's own paths to their
    resources and whether they need an API key (when keys are configured);
    any other path, any method, goes to Ollama.

    Routing is on the percent-decoded path, the one Ollama itself routes on,
    so C{/%68ealth} is C{/health} here just as C{/api%2Fchat} is
    C{/api/chat} there.
    """

    isLeaf = True

    def __init__(
        self,
        forwarder: Forwarder,
        local: dict[bytes, tuple[Resource, bool]],
        host_policy: HostPolicy | None = None,
    ) -> None:
        """
        @param host_policy: when set, requests whose C{Host} it refuses get
            403, as Ollama on loopback does (see L{ollamaproxy.hostcheck}).
        """
        super().__init__()
        self._forwarder = forwarder
        self._local = local
        self._host_policy = host_policy

    def render(self, request: Request) -> Any:
        path = decoded_path(request.uri)
        if path is None:
            self._forwarder.refuse(
                request,
                400,
                "request target must be a path (no absolute URLs, CONNECT, '*', "
                "dot segments, backslashes, NUL, control or non-ASCII bytes)",
            )
            return NOT_DONE_YET
        hosts = request.requestHeaders.getRawHeaders(b"host", ())
        if len(hosts) > 1:
            # RFC 9112 section 3.2: refused, since a proxy in front of this
            # one may have gone by the other Host.
            self._forwarder.refuse(request, 400, "more than one Host header")
            return NOT_DONE_YET
        host = hosts[0].decode("latin-1") if hosts else ""
        if self._host_policy is not None and not self._host_policy.allows(host):
            self._forwarder.refuse(
                request,
                403,
                f"Host {host!r} is not allowed: like Ollama on loopback, this proxy only "
                "answers local names unless it has API keys or listens beyond loopback "
                "(protection against DNS rebinding)",
            )
            return NOT_DONE_YET
        local = self._local.get(path)
        if local is None:
            self._forwarder.forward(request, path)
            return NOT_DONE_YET
        resource, needs_key = local
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _local_error(request, 405, "method not allowed")
        keys = self._forwarder.keys
        if needs_key and keys is not None and keys.identify(request.requestHeaders) is None:
            request.setHeader(b"www-authenticate", b"Bearer")
            return _local_error(request, 401, "missing or invalid API key")
        return resource.render(request)


def _local_error(request: Request, status: int, message: str) -> bytes:
    content_type, body = error_body(Family.NATIVE, status, message)
    request.setResponseCode(status)
    request.responseHeaders.removeHeader(b"server")
    request.setHeader(b"content-type", content_type)
    return body


def build_root(
    *,
    forwarder: Forwarder,
    probe: UpstreamProbe,
    csv_log: CsvLog,
    metrics: Metrics,
    draining: Callable[[], bool],
    status_needs_key: bool,
    monotonic: Callable[[], float],
    host_policy: HostPolicy | None = None,
) -> Root:
    keys = forwarder.keys

    def shows_details(request: Request) -> bool:
        # /health is open to all; with keys on, only a key holder (or
        # anyone, with --open-status) sees where the upstream and log are.
        return keys is None or not status_needs_key or keys.identify(request.requestHeaders) is not None

    health = HealthResource(forwarder, probe, csv_log, monotonic, draining, shows_details)
    ready = ReadyResource(forwarder, probe, csv_log, monotonic, draining, shows_details)
    return Root(
        forwarder,
        {
            b"/health": (health, False),
            b"/health/ready": (ready, status_needs_key),
            b"/metrics": (metrics.resource(), status_needs_key),
        },
        host_policy,
    )
