"""
Where the proxy's CPU goes under the small-request load (C{python
bench/run.py --profile}).

py-spy samples the proxy process while wrk loads it, only when a thread holds
the GIL (C{--gil}): the samples are the Python work, not time in system calls
(send, recv, epoll: the "sys" part of the CPU printed first) nor time the
thread spends waiting for a core, which on a busy two-core machine would
otherwise inflate whatever function happens to be preempted.  Functions are
ranked by self time, the share of samples in which the function itself, not
one of its callees, was running; then the same summed by top-level package;
then the proxy's own functions by inclusive time, callees counted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter

from servers import Server
from small import PATH, wrk


def _function(frame: str) -> str:
    """C{"f (path/x.py:12)"} -> C{"f (path/x.py)"}: lines of one function add up."""
    return re.sub(r":\d+\)$", ")", frame)


def _package(function: str) -> str:
    """C{"f (twisted/web/http.py)"} -> C{"twisted"}; C{"f (uuid.py)"} -> C{"uuid"}."""
    path = function.rpartition("(")[2].rstrip(")")
    return path.split("/")[0].removesuffix(".py") or "?"


def profile(proxy: Server, directory: str, concurrency: int, seconds: int, top: int) -> str:
    """Profile C{proxy} under C{seconds} of wrk load; the report as text."""
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    raw = os.path.join(directory, "py-spy.txt")
    sampler = subprocess.Popen(
        [spy, "record", "--pid", str(proxy.pid), "--duration", str(seconds), "--rate", "250",
         "--nonblocking", "--gil", "--format", "raw", "--output", raw],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.5)  # let py-spy attach
        run = wrk("proxy", 0, proxy, concurrency, seconds - 1)
        _, errors = sampler.communicate(timeout=seconds + 30)
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()
    if not os.path.exists(raw):
        raise RuntimeError(f"py-spy wrote no profile: {errors}")

    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = [_function(frame) for frame in stack.split(";")]
            samples = int(count)
            total += samples
            own[frames[-1]] += samples
            packages[_package(frames[-1])] += samples
            for frame in set(frames):
                if "ollamaproxy/" in frame:
                    inclusive[frame] += samples
    if total == 0:
        raise RuntimeError("py-spy recorded no sample")

    lines = [
        f"wrk c={concurrency} {PATH}: {run.throughput:,.0f} req/s, "
        f"proxy CPU {run.cpu_per_request * 1e6:.0f} µs/request "
        f"({run.cpu_user / run.requests * 1e6:.0f} user + {run.cpu_sys / run.requests * 1e6:.0f} sys)",
        f"{total} samples holding the GIL",
        "",
        f"top {top} by self time:",
    ]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "self time by package: " + ", ".join(
        f"{name} {100 * n / total:.0f}%" for name, n in packages.most_common(6))]
    lines += ["", f"top {top} ollamaproxy functions by inclusive time:"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)
