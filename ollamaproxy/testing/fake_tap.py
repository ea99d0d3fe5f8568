"""
C{twist fakeollama}: the fake Ollama as a standalone server, for manual
tries and the benchmark.  C{python -m ollamaproxy.testing.fake_ollama} takes
the same options.
"""

from __future__ import annotations

import ipaddress

from twisted.application.internet import TCPServer
from twisted.application.service import IService
from twisted.python import usage
from twisted.web.server import Site

from ollamaproxy.testing.fake_ollama import FakeOllama


class Options(usage.Options):
    optParameters = [
        ["port", "p", 11434, "TCP port to listen on.", int],
        ["host", None, "127.0.0.1", "Address to listen on (loopback, like Ollama's default)."],
        ["token-delay", None, 0.0, "Seconds between two generated tokens (chunks).", float],
        ["load-delay", None, 0.0, "Extra seconds before the first token (a model load).", float],
        ["ollama-version", None, "0.12.6", "Version reported by /api/version."],
        ["max-pending", None, None,
         "Answer 503 (queue full) when this many generations are already in flight.", int],
    ]
    optFlags = [
        ["no-host-check", None,
         "Accept any Host header.  (By default a loopback bind checks Host, as Ollama does.)"],
    ]

    def postOptions(self) -> None:
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError(f"--port must be between 0 and 65535, not {self['port']}")
        for name in ("token-delay", "load-delay"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} cannot be negative")
        if self["max-pending"] is not None and self["max-pending"] < 1:
            raise usage.UsageError("--max-pending must be at least 1")
        try:
            ipaddress.ip_address(self["host"])
        except ValueError:
            raise usage.UsageError(f"--host must be an IP address, not {self['host']!r}") from None


def makeService(options: Options) -> IService:
    """A TCP server around L{FakeOllama}, driven by the global reactor."""
    from twisted.internet import reactor

    loopback = ipaddress.ip_address(options["host"]).is_loopback
    fake = FakeOllama(
        reactor,  # type: ignore[arg-type]
        token_delay=options["token-delay"],
        load_delay=options["load-delay"],
        version=options["ollama-version"],
        max_pending=options["max-pending"],
        check_host=loopback and not options["no-host-check"],
    )
    # Go lets the kernel queue as many connections as it allows; Twisted
    # defaults to 50, which drops SYNs when many clients connect at once.
    return TCPServer(options["port"], Site(fake.resource()), backlog=1024, interface=options["host"])
