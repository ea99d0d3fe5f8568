"""
Host CPU and memory, sampled once a second so that no request pays for a
C{psutil} call.
"""

from __future__ import annotations

from typing import Callable

import psutil
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


def read_host_load() -> tuple[float, float]:
    """
    Host CPU % (all cores, since the previous call) and memory used %.
    C{interval=None} makes C{cpu_percent} compare with its last call
    instead of sleeping.
    """
    return psutil.cpu_percent(interval=None), psutil.virtual_memory().percent


class HostSampler(Service):
    """
    Keeps the latest host load reading in C{cpu} and C{memory}.

    The sampling function is injected; whatever it raises is logged (once
    per kind of failure) and the loop goes on, since one exception would
    stop a L{LoopingCall} for good.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        sample: Callable[[], tuple[float, float]] = read_host_load,
        interval: float = 1.0,
    ) -> None:
        self.cpu: float | None = None
        self.memory: float | None = None
        self._sample = sample
        self._interval = interval
        self._loop = LoopingCall(self._take_sample)
        self._loop.clock = clock
        self._last_failure: str | None = None

    def startService(self) -> None:
        super().startService()
        if self._sample is read_host_load:
            # cpu_percent(interval=None) compares with its previous call, so
            # its first answer is a meaningless 0.0: make that call now, and
            # sample first one interval later (cells stay empty until then).
            psutil.cpu_percent(interval=None)
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        if self._loop.running:
            self._loop.stop()
        super().stopService()

    def _take_sample(self) -> None:
        try:
            self.cpu, self.memory = self._sample()
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
            if failure != self._last_failure:
                self.log.warn("Host load sample failed: {failure}", failure=failure)
                self._last_failure = failure
        else:
            self._last_failure = None
