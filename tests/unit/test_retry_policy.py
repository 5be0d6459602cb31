"""The one retry policy, the failure classes and the rate-limited failure log."""

from __future__ import annotations

import logging
import random

import pytest
from sqlalchemy.exc import OperationalError

import persistence.db  # noqa: F401  (registers SQLAlchemy's transient errors)
from saga.errors import BillingRefused, BillingUnavailable, CommitInFlight, UnloadableSaga
from saga.failures import FailureLog
from saga.retry import RetryPolicy, classify


def test_backoff_doubles_up_to_the_cap_without_jitter() -> None:
    policy = RetryPolicy(base=0.5, cap=4, jitter=0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]


def test_jitter_stays_within_its_band() -> None:
    policy = RetryPolicy(base=1, cap=100, jitter=0.5)
    rng = random.Random(7)
    delays = [policy.delay(3, rng) for _ in range(200)]
    assert all(2 <= d <= 4 for d in delays) and len(set(delays)) > 100


def test_the_budget_counts_attempts_and_elapsed_time() -> None:
    policy = RetryPolicy(max_attempts=3, max_elapsed=10)
    assert [policy.allows(n) for n in (1, 3, 4)] == [True, True, False]
    assert policy.allows(2, elapsed=9) and not policy.allows(2, elapsed=11)
    assert not RetryPolicy(max_attempts=0).allows(1)


def test_an_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(jitter=2)


@pytest.mark.parametrize(("exc", "kind"), [
    (OperationalError("SELECT 1", {}, Exception("down")), "transient"),
    (BillingUnavailable("timeout"), "transient"),
    (ConnectionError("broker"), "transient"),
    (CommitInFlight(["h-1"], state="processing_final"), "transient"),  # its result comes
    (BillingRefused("400", status=400), "permanent"),
    (UnloadableSaga("g", "KeyError"), "permanent"),
    (KeyError("bug"), "permanent"),
])
def test_failures_are_classified(exc: Exception, kind: str) -> None:
    assert classify(exc) == kind


def test_a_repeating_failure_is_logged_once_then_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    flog = FailureLog(every=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="aigen.failures"):
        written = [flog.failed("sweep", "db down") for _ in range(100)]
        now[0] = 61
        assert flog.failed("sweep", "db down")
        flog.recovered("sweep")
    assert written[0] and not any(written[1:])
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["sweep failed: db down",
                     "sweep failed: db down (99 more since the last report, 101 in a row)",
                     "sweep works again after 101 failures"]
