"""
Soak: does the proxy stay the same size, hold no file descriptors and log
exactly one CSV row per request over 10,000 mixed requests?

    python bench/soak.py [--requests 10000] [--concurrency 32] [--json FILE]

Starts the fake Ollama (one token every 5 ms) and the proxy in front of it,
each its own process on 127.0.0.1 (L{servers}), and sends a fixed, shuffled
mix of requests (L{MIX}) from 32 asyncio workers over raw keep-alive
sockets: streamed and non-streamed generate and chat, C{/api/tags},
C{/api/embed}, C{/v1/chat/completions} streamed and not, failures (unknown
model 404, invalid JSON 400, unknown path 404) and streams the client
abandons after the first chunk (it closes the socket).

What is measured, all of the proxy process, from C{/proc} through psutil:

  - resident memory (RSS) before the load, after the first 1,000 responses,
    after all of them, and the peak sampled every 200 ms; the target is
    less than 20 MB of growth from 1,000 to the end;
  - open file descriptors before the load, right after it and after a 2 s
    settle; the target is the starting count, once the upstream connections
    the proxy's pool keeps idle for reuse (counted from its TCP sockets) are
    taken off;
  - CPU seconds (user + system) over the load;
  - the CSV: rows (read with L{csv.reader}) against requests sent, rows
    without the full column count, and, per C{X-Request-Id}, the status the
    row records against the one the client saw.

The client's own CPU time is reported too, so that it can be seen not to be
the bottleneck.  Everything is bounded: the request count, a timeout per
request and an alarm over the whole run; every server is stopped on the way
out, error and Ctrl-C included.  Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from ollamaproxy.record import COLUMNS
from servers import HOST, Servers, raise_open_files_limit

BUDGET = 280  # seconds; the alarm that bounds the whole run
REQUEST_TIMEOUT = 30.0
RSS_GROWTH_TARGET = 20 * 1024 * 1024
SETTLE = 2.0


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix, and the status the proxy should give it."""

    name: str
    weight: int
    method: str
    path: str
    body: bytes | None
    status: int
    abandon: bool = False  # close the socket after the first body chunk


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


_MESSAGES = [{"role": "user", "content": "soak"}]
TOKENS = 8

MIX: tuple[Kind, ...] = (
    Kind("generate-stream", 20, "POST", "/api/generate",
         _json({"model": "llama3.2", "prompt": "soak", "options": {"num_predict": TOKENS}}), 200),
    Kind("chat-stream", 15, "POST", "/api/chat",
         _json({"model": "llama3.2", "messages": _MESSAGES, "options": {"num_predict": TOKENS}}), 200),
    Kind("generate", 10, "POST", "/api/generate",
         _json({"model": "llama3.2", "prompt": "soak", "stream": False,
                "options": {"num_predict": TOKENS}}), 200),
    Kind("tags", 10, "GET", "/api/tags", None, 200),
    Kind("embed", 10, "POST", "/api/embed", _json({"model": "all-minilm", "input": ["a", "b"]}), 200),
    Kind("openai-stream", 8, "POST", "/v1/chat/completions",
         _json({"model": "llama3.2", "messages": _MESSAGES, "max_tokens": TOKENS, "stream": True}), 200),
    Kind("openai", 7, "POST", "/v1/chat/completions",
         _json({"model": "llama3.2", "messages": _MESSAGES, "max_tokens": TOKENS}), 200),
    Kind("unknown-model", 5, "POST", "/api/generate", _json({"model": "no-such-model", "prompt": "x"}), 404),
    Kind("invalid-json", 5, "POST", "/api/chat", b"{not json", 400),
    Kind("unknown-path", 5, "GET", "/api/no-such-path", None, 404),
    Kind("abandoned-stream", 5, "POST", "/api/generate",
         _json({"model": "llama3.2", "prompt": "soak", "options": {"num_predict": 400}}), 200,
         abandon=True),
)


