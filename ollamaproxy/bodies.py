"""
Request bodies on their way upstream.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """
    A body that is all here already: written in one go, no cooperator.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def with_usage_requested(body: bytes) -> bytes:
    """
    C{body}, a JSON object, with C{"stream_options":{"include_usage":true}}
    added as its last member.  Go's decoder lets the last occurrence of a key
    win, so this overrides whatever the client said about it.
    """
    inner = body.rstrip()[:-1].rstrip()
    separator = b"" if inner.endswith(b"{") else b","
    return inner + separator + b'"stream_options":{"include_usage":true}}'
