"""Work that must happen later, without a worker thread waiting for it.

:class:`Later` runs jobs after a delay on one thread of its own (a heap of due times, not a
thread per job). The result consumer uses it for a transient failure's retry: the delivery
stays unacked while its backoff runs, and the job republishes it and only then settles it
(:class:`~messaging.broker.Disposition` ``DEFERRED``). The worker that failed it goes straight
on to the next result.

At most ``limit`` jobs wait (or run) at once. Each waiting retry holds a delivery unacked,
that is, one of the channel's prefetch slots; the composition root sets the limit to half the
prefetch, so the other half always carries healthy results. A job scheduled beyond the limit
waits in :meth:`Later.call_later` until the earliest one has run: back-pressure on the caller,
only when that many results wait at once (billing down for all), never dropping or hurrying a
retry. :meth:`Later.stop` drops the jobs still waiting, unrun: their deliveries stay unacked,
and the broker redelivers them (nothing is lost; the retry count in the header is the one
they came with).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Later:
    def __init__(self, name: str, *, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.name = name
        self.limit = limit
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._running = 0
        self._stopped = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, job: Callable[[], None]) -> bool:
        """Run ``job`` after ``delay`` seconds, on this scheduler's thread. Waits while
        ``limit`` jobs are pending; ``False`` (job not taken) once stopped."""
        with self._cond:
            while not self._stopped and len(self._heap) + self._running >= self.limit:
                self._cond.wait()
            if self._stopped:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay), next(self._seq),
                                        job))
            self._cond.notify_all()
            return True

    def pending(self) -> int:
        """Jobs waiting for their time or running now."""
        with self._cond:
            return len(self._heap) + self._running

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is pending (tests); ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self, timeout: float = 5.0) -> int:
        """Drop the jobs still waiting (unrun) and end the thread; how many were dropped.
        A job already running finishes first (up to ``timeout``)."""
        with self._cond:
            self._stopped = True
            dropped = len(self._heap)
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if dropped:
            log.info("%s: %d deferred jobs left unrun at stop", self.name, dropped)
        return dropped

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._stopped:
                    return
                _, _, job = heapq.heappop(self._heap)
                self._running += 1
            try:
                job()
            except Exception:
                log.exception("%s: a deferred job failed", self.name)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()
