"""
What it costs to put ollamaproxy in front of Ollama.

    python bench/run.py [--quick] [--json FILE] [--no-nginx] [--no-twisted]
    python bench/run.py --profile

Starts a fake Ollama (one token every 5 ms), the proxy in front of it (CSV
logging on, into a fresh temporary directory) and, when nginx is installed,
nginx as a reference (unbuffered, keep-alive upstream pool, access log on),
each in its own process on 127.0.0.1.  The same load is sent direct (to the
fake) and through each proxy, interleaved in rounds so that the drift of a
shared two-core machine hits them alike, and each figure is reported against
direct, as a ratio or a difference:

 1. CPU per small request (C{GET /api/tags}): the server's own user+system
    time over a wrk run divided by the requests wrk completed, at 1 and 32
    connections (L{small}).  "direct" is the fake's own cost.
 2. Small-request latency p50/p99 at 1 and 32 connections and throughput at
    32, from the same wrk runs.
 3. Streams of 64 tokens, 1 at a time and 64 at once: time to first byte
    and the gaps between NDJSON lines as the client sees them (L{streams}).
 4. Resident memory while holding 1,000 open streams (a second fake, one
    token a second, never ending): idle, peak (C{VmHWM}), and per stream.
 5. The CSV writer alone, in this process: rows per second, CPU per row, and
    that CPU as a share of the proxy's CPU per request at 32 connections
    (L{csvrate}).

Every load is bounded in requests and time, the whole run by an alarm; all
servers are stopped on the way out, error and Ctrl-C included.
C{--profile} instead runs py-spy on the proxy under small-request load and
prints where its CPU goes (L{profiling}).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import twisted

from csvrate import CsvRate, csv_rate
from profiling import profile
from servers import Server, Servers, raise_open_files_limit
from small import PATH, WrkRun, small_requests
from streams import Batch, HeldStreams, hold_streams, streaming

BUDGET = 290  # seconds; the alarm that bounds the whole run
CONCURRENCIES = (1, 32)


@dataclass(frozen=True)
class Plan:
    """How much of each load a run sends."""

    rounds: int  # interleaved rounds of each load
    wrk_seconds: int  # one wrk run
    sequential: int  # single streams per target per round
    concurrent: int = 64  # streams at once
    tokens: int = 64  # per stream
    token_delay: float = 0.005
    held: int = 1000  # streams held open for the memory figure
    held_token_delay: float = 1.0
    csv_rows: int = 20_000


FULL = Plan(rounds=5, wrk_seconds=3, sequential=8)
QUICK = Plan(rounds=2, wrk_seconds=1, sequential=4, csv_rows=5_000)


@dataclass
class Row:
    """A line of the table: a value per target, each proxy against direct."""

    figure: str
    values: dict[str, str]
    versus: dict[str, str] = field(default_factory=dict)
    target: str = ""
    ok: bool | None = None


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(len(ordered) * p / 100) - 1)]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _times(ratio: float) -> str:
    return f"{ratio:.2f}x"


def _plus_ms(seconds: float) -> str:
    return f"{seconds * 1e3:+.2f} ms"


def small_rows(runs: list[WrkRun], names: list[str]) -> list[Row]:
    """Figures 1 and 2, each a median over the rounds."""

    def pick(name: str, c: int) -> list[WrkRun]:
        return sorted((r for r in runs if r.target == name and r.concurrency == c),
                      key=lambda r: r.round)

    def median(name: str, c: int, metric: Callable[[WrkRun], float]) -> float:
        return statistics.median(metric(r) for r in pick(name, c))

    def paired(name: str, c: int, metric: Callable[[WrkRun], float],
               compare: Callable[[float, float], float]) -> float:
        """The median over rounds of compare(direct, name) within each round."""
        return statistics.median(
            compare(metric(d), metric(p)) for d, p in zip(pick("direct", c), pick(name, c)))

    def ratio(direct: float, other: float) -> float:
        return other / direct

    def added(direct: float, other: float) -> float:
        return other - direct

    proxies = names[1:]
    rows = []
    for c in CONCURRENCIES:
        cpu = {n: median(n, c, lambda r: r.cpu_per_request) for n in names}
        rows.append(Row(
            f"CPU per request, c={c} (µs)", {n: _us(v) for n, v in cpu.items()},
            {n: _times(paired(n, c, lambda r: r.cpu_per_request, ratio)) for n in proxies},
            "proxy <= 150 µs", cpu["proxy"] <= 150e-6,
        ))
        rows.append(Row("  user / sys (µs)", {
            n: f"{_us(median(n, c, lambda r: r.cpu_user / r.requests))} / "
               f"{_us(median(n, c, lambda r: r.cpu_sys / r.requests))}"
            for n in names
        }))
    c = max(CONCURRENCIES)
    rate = {n: median(n, c, lambda r: r.throughput) for n in names}
    rate_ratio = {n: paired(n, c, lambda r: r.throughput, ratio) for n in proxies}
    rows.append(Row(
        f"throughput, c={c} (req/s)", {n: f"{v:,.0f}" for n, v in rate.items()},
        {n: _times(v) for n, v in rate_ratio.items()}, ">= 0.75x", rate_ratio["proxy"] >= 0.75,
    ))
    for c in CONCURRENCIES:
        for name, metric in (("p50", lambda r: r.p50), ("p99", lambda r: r.p99)):
            more = {n: paired(n, c, metric, added) for n in proxies}
            checked = (c, name) == (1, "p50")
            rows.append(Row(
                f"latency {name}, c={c} (ms)", {n: _ms(median(n, c, metric)) for n in names},
                {n: _plus_ms(v) for n, v in more.items()},
                "+<= 0.25 ms" if checked else "", more["proxy"] <= 0.25e-3 if checked else None,
            ))
    return rows


def stream_rows(batches: list[Batch], names: list[str], plan: Plan) -> list[Row]:
    """
    Figure 3: percentiles over every stream (TTFB) or line gap of all rounds,
    and the target's CPU per token delivered.
    """
    rows = []
    for c in (1, plan.concurrent):
        label = "1 stream" if c == 1 else f"{c} streams"
        mine = [b for b in batches if b.concurrency == c]
        ok = [r for b in mine for r in b.results if r.ok]
        ttfb = {n: [r.ttfb for r in ok if r.target == n] for n in names}
        gaps = {n: [g for r in ok if r.target == n for g in r.gaps] for n in names}
        figures = (  # (figure, value per target, checked against "+< 1 ms")
            ("TTFB p50", {n: percentile(ttfb[n], 50) for n in names}, False),
            ("TTFB p99", {n: percentile(ttfb[n], 99) for n in names}, c > 1),
            ("line gap p99", {n: percentile(gaps[n], 99) for n in names}, True),
            ("line gap max", {n: max(gaps[n], default=math.nan) for n in names}, False),
        )
        for what, value, checked in figures:
            more = {n: value[n] - value["direct"] for n in names[1:]}
            rows.append(Row(
                f"{what}, {label} (ms)", {n: _ms(x) for n, x in value.items()},
                {n: _plus_ms(x) for n, x in more.items()},
                "+< 1 ms" if checked else "", more["proxy"] < 1e-3 if checked else None,
            ))
        cpu = {n: sum(b.cpu for b in mine if b.target == n)
               / max(1, sum(b.lines for b in mine if b.target == n)) for n in names}
        rows.append(Row(
            f"CPU per token, {label} (µs)", {n: _us(x) for n, x in cpu.items()},
            {n: _times(cpu[n] / cpu["direct"]) for n in names[1:]},
        ))
    return rows


def held_rows(held: list[HeldStreams], plan: Plan) -> list[Row]:
    """Figure 4."""
    by = {h.target: h for h in held}
    mb = 1e6
    return [
        Row("RSS idle (MB)", {n: f"{h.idle_rss / mb:.1f}" for n, h in by.items()}),
        Row(f"RSS peak, {plan.held} streams held (MB)",
            {n: f"{h.peak_rss / mb:.1f}" for n, h in by.items()},
            {n: _times(h.peak_rss / by["direct"].peak_rss) for n, h in by.items() if n != "direct"},
            "proxy < 60 MB", by["proxy"].peak_rss < 60 * mb),
        Row("RSS per held stream (kB)", {n: f"{h.per_stream / 1e3:.1f}" for n, h in by.items()},
            {n: _times(h.per_stream / by["direct"].per_stream)
             for n, h in by.items() if n != "direct"}),
    ]


def csv_rows(csv: CsvRate, runs: list[WrkRun]) -> list[Row]:
    """Figure 5; the share is of the proxy's median CPU per request at c=32."""
    c = max(CONCURRENCIES)
    per_request = statistics.median(
        r.cpu_per_request for r in runs if r.target == "proxy" and r.concurrency == c)
    share = csv.cpu_per_row / per_request
    return [
        Row("CSV log: rows/s (in-process)", {"proxy": f"{csv.rows_per_second:,.0f}"}),
        Row("CSV log: CPU per row (µs)", {"proxy": f"{csv.cpu_per_row * 1e6:.1f}"}),
        Row(f"CSV log: share of CPU/request, c={c}", {"proxy": f"{share:.1%}"},
            target="<= 10%", ok=share <= 0.10),
    ]


