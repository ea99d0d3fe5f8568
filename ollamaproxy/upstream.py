"""
Where requests go, and the HTTP client that takes them there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer


@dataclass(frozen=True)
class Upstream:
    """
    The Ollama server: C{origin} (C{b"http://host:port"}) plus an optional
    path prefix; a client's request target is appended to both.
    """

    origin: bytes
    base_path: bytes = b""

    @property
    def display(self) -> str:
        return (self.origin + self.base_path).decode("ascii")

    def url_for(self, target: bytes) -> bytes:
        return self.origin + self.base_path + target


@implementer(IAgentEndpointFactory)
class _ReusedEndpoints:
    """
    One endpoint per upstream host, built once.  L{Agent}'s own factory
    builds a new one for every request, IDNA-encoding the host name each
    time, which was a tenth of the proxy's CPU per small request.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._tcp_endpoint(uri.host.decode("ascii"), uri.port)
            if uri.scheme == b"https":
                policy = BrowserLikePolicyForHTTPS()
                endpoint = wrapClientTLS(policy.creatorForNetloc(uri.host, uri.port), endpoint)
            self._endpoints[key] = endpoint
        return endpoint


    def _tcp_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        """
        An IP address needs no lookup: connect straight to it, instead of
        going through the resolver's thread pool for every new connection
        (which made a burst of 64 new streams wait up to 180 ms).
        """
        timeout = self._connect_timeout
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, timeout=timeout)
        return HostnameEndpoint(self._reactor, host, port, timeout=timeout)


def upstream_agent(reactor: Any, pool: HTTPConnectionPool, connect_timeout: float) -> IAgent:
    """
    The agent the proxy sends every request with: persistent pooled
    connections, a connect timeout, and no timeout after that (Ollama sends
    headers only after queueing, model load and the first token).
    """
    return Agent.usingEndpointFactory(
        reactor, _ReusedEndpoints(reactor, connect_timeout), pool=pool
    )
