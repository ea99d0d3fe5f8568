"""
Admission to the upstream: at most C{limit} requests in flight, the rest in
a bounded first-in-first-out queue.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred

QUEUE_FULL_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


class QueueFull(Exception):
    """
    The queue already holds as many waiting requests as it may.
    """


class Gate:
    """
    A counting semaphore with a bounded FIFO queue whose waiters can leave.

    L{enter} returns L{None} when a slot is free at once (the common case,
    and the only one when there is no limit), so the fast path creates no
    L{Deferred}.  Otherwise it returns a L{Deferred} that fires when a slot
    is handed over; cancelling it takes the waiter out of the queue.
    """

    def __init__(self, limit: int | None, queue_limit: int) -> None:
        self.limit = limit
        self.queue_limit = queue_limit
        self.in_flight = 0
        self._waiting: deque[Deferred[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def enter(self) -> Deferred[None] | None:
        if self.limit is None or self.in_flight < self.limit:
            self.in_flight += 1
            return None
        if len(self._waiting) >= self.queue_limit:
            raise QueueFull(QUEUE_FULL_MESSAGE)
        waiter: Deferred[None] = Deferred(self._waiting.remove)
        self._waiting.append(waiter)
        return waiter

    def leave(self) -> None:
        """
        Give a slot back; the longest waiter, if any, takes it over.
        """
        if self._waiting:
            self._waiting.popleft().callback(None)
        else:
            self.in_flight -= 1