def render(rows: list[Row], names: list[str]) -> str:
    proxies = names[1:]
    header = ["figure", *names, *(f"{n} vs direct" for n in proxies), "target", ""]
    table = [header]
    for row in rows:
        verdict = {True: "ok", False: "MISS", None: ""}[row.ok]
        table.append([row.figure, *(row.values.get(n, "-") for n in names),
                      *(row.versus.get(n, "") for n in proxies), row.target, verdict])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = []
    for i, line in enumerate(table):
        cells = [line[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(line[1:-2], widths[1:-2])]
        cells += [line[-2].ljust(widths[-2]), line[-1]]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    versions = {}
    for tool in ("wrk", "nginx"):
        try:
            done = subprocess.run([tool, "-v"], capture_output=True, text=True, timeout=10)
        except OSError:
            versions[tool] = "not installed"
            continue
        version = re.search(r"\d+\.\d+[.\w+-]*", done.stdout + done.stderr)
        versions[tool] = version[0] if version else "unknown"
    return {
        "cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
        "twisted": twisted.__version__, **versions,
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def notes(runs: list[WrkRun], batches: list[Batch], held: list[HeldStreams],
          proxy_csv_rows: int, client_share: float, plan: Plan) -> list[str]:
    """What might make a figure wrong: errors, failed streams, missing rows, a busy client."""
    out = [f"stream client: {client_share:.0%} of one core while streaming"]
    for name in dict.fromkeys(r.target for r in runs):
        errors = sum(r.errors for r in runs if r.target == name)
        if errors:
            out.append(f"{name}: {errors} wrk errors (socket errors or non-2xx)")
    results = [r for b in batches for r in b.results]
    for name in dict.fromkeys(r.target for r in results):
        failed = sum(not r.ok for r in results if r.target == name)
        if failed:
            out.append(f"{name}: {failed} streams failed or came back short")
    for h in held:
        if h.held < plan.held:
            out.append(f"{h.target}: only {h.held} of {plan.held} streams were held open")
    proxied = sum(r.requests for r in runs if r.target == "proxy") + sum(
        1 for r in results if r.target == "proxy")
    out.append(f"proxy CSV log: {proxy_csv_rows:,} rows written; "
               f"{proxied:,} measured requests went through the proxy, and the warm-ups")
    return out


def _count_rows(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f) - 1


def _out_of_time(signum: int, frame: object) -> NoReturn:
    raise TimeoutError(f"the benchmark ran past its {BUDGET} s budget")


def _terminated(signum: int, frame: object) -> NoReturn:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    parser.add_argument("--no-twisted", action="store_true",
                        help="skip the twisted.web.proxy.ReverseProxyResource reference")
    parser.add_argument("--profile", action="store_true",
                        help="profile the proxy under small-request load instead")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    raise_open_files_limit()
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(BUDGET)
    started = time.monotonic()

    def phase(title: str) -> None:
        print(f"[{time.monotonic() - started:3.0f} s] {title}", flush=True)

    about = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in about.items()), flush=True)

    with Servers() as servers:
        fake = servers.fake("fake", plan.token_delay)
        proxy = servers.proxy("proxy", fake)
        if args.profile:
            print(profile(proxy, servers.directory, concurrency=32, seconds=10, top=25))
            return
        targets: dict[str, Server] = {"direct": fake, "proxy": proxy}
        if not args.no_nginx and (nginx := servers.nginx("nginx", fake)):
            targets["nginx"] = nginx
        if not args.no_twisted:
            targets["twisted"] = servers.twisted("twisted", fake)
        names = list(targets)

        phase(f"1-2. small requests (GET {PATH}), wrk, {plan.rounds} rounds")
        runs = small_requests(targets, CONCURRENCIES, plan.rounds, plan.wrk_seconds)
        phase(f"3. streams of {plan.tokens} tokens, 1 and {plan.concurrent} at once")
        wall, cpu = time.monotonic(), time.process_time()
        batches = streaming(targets, plan.rounds, plan.sequential, plan.concurrent, plan.tokens)
        client_share = (time.process_time() - cpu) / (time.monotonic() - wall)
        assert proxy.csv_path is not None
        proxy_csv_rows = _count_rows(proxy.csv_path)

        phase(f"4. memory holding {plan.held} streams")
        slow = servers.fake("slow-fake", plan.held_token_delay)
        held_targets = {"direct": slow, "proxy": servers.proxy("slow-proxy", slow)}
        if "nginx" in targets and (slow_nginx := servers.nginx("slow-nginx", slow)):
            held_targets["nginx"] = slow_nginx
        held = hold_streams(held_targets, plan.held, plan.held_token_delay)

    phase("5. CSV writer")
    csv = csv_rate(plan.csv_rows)
    rows = (small_rows(runs, names) + stream_rows(batches, names, plan)
            + held_rows(held, plan) + csv_rows(csv, runs))
    elapsed = time.monotonic() - started

    print()
    print(render(rows, names))
    print()
    for note in notes(runs, batches, held, proxy_csv_rows, client_share, plan):
        print(f"note: {note}")
    print(f"{'quick' if args.quick else 'full'} run: {elapsed:.0f} s; "
          f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({
                "machine": about, "plan": asdict(plan), "seconds": elapsed,
                "table": [asdict(row) for row in rows],
                "wrk": [asdict(r) for r in runs],
                "streams": [
                    {"target": b.target, "concurrency": b.concurrency, "cpu": b.cpu,
                     "lines": b.lines, "ttfb": [r.ttfb for r in b.results],
                     "failed": sum(not r.ok for r in b.results)}
                    for b in batches
                ],
                "held": [asdict(h) for h in held],
                "csv": asdict(csv),
            }, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the servers are already stopped
        sys.exit(130)
