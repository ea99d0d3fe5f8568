"""
Who the client is: the peer's address, or, behind proxies the operator
trusts, the address they say they forwarded for.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from twisted.web.server import Request

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    """
    C{X-Forwarded-For} is believed only when the peer is one of the trusted
    proxies; the client is then the last (rightmost) hop that is not itself
    trusted.  A hop that is not an IP address ends the walk, since nothing
    before it can be checked.
    """

    def __init__(self, trusted: Sequence[Network] = ()) -> None:
        self._trusted = tuple(trusted)

    def __call__(self, request: Request) -> str:
        peer = peer_address(request)
        if not self._trusted or not self._is_trusted(peer):
            return peer
        hops = [
            hop.strip().decode("latin-1")
            for value in request.requestHeaders.getRawHeaders(b"x-forwarded-for", ())
            for hop in value.split(b",")
            if hop.strip()
        ]
        client = peer
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return client
            client = hop
        return client

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)


def peer_address(request: Request) -> str:
    """
    The address of the connection's other end: the client, or the last
    proxy.  This is the hop the proxy adds to C{X-Forwarded-For}.
    """
    address = request.getClientAddress()
    return getattr(address, "host", None) or "unix"
