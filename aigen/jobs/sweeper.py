"""The deadline sweeper: fires passed deadlines, reaps stuck external holds, trims tables.

One per process, safe side by side: claiming a due saga uses ``SKIP LOCKED``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from persistence.housekeeping import PURGE_BATCH, Purge
from saga.commands import FireDeadlines
from saga.effects import utcnow
from saga.failures import FAILURE_LOG
from saga.messagebus import MessageBus
from saga.retry import RetryPolicy

log = logging.getLogger(__name__)

REAP_EVERY_S = 60.0
PURGE_EVERY_S = 3600.0


class Sweeper:
    """Fires passed deadlines; one per process, safe side by side (``SKIP LOCKED``)."""

    def __init__(self, bus: MessageBus, engine: Engine, interval: float,
                 reap: Callable[[datetime], int] | None = None,
                 retry: RetryPolicy | None = None, reap_every_s: float = REAP_EVERY_S,
                 purge_batch: int = PURGE_BATCH) -> None:
        self.bus = bus
        # Backoff while a whole sweep fails (database down); one saga's failing firing is
        # handled inside the sweep (its deadline moves, or it is parked) and never ends it.
        self.retry = retry or bus.ctx.retry
        self.engine = engine
        self.interval = interval
        self.reap = reap  # releases external holds whose reservation never committed
        self.reap_every_s = reap_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deadline-sweeper", daemon=True)
        self._last_purge = -PURGE_EVERY_S
        self.purge_batch = purge_batch
        self._purge: Purge | None = None  # the round being trimmed, a step per sweep
        self._last_reap = -reap_every_s

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                fired: int = self.bus.handle(FireDeadlines())
                self._housekeeping()
            except Exception as exc:
                failures += 1
                FAILURE_LOG.failed("deadline sweep", f"{type(exc).__name__}: {exc}")
                self._stop.wait(max(self.interval, self.retry.delay(failures)))
                continue
            if failures:
                failures = 0
                FAILURE_LOG.recovered("deadline sweep")
            if fired == 0:
                self._stop.wait(self.interval)

    def _housekeeping(self) -> None:
        if self.reap is not None and time.monotonic() - self._last_reap >= self.reap_every_s:
            self._last_reap = time.monotonic()
            released = self.reap(utcnow())
            if released:
                log.warning("released %d external holds left pending by a failed request",
                            released)
        if self._purge is None:
            if time.monotonic() - self._last_purge < PURGE_EVERY_S:
                return
            self._last_purge = time.monotonic()
            self._purge = Purge(utcnow(), self.purge_batch)
        # One bounded step per sweep, so a backlog never holds up the deadlines.
        self._purge.step(self.engine)
        if self._purge.finished:
            if any(self._purge.deleted.values()):
                log.info("housekeeping deleted %s", self._purge.deleted)
            self._purge = None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
