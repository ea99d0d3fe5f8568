"""
The Host check Ollama applies when it listens on loopback, which the proxy
applies in its place: a proxy that rewrites C{Host} would otherwise switch
off Ollama's protection against DNS rebinding (a web page on
C{evil.example} whose name now points at 127.0.0.1 could read the API).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

import psutil

# Go's net.IP.IsPrivate.
_GO_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


@dataclass(frozen=True)
class HostPolicy:
    """
    Which C{Host} headers an Ollama bound to loopback accepts: an IP that is
    loopback, private, unspecified or one of this machine's; C{localhost};
    this machine's name; C{*.localhost}, C{*.local}, C{*.internal}; none.

    @ivar hostname: the machine's hostname.
    @ivar local_addresses: the machine's interface addresses.
    """

    hostname: str
    local_addresses: frozenset[str] = field(default_factory=frozenset)

    def allows(self, host_header: str) -> bool:
        return self.classify(host_header) != "denied"

    def classify(self, host_header: str) -> str:
        """
        C{"address"} (an allowed IP literal), C{"name"} (an allowed name) or
        C{"denied"}.  Ollama treats the two allowed kinds differently: only
        an allowed I{name} short-circuits C{OPTIONS} with a 204.
        """
        host = _split_host(host_header)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return "name" if self._allows_name(host) else "denied"
        if (
            address.is_loopback
            or address.is_unspecified
            or any(address in network for network in _GO_PRIVATE_NETWORKS)
            or str(address) in self.local_addresses
        ):
            return "address"
        return "name" if self._allows_name(host) else "denied"

    def _allows_name(self, host: str) -> bool:
        host = host.lower()
        return host in ("", "localhost", self.hostname.lower()) or host.endswith(
            (".localhost", ".local", ".internal")
        )


def this_machine() -> HostPolicy:
    """
    The policy for this machine: its hostname and interface addresses.
    """
    addresses = frozenset(
        entry.address.split("%")[0]
        for entries in psutil.net_if_addrs().values()
        for entry in entries
        if entry.family in (socket.AF_INET, socket.AF_INET6)
    )
    return HostPolicy(socket.gethostname(), addresses)


def _split_host(value: str) -> str:
    """
    Go's C{net.SplitHostPort}, falling back to the whole value on error.
    """
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end != -1 and value[end + 1 : end + 2] == ":" else value
    return value.split(":")[0] if value.count(":") == 1 else value
