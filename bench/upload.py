"""
Upload: does a 1 GiB blob upload stream through the proxy, or pile up in it?

    python bench/upload.py [--mib 1024] [--json FILE]

Starts the fake Ollama and the proxy (L{servers}), then sends
C{POST /api/blobs/sha256:<digest>} twice: once with a C{Content-Length} and
once chunked (no length).  The body comes from a generator of 1 MiB blocks
(a fixed pseudo-random block with its index in the first 8 bytes), so the
client never holds more than one block either.  The digest is known: the
same generator is hashed before the upload, so the fake answers 201 Created
(two different seeds, so the second upload is not a blob the fake already
has).  The fake spools the body to a temporary file; its memory is not
what is measured.

What is measured, of the proxy process: its resident memory (C{VmRSS}, via
psutil) sampled every 100 ms by a thread during each upload, as growth over
the figure just before that upload (the aim is less than 50 MB), and the
kernel's high-water mark (C{VmHWM}) before and after, and its CPU seconds
(user + system, from C{/proc}); throughput is the body size over the time from the request's first byte to the response.  The
proxy's CSV row for each upload is checked for the status and the full
body size.

Bounded by the size, a socket timeout and an alarm; every server is
stopped on the way out.  Exits 1 if an upload fails or misses the aim.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.client
import json
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import psutil

from servers import HOST, Server, Servers

MiB = 1024 * 1024
BUDGET = 280  # seconds
GROWTH_AIM = 50 * MiB
SAMPLE_EVERY = 0.1


def blocks(mib: int, seed: int) -> Iterator[bytes]:
    """C{mib} blocks of 1 MiB, the same for the same seed, made one at a time."""
    base = random.Random(seed).randbytes(MiB)
    for i in range(mib):
        yield i.to_bytes(8, "big") + base[8:]


def digest_of(mib: int, seed: int) -> str:
    sha = hashlib.sha256()
    for block in blocks(mib, seed):
        sha.update(block)
    return "sha256:" + sha.hexdigest()


class RssSampler(threading.Thread):
    """Samples a process's RSS every L{SAMPLE_EVERY} seconds until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.baseline = int(self.process.memory_info().rss)
        self.peak = self.baseline
        self.samples = 0
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.wait(SAMPLE_EVERY):
            self.peak = max(self.peak, int(self.process.memory_info().rss))
            self.samples += 1

    def stop(self) -> None:
        self._finished.set()
        self.join()


@dataclass
class Upload:
    mode: str
    bytes: int
    status: int
    seconds: float
    mib_per_second: float
    rss_before: int
    rss_peak_growth: int
    samples: int
    proxy_cpu_seconds: float
    hwm_before: int
    hwm_after: int
    csv_status: str = ""
    csv_request_size: str = ""


def upload(proxy: Server, mib: int, seed: int, chunked: bool) -> Upload:
    """One upload through the proxy, its RSS sampled while it runs."""
    digest = digest_of(mib, seed)
    headers = {"Content-Type": "application/octet-stream"}
    if not chunked:
        headers["Content-Length"] = str(mib * MiB)
    hwm_before = proxy.memory()[1]
    sampler = RssSampler(proxy.pid)
    cpu_before = proxy.cpu()
    sampler.start()
    connection = http.client.HTTPConnection(HOST, proxy.port, timeout=120)
    try:
        started = time.monotonic()
        connection.request("POST", f"/api/blobs/{digest}", body=blocks(mib, seed), headers=headers)
        response = connection.getresponse()
        response.read()
        seconds = time.monotonic() - started
    finally:
        connection.close()
        sampler.stop()
    return Upload(
        mode="chunked" if chunked else "content-length",
        bytes=mib * MiB,
        status=response.status,
        seconds=seconds,
        mib_per_second=mib / seconds,
        rss_before=sampler.baseline,
        rss_peak_growth=sampler.peak - sampler.baseline,
        samples=sampler.samples,
        proxy_cpu_seconds=sum(proxy.cpu()) - sum(cpu_before),
        hwm_before=hwm_before,
        hwm_after=proxy.memory()[1],
    )


def _fill_from_csv(path: str, uploads: list[Upload]) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if row["endpoint"].startswith("/api/blobs/")]
        if len(rows) >= len(uploads):
            break
        time.sleep(0.1)
    for up, row in zip(uploads, rows):
        up.csv_status, up.csv_request_size = row["http_status"], row["request_size_bytes"]


def failures(uploads: list[Upload]) -> list[str]:
    problems = []
    for up in uploads:
        if up.status != 201 or up.csv_status != "201" or up.csv_request_size != str(up.bytes):
            problems.append(f"{up.mode}: status {up.status}, row {up.csv_status} {up.csv_request_size}")
        if up.rss_peak_growth > GROWTH_AIM:
            problems.append(f"{up.mode}: RSS grew {up.rss_peak_growth / 1e6:.1f} MB")
    return problems


def table(uploads: list[Upload]) -> str:
    lines = [f"{'upload':<16}{'status':>7}{'MiB/s':>9}{'seconds':>9}{'RSS before':>12}"
             f"{'peak growth':>13}{'samples':>9}{'proxy CPU':>11}{'VmHWM before/after':>22}  CSV row"]
    for up in uploads:
        lines.append(
            f"{up.mode:<16}{up.status:>7}{up.mib_per_second:>9.0f}{up.seconds:>9.1f}"
            f"{up.rss_before / 1e6:>9.1f} MB{up.rss_peak_growth / 1e6:>10.1f} MB{up.samples:>9}{up.proxy_cpu_seconds:>9.1f} s"
            f"{up.hwm_before / 1e6:>11.1f} /{up.hwm_after / 1e6:>6.1f} MB  "
            f"{up.csv_status} {up.csv_request_size} bytes"
        )
    problems = failures(uploads)
    lines.append("RESULT: " + ("streamed, under the 50 MB aim" if not problems else "; ".join(problems)))
    return "\n".join(lines)


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError(f"the upload run took longer than {BUDGET} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="body size in MiB (default 1 GiB)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(BUDGET)
    try:
        with Servers() as servers:
            fake = servers.fake("fake", 0.005)
            proxy = servers.proxy("proxy", fake)
            time.sleep(0.5)
            uploads = [upload(proxy, args.mib, seed=1, chunked=False),
                       upload(proxy, args.mib, seed=2, chunked=True)]
            assert proxy.csv_path is not None
            _fill_from_csv(proxy.csv_path, uploads)
    finally:
        signal.alarm(0)
    print(table(uploads))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"uploads": [asdict(up) for up in uploads], "failures": failures(uploads)}, f, indent=2)
    return 1 if failures(uploads) else 0


if __name__ == "__main__":
    sys.exit(main())
