"""
Which headers cross the proxy, in each direction.
"""

from __future__ import annotations

from typing import Iterable

from twisted.web.http_headers import Headers
from twisted.web.server import Request

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the proxy sets itself (Host names the upstream, the agent
# frames the body) or has already dealt with (Expect: 100-continue).
NOT_FORWARDED = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-host",
    b"x-forwarded-proto",
}
def upstream_headers(request: Request, peer: str, consumed: Iterable[bytes] = ()) -> Headers:
    """
    The headers to send upstream: the client's, minus hop-by-hop headers
    (and any the C{Connection} header names), minus C{consumed} (the proxy's
    own API key), plus the C{X-Forwarded-*} set, C{peer} (the connection's
    other end, as every proxy in a chain does) appended to
    C{X-Forwarded-For}.  Host is left to the agent, which names the
    upstream, since Ollama on loopback refuses other hosts.
    """
    incoming = request.requestHeaders
    skip = set(NOT_FORWARDED)
    skip.update(consumed)
    for value in incoming.getRawHeaders(b"connection", ()):
        skip.update(token.strip().lower() for token in value.split(b","))
    outgoing = Headers()
    for name, values in incoming.getAllRawHeaders():
        if name.lower() not in skip:
            outgoing.setRawHeaders(name, values)
    forwarded_for = incoming.getRawHeaders(b"x-forwarded-for", [])
    forwarded_for = b", ".join([*forwarded_for, peer.encode("utf-8", "replace")])
    outgoing.setRawHeaders(b"x-forwarded-for", [forwarded_for])
    host = incoming.getRawHeaders(b"host")
    if host:
        outgoing.setRawHeaders(b"x-forwarded-host", host[:1])
    outgoing.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
    return outgoing


def copy_response_headers(source: Headers, target: Headers, length: int | None) -> None:
    """
    Ollama's response headers onto the client's response, minus hop-by-hop
    ones; Twisted's own C{Server} and default C{Content-Type} go, since
    Ollama sends neither unless it means to.

    Twisted's HTTP client keeps a response's C{Content-Length} to itself
    (it frames the body with it), so it is set again from C{length}: a reply
    Ollama sent with a length reaches the client with that length, not
    chunked.  L{None} leaves the framing to Twisted (chunked), for bodies
    of unknown length or that the proxy changes.
    """
    for name in (b"server", b"content-type"):
        target.removeHeader(name)
    for name, values in source.getAllRawHeaders():
        if name.lower() not in HOP_BY_HOP:
            target.setRawHeaders(name, values)
    if length is not None:
        target.setRawHeaders(b"content-length", [b"%d" % length])


def is_cors_preflight(request: Request) -> bool:
    """
    A browser's CORS preflight carries no credentials by design and does
    nothing; Ollama answers it (204 for allowed origins), so it passes
    without a key, or browser-based tools could never send the real request.
    """
    return request.method == b"OPTIONS" and request.requestHeaders.hasHeader(
        b"access-control-request-method"
    )
