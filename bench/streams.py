"""
Figures 3 and 4: streamed generations (C{POST /api/generate}, C{"stream":
true}), seen by a client that timestamps every NDJSON line as it arrives.

The client is an asyncio L{asyncio.Protocol} over a raw socket: no HTTP
library, one C{perf_counter} and one C{bytes.count} per read, so that 64
streams of 200 lines a second (or 1,000 held streams) cost it little and it
is not what is being measured.  Each NDJSON object ends with C{"}\\n"} (HTTP
chunk framing ends with C{"\\r\\n"}), so counting that pair counts lines.

Time to first byte starts when the request is written, the connection
already made: 64 connections at once overflow a Twisted listen backlog (50),
and the kernel retries a dropped SYN after a whole second, which would swamp
the figure.  The target's own CPU time over each batch of streams is read
too: divided by the lines delivered, it is the CPU per streamed token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from servers import HOST, Server

_PROMPT = "Why is the sky blue?"
CONNECT_TIMEOUT = 10.0
# Tokens of a held stream: enough to outlast the hold (the fake plans every
# token of a generation up front, so not a million).
_HELD_TOKENS = 100


def _request(port: int, tokens: int) -> bytes:
    body = json.dumps({
        "model": "llama3.2", "prompt": _PROMPT, "stream": True,
        "options": {"num_predict": tokens},
    }).encode()
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Stream(asyncio.Protocol):
    """One streamed generation, timestamping the first byte and every line."""

    def __init__(self, request: bytes, closed: asyncio.Future[None]) -> None:
        self.request = request
        self.closed = closed
        self.sent = float("nan")
        self.status = b""
        self.first_byte: float | None = None
        self.lines: list[float] = []
        self.transport: asyncio.Transport | None = None
        self._last = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sent = time.perf_counter()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.first_byte is None:
            self.first_byte = now
            self.status = data[9:12]
        count = data.count(b"}\n") + (self._last == b"}" and data[:1] == b"\n")
        self._last = data[-1:]
        if count:
            self.lines += [now] * count
        if data.endswith(b"\r\n0\r\n\r\n"):  # the last chunk: don't wait for the close
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class StreamResult:
    """
    One stream: time to first byte (from the request written on an
    established connection) and the gaps between lines, in seconds.
    """

    target: str
    concurrency: int
    ok: bool
    ttfb: float
    gaps: list[float] = field(repr=False)


async def _open(port: int, tokens: int) -> _Stream:
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    request = _request(port, tokens)
    _, stream = await asyncio.wait_for(loop.create_connection(
        lambda: _Stream(request, closed), HOST, port), CONNECT_TIMEOUT)
    return stream


async def _generate(target: str, port: int, concurrency: int, tokens: int,
                    timeout: float) -> StreamResult:
    stream = await _open(port, tokens)
    try:
        await asyncio.wait_for(asyncio.shield(stream.closed), timeout)
    except TimeoutError:
        pass
    finally:
        assert stream.transport is not None
        stream.transport.abort()
    lines = stream.lines
    ok = stream.status == b"200" and len(lines) == tokens
    ttfb = (stream.first_byte or float("nan")) - stream.sent
    gaps = [b - a for a, b in zip(lines, lines[1:])]
    return StreamResult(target, concurrency, ok, ttfb, gaps)


@dataclass
class Batch:
    """
    Streams run against one target in one round, one at a time or at once,
    and the CPU seconds the target's process spent on them.
    """

    target: str
    concurrency: int
    cpu: float
    results: list[StreamResult]

    @property
    def lines(self) -> int:
        return sum(len(r.gaps) + 1 for r in self.results if r.ok)


async def _batch(name: str, server: Server, sequential: int, concurrent: int, tokens: int,
                 timeout: float) -> list[Batch]:
    batches = []
    before = sum(server.cpu())
    results = [await _generate(name, server.port, 1, tokens, timeout) for _ in range(sequential)]
    after = sum(server.cpu())
    batches.append(Batch(name, 1, after - before, results))
    results = await asyncio.gather(*(
        _generate(name, server.port, concurrent, tokens, timeout) for _ in range(concurrent)))
    batches.append(Batch(name, concurrent, sum(server.cpu()) - after, results))
    return batches


def streaming(targets: dict[str, Server], rounds: int, sequential: int, concurrent: int,
              tokens: int = 64, timeout: float = 30.0) -> list[Batch]:
    """
    C{rounds} rounds; in each, for every target (order rotated per round),
    C{sequential} single streams one after the other, then C{concurrent}
    streams at once.  Every stream asks for C{tokens} tokens.  A first,
    unmeasured batch of C{concurrent} short streams per target opens the
    proxies' upstream connections, so that no measured stream waits for a
    connection to the fake (whose listen backlog is only 50).
    """
    async def run() -> list[Batch]:
        for name, server in targets.items():  # fill the proxies' upstream pools
            await asyncio.gather(*(
                _generate(name, server.port, concurrent, 2, timeout) for _ in range(concurrent)))
        batches: list[Batch] = []
        names = list(targets)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                batches += await _batch(name, targets[name], sequential, concurrent, tokens,
                                        timeout)
        return batches

    return asyncio.run(run())


@dataclass(frozen=True)
class HeldStreams:
    """The memory of a server holding C{held} open streams, in bytes."""

    target: str
    held: int
    idle_rss: int
    peak_rss: int

    @property
    def per_stream(self) -> float:
        return (self.peak_rss - self.idle_rss) / max(self.held, 1)


async def _hold(target: str, server: Server, count: int, token_delay: float) -> HeldStreams:
    warm = await _open(server.port, 1)  # one whole stream first: lazy imports, first buffers
    await asyncio.wait_for(asyncio.shield(warm.closed), 10 * token_delay + 10)
    idle_rss, _ = server.memory()
    streams: list[_Stream] = []
    try:
        for start in range(0, count, 25):  # paced: a listen backlog is 50 in Twisted
            streams += await asyncio.gather(*(
                _open(server.port, _HELD_TOKENS) for _ in range(start, min(start + 25, count))))
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(s.first_byte is None for s in streams):
            await asyncio.sleep(0.05)
        await asyncio.sleep(2 * token_delay)  # a couple of tokens on every stream
        held = sum(s.first_byte is not None and not s.closed.done() for s in streams)
        _, peak_rss = server.memory()
    finally:
        for stream in streams:
            assert stream.transport is not None
            stream.transport.abort()
    await asyncio.sleep(1)  # let the servers notice the closes before the next target
    return HeldStreams(target, held, idle_rss, peak_rss)


def hold_streams(targets: dict[str, Server], count: int, token_delay: float) -> list[HeldStreams]:
    """
    For each target in turn, open C{count} streams that stay open (the
    upstream sends one token every C{token_delay} seconds and never ends),
    wait until every one has its first byte, and read the target's resident
    memory before (after one warm-up stream) and at its peak (C{VmHWM}).
    """
    async def run() -> list[HeldStreams]:
        return [await _hold(name, server, count, token_delay) for name, server in targets.items()]

    return asyncio.run(run())
