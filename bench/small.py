"""
Figures 1 and 2: small non-streamed requests (C{GET /api/tags}, a 1 kB JSON
reply), driven by C{wrk} over keep-alive connections.

wrk is C and takes little of the two cores, so the servers get most of them.
For each run the CPU time (user and system) of the server under test is read
from C{/proc} before and after, and divided by the number of requests wrk
completed: that is the CPU per request, the server's own accounting, the
load generator excluded.  Latency percentiles come from C{wrk --latency}.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from servers import HOST, Server

PATH = "/api/tags"

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_NUMBER = r"([\d.]+)(us|ms|s|m)\b"


@dataclass(frozen=True)
class WrkRun:
    """One wrk run against one target; times in seconds."""

    target: str
    round: int
    concurrency: int
    requests: int
    seconds: float
    p50: float
    p99: float
    errors: int
    cpu_user: float
    cpu_sys: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_per_request(self) -> float:
        return (self.cpu_user + self.cpu_sys) / self.requests


def _seconds(match: re.Match[str]) -> float:
    return float(match[1]) * _UNITS[match[2]]


def _parse(report: str) -> tuple[int, float, float, float, int]:
    """(requests, seconds, p50, p99, errors) from wrk's text report."""
    done = re.search(r"(\d+) requests in " + _NUMBER, report)
    p50 = re.search(r"^\s+50%\s+" + _NUMBER, report, re.M)
    p99 = re.search(r"^\s+99%\s+" + _NUMBER, report, re.M)
    if not (done and p50 and p99):
        raise RuntimeError(f"cannot read wrk's report:\n{report}")
    errors = 0
    if socket_errors := re.search(r"Socket errors: (.*)", report):
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors[1]))
    if non_2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", report):
        errors += int(non_2xx[1])
    requests = int(done[1])
    seconds = float(done[2]) * _UNITS[done[3]]
    return requests, seconds, _seconds(p50), _seconds(p99), errors


def wrk(target: str, round: int, server: Server, concurrency: int, seconds: int) -> WrkRun:
    """Load C{server} with C{concurrency} connections for C{seconds} (wrk takes whole seconds)."""
    user_before, sys_before = server.cpu()
    done = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "5s", "--latency",
         f"http://{HOST}:{server.port}{PATH}"],
        capture_output=True, text=True, timeout=seconds + 30,
    )
    user_after, sys_after = server.cpu()
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed against {target}: {done.stderr or done.stdout}")
    report = done.stdout
    requests, elapsed, p50, p99, errors = _parse(report)
    if requests == 0:
        raise RuntimeError(f"wrk completed no request against {target}:\n{report}")
    return WrkRun(target, round, concurrency, requests, elapsed, p50, p99, errors,
                  user_after - user_before, sys_after - sys_before)


def small_requests(
    targets: dict[str, Server], concurrencies: tuple[int, ...], rounds: int, seconds: int
) -> list[WrkRun]:
    """
    C{rounds} rounds; in each, every target at every concurrency, the
    targets' order rotated from round to round so that none is always
    measured first or last.
    """
    for server in targets.values():  # open the pools, warm the caches
        wrk("warm-up", -1, server, max(concurrencies), 1)
    runs = []
    names = list(targets)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for concurrency in concurrencies:
            for name in order:
                runs.append(wrk(name, r, targets[name], concurrency, seconds))
    return runs