def plan(count: int, seed: int = 1) -> list[Kind]:
    """C{count} requests in the proportions of L{MIX}, in a fixed shuffled order."""
    total = sum(kind.weight for kind in MIX)
    kinds = [kind for kind in MIX for _ in range(kind.weight)]
    order = [kinds[i % total] for i in range(count)]
    random.Random(seed).shuffle(order)
    return order


# -- the client ---------------------------------------------------------------


@dataclass
class Result:
    """What the client saw of one request; C{status} is None when no response came."""

    kind: str
    status: int | None = None
    request_id: str | None = None
    complete: bool = False  # the whole response was read
    error: str | None = None


def _request_bytes(kind: Kind, port: int) -> bytes:
    head = f"{kind.method} {kind.path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: ollamaproxy-soak\r\n"
    if kind.body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(kind.body)}\r\n"
    return (head + "\r\n").encode() + (kind.body or b"")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], abandon: bool) -> bool:
    """
    Read the response body; return whether the connection can be reused.
    With C{abandon}, stop after the first chunk.
    """
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            await reader.readexactly(size + 2)
            if abandon:
                return False
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        while await reader.read(1 << 16):
            pass
        return False
    return headers.get("connection", "").lower() != "close"


class Connection:
    """A keep-alive HTTP/1.1 connection, opened when first needed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def exchange(self, kind: Kind, result: Result) -> None:
        if self._streams is None:
            self._streams = await asyncio.open_connection(HOST, self.port)
        reader, writer = self._streams
        reusable = False
        try:
            writer.write(_request_bytes(kind, self.port))
            result.status, headers = await _read_head(reader)
            result.request_id = headers.get("x-request-id")
            reusable = await _read_body(reader, headers, kind.abandon)
            result.complete = not kind.abandon
        finally:
            if not reusable:
                self.close()

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def run_load(
    port: int,
    kinds: Sequence[Kind],
    concurrency: int,
    on_result: Callable[[int], None] = lambda done: None,
    stop: Callable[[], bool] = lambda: False,
) -> list[Result]:
    """
    Send C{kinds} in order from C{concurrency} workers; C{on_result} gets the
    number of responses so far after each one.  Workers take no new request
    once C{stop()} is true.
    """
    results = [Result(kind.name) for kind in kinds]
    queue = iter(range(len(kinds)))
    done = 0

    async def worker() -> None:
        nonlocal done
        connection = Connection(port)
        try:
            for i in queue:
                if stop():
                    return
                try:
                    await asyncio.wait_for(connection.exchange(kinds[i], results[i]), REQUEST_TIMEOUT)
                except (OSError, EOFError, asyncio.LimitOverrunError, ValueError) as e:
                    results[i].error = f"{type(e).__name__}: {e}"
                    connection.close()
                done += 1
                on_result(done)
        finally:
            connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


# -- the proxy process --------------------------------------------------------


class Probe:
    """The proxy's memory, descriptors, CPU and upstream sockets, from /proc."""

    def __init__(self, pid: int, upstream_port: int) -> None:
        self.process = psutil.Process(pid)
        self.upstream_port = upstream_port

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def fds(self) -> int:
        return int(self.process.num_fds())

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def upstream_connections(self) -> int:
        """Established TCP connections to the fake (the pool's idle ones, at rest)."""
        return sum(
            1 for c in self.process.net_connections(kind="tcp")
            if c.raddr and c.raddr.port == self.upstream_port and c.status == psutil.CONN_ESTABLISHED
        )


# -- the CSV ------------------------------------------------------------------


@dataclass
class CsvCheck:
    """The CSV against what the client saw."""

    rows: int = 0
    short_or_long_rows: int = 0
    header_ok: bool = False
    duplicate_ids: int = 0
    missing_ids: int = 0  # the client has the id, the CSV does not
    unknown_ids: int = 0  # the CSV has the id, the client does not
    status_mismatches: int = 0
    examples: list[str] = field(default_factory=list)


