"""Log a repeating failure once, then with a count — never once per retry.

:class:`FailureLog` is the one helper the result consumer, the sweeper and the outbox relay
use: the first failure of a kind is logged at once; while it keeps failing, at most one line
per ``every`` seconds says how many more happened meanwhile; :meth:`FailureLog.recovered`
logs the end of the streak with its total.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("aigen.failures")


@dataclass
class _Streak:
    total: int = 0
    unlogged: int = 0
    last_logged: float = 0.0


class FailureLog:
    def __init__(self, every: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.every = every
        self.clock = clock
        self.logger = logger
        self._streaks: dict[str, _Streak] = {}
        self._lock = threading.Lock()

    def failed(self, what: str, detail: str, *, level: int = logging.WARNING) -> bool:
        """Count one failure of ``what``; log it if it is the first or ``every`` has passed.

        Returns whether a line was written.
        """
        now = self.clock()
        with self._lock:
            streak = self._streaks.setdefault(what, _Streak())
            streak.total += 1
            if streak.total > 1 and now - streak.last_logged < self.every:
                streak.unlogged += 1
                return False
            suppressed, streak.unlogged, streak.last_logged = streak.unlogged, 0, now
            total = streak.total
        more = f" ({suppressed} more since the last report, {total} in a row)" if total > 1 \
            else ""
        self.logger.log(level, "%s failed: %s%s", what, detail, more)
        return True

    def recovered(self, what: str) -> None:
        with self._lock:
            streak = self._streaks.pop(what, None)
        if streak is not None and streak.total > 1:
            self.logger.info("%s works again after %d failures", what, streak.total)

    def count(self, what: str) -> int:
        with self._lock:
            streak = self._streaks.get(what)
            return streak.total if streak else 0


FAILURE_LOG = FailureLog()
