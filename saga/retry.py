"""The one retry policy: exponential backoff with jitter, a budget, and failure classes.

Everything that repeats a failed step uses :class:`RetryPolicy` — the result consumer's
redelivery, the sweeper's firing of a deadline, compensation (releasing a hold that billing
could not release), calls to the external billing service, the outbox relay and the RabbitMQ
reconnect loop. It is built once from the settings (``AIGEN_RETRY_*``); a call site that needs
a tighter budget derives one with :meth:`RetryPolicy.limited`.

:func:`classify` decides whether retrying can help: *transient* failures (the database or the
broker unreachable, billing timeouts, 5xx, 429) are retried within the budget; *permanent*
ones (billing refusing a request, a body that cannot be parsed, a saga row that cannot be
loaded, a bug) are never retried — the saga is parked for support instead. Adapters register
their library's transient exception types with :func:`register_transient` (``saga`` itself
imports no I/O library).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Literal

from saga.errors import BillingUnavailable, CommitInFlight, ConcurrencyConflict

Kind = Literal["transient", "permanent"]

# CommitInFlight: the result that sent the commit is on its way back and settles the hold.
_TRANSIENT: list[type[BaseException]] = [BillingUnavailable, CommitInFlight,
                                         ConcurrencyConflict, ConnectionError, TimeoutError]


def register_transient(*types: type[BaseException]) -> None:
    """Mark exception types (e.g. SQLAlchemy's ``OperationalError``) as transient."""
    for t in types:
        if t not in _TRANSIENT:
            _TRANSIENT.append(t)


def classify(exc: BaseException) -> Kind:
    """``transient`` when retrying later may succeed; ``permanent`` otherwise."""
    return "transient" if isinstance(exc, tuple(_TRANSIENT)) else "permanent"


@dataclass(frozen=True)
class RetryPolicy:
    """Delay before retry number ``n`` (1-based) is ``base * 2**(n-1)``, capped at ``cap``,
    scaled by a random factor in ``[1 - jitter, 1]``; retry ``n`` is allowed while
    ``n <= max_attempts`` and (when ``max_elapsed`` is set) the failure is younger than it."""

    base: float = 0.5  # seconds
    cap: float = 30.0
    jitter: float = 0.5  # 0: deterministic
    max_attempts: int = 8
    max_elapsed: float | None = None  # seconds since the first failure; None: no limit

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or not 0 <= self.jitter <= 1 or self.max_attempts < 0:
            raise ValueError("invalid retry policy")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = the first retry)."""
        raw: float = min(self.base * 2.0 ** min(max(attempt - 1, 0), 30), self.cap)
        if self.jitter:
            raw *= 1 - self.jitter * (rng or random).random()
        return raw

    def delay_td(self, attempt: int) -> timedelta:
        return timedelta(seconds=self.delay(attempt))

    def allows(self, attempt: int, elapsed: float | None = None) -> bool:
        """May retry number ``attempt`` happen (``elapsed`` seconds after the first failure)?"""
        if attempt > self.max_attempts:
            return False
        return not (self.max_elapsed is not None and elapsed is not None
                    and elapsed > self.max_elapsed)

    def limited(self, **changes: float | int | None) -> RetryPolicy:
        """The same policy with some fields changed (a tighter budget for one call site)."""
        return replace(self, **changes)  # type: ignore[arg-type]


DEFAULT = RetryPolicy()