def read_rows(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows of a CSV file, read with L{csv.reader}."""
    with open(path, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    return header, rows


def check_csv(rows: Sequence[Sequence[str]], header: Sequence[str], results: Sequence[Result]) -> CsvCheck:
    """Compare data rows with the client's results, by request id."""
    check = CsvCheck(rows=len(rows), header_ok=tuple(header) == COLUMNS)
    id_at, status_at = COLUMNS.index("request_id"), COLUMNS.index("http_status")
    logged: dict[str, str] = {}
    for row in rows:
        if len(row) != len(COLUMNS):
            check.short_or_long_rows += 1
            check.examples.append(f"row of {len(row)} cells: {row[:3]}")
            continue
        if row[id_at] in logged:
            check.duplicate_ids += 1
        logged[row[id_at]] = row[status_at]
    seen = {r.request_id: r for r in results if r.request_id}
    for request_id, result in seen.items():
        status = logged.get(request_id)
        if status is None:
            check.missing_ids += 1
            check.examples.append(f"no row for {result.kind} {request_id}")
        elif status != str(result.status):
            check.status_mismatches += 1
            check.examples.append(f"{result.kind} {request_id}: client {result.status}, row {status}")
    check.unknown_ids = len(logged.keys() - seen.keys())
    del check.examples[10:]
    return check


def wait_for_rows(path: str, expected: int, timeout: float = 10.0) -> None:
    """Wait (bounded) until C{path} holds C{expected} data rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                if f.read().count(b"\r\n") - 1 >= expected:
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.1)


# -- the soak -----------------------------------------------------------------


@dataclass
class Soak:
    requests: int
    concurrency: int
    seconds: float
    requests_per_second: float
    client_cpu_share: float  # of one core, over the load
    no_response: int
    unexpected_status: int
    proxy_cpu_seconds: float
    proxy_cpu_ms_per_request: float
    rss_start: int
    rss_after_1000: int
    rss_end: int
    rss_peak: int
    fds_start: int
    fds_after: int
    fds_settled: int
    idle_upstream_connections: int
    csv: CsvCheck
    by_kind: dict[str, int]

    @property
    def rss_growth(self) -> int:
        return self.rss_end - self.rss_after_1000

    @property
    def fd_leak(self) -> int:
        return self.fds_settled - self.idle_upstream_connections - self.fds_start

    def failures(self) -> list[str]:
        problems = []
        if self.rss_growth > RSS_GROWTH_TARGET:
            problems.append(f"RSS grew {_mb(self.rss_growth)} from 1,000 to the end")
        if self.fd_leak != 0:
            problems.append(f"{self.fd_leak} file descriptors not accounted for")
        if self.no_response or self.unexpected_status:
            problems.append(f"{self.no_response} without response, {self.unexpected_status} unexpected statuses")
        c = self.csv
        if (c.rows != self.requests or c.short_or_long_rows or not c.header_ok or c.duplicate_ids
                or c.missing_ids or c.unknown_ids or c.status_mismatches):
            problems.append(f"CSV does not match the requests: {asdict(c)}")
        return problems


def _mb(n: float) -> str:
    return f"{n / 1e6:+.1f} MB" if n < 0 else f"{n / 1e6:.1f} MB"


def soak(requests: int, concurrency: int) -> Soak:
    with Servers() as servers:
        fake = servers.fake("fake", 0.005)
        proxy = servers.proxy("proxy", fake)
        assert proxy.csv_path is not None
        probe = Probe(proxy.pid, fake.port)
        time.sleep(0.5)  # let start-up finish before the baseline
        rss_start, fds_start, cpu_start = probe.rss(), probe.fds(), probe.cpu()
        marks: dict[str, int] = {"peak": rss_start}

        def on_result(done: int) -> None:
            if done == min(1000, requests):
                marks["after_1000"] = probe.rss()

        async def load() -> list[Result]:
            sampling = asyncio.create_task(_sample_peak(probe, marks))
            try:
                return await run_load(proxy.port, plan(requests), concurrency, on_result)
            finally:
                sampling.cancel()

        started, client_cpu = time.monotonic(), time.process_time()
        results = asyncio.run(load())
        seconds = time.monotonic() - started
        client_cpu = time.process_time() - client_cpu
        rss_end, fds_after, cpu_end = probe.rss(), probe.fds(), probe.cpu()
        time.sleep(SETTLE)
        fds_settled, idle = probe.fds(), probe.upstream_connections()
        wait_for_rows(proxy.csv_path, requests)
        header, rows = read_rows(proxy.csv_path)

    expected = {kind.name: kind.status for kind in MIX}
    by_kind: dict[str, int] = {}
    for r in results:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
    return Soak(
        requests=requests,
        concurrency=concurrency,
        seconds=seconds,
        requests_per_second=requests / seconds,
        client_cpu_share=client_cpu / seconds,
        no_response=sum(1 for r in results if r.status is None),
        unexpected_status=sum(1 for r in results if r.status is not None and r.status != expected[r.kind]),
        proxy_cpu_seconds=cpu_end - cpu_start,
        proxy_cpu_ms_per_request=(cpu_end - cpu_start) * 1000 / requests,
        rss_start=rss_start,
        rss_after_1000=marks.get("after_1000", rss_start),
        rss_end=rss_end,
        rss_peak=max(marks["peak"], rss_end),
        fds_start=fds_start,
        fds_after=fds_after,
        fds_settled=fds_settled,
        idle_upstream_connections=idle,
        csv=check_csv(rows, header, results),
        by_kind=by_kind,
    )


async def _sample_peak(probe: Probe, marks: dict[str, int]) -> None:
    while True:
        marks["peak"] = max(marks["peak"], probe.rss())
        await asyncio.sleep(0.2)


def table(s: Soak) -> str:
    c = s.csv
    lines = [
        f"{'requests':<36}{s.requests:,} at concurrency {s.concurrency} in {s.seconds:.1f} s "
        f"({s.requests_per_second:,.0f}/s; client CPU {s.client_cpu_share:.0%} of a core)",
        f"{'  mix':<36}" + ", ".join(f"{k} {n}" for k, n in s.by_kind.items()),
        f"{'  no response / unexpected status':<36}{s.no_response} / {s.unexpected_status}",
        f"{'proxy CPU':<36}{s.proxy_cpu_seconds:.1f} s ({s.proxy_cpu_ms_per_request:.2f} ms per request)",
        f"{'proxy RSS start':<36}{_mb(s.rss_start)}",
        f"{'proxy RSS after 1,000':<36}{_mb(s.rss_after_1000)}",
        f"{'proxy RSS after all':<36}{_mb(s.rss_end)} (peak {_mb(s.rss_peak)})",
        f"{'  growth 1,000 -> all (< 20 MB)':<36}{_mb(s.rss_growth)}",
        f"{'proxy fds start / after / settled':<36}{s.fds_start} / {s.fds_after} / {s.fds_settled}",
        f"{'  idle pooled upstream connections':<36}{s.idle_upstream_connections}",
        f"{'  settled - idle pool - start (0)':<36}{s.fd_leak}",
        f"{'CSV rows (= requests)':<36}{c.rows:,} (header {'ok' if c.header_ok else 'WRONG'})",
        f"{'  rows without {0} cells'.format(len(COLUMNS)):<36}{c.short_or_long_rows}",
        f"{'  ids: missing / unknown / dup':<36}{c.missing_ids} / {c.unknown_ids} / {c.duplicate_ids}",
        f"{'  status differs from client':<36}{c.status_mismatches}",
    ]
    lines += [f"  e.g. {example}" for example in c.examples]
    problems = s.failures()
    lines.append("RESULT: " + ("all targets met" if not problems else "; ".join(problems)))
    return "\n".join(lines)


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError(f"the soak took longer than {BUDGET} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(BUDGET)
    try:
        result = soak(args.requests, args.concurrency)
    finally:
        signal.alarm(0)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(result), "rss_growth": result.rss_growth, "fd_leak": result.fd_leak,
                       "failures": result.failures()}, f, indent=2)
    return 1 if result.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
