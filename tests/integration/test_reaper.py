"""The reaper against reservations that are still committing (PostgreSQL, real threads).

The reaper releases remote holds whose ``pending`` row is older than the grace period. A
reservation whose transaction is still running past that grace period (a slow commit, a slow
backend) must never be released under it: the committing transaction holds the row lock
and the reaper claims pending rows with ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from persistence.external_billing import (
    PENDING_GRACE,
    ExternalBilling,
    HttpBillingClient,
    reap_pending_holds,
)
from persistence.tables import holds
from persistence.uow import SqlUnitOfWork
from saga.ports import HoldRequest
from standins.billing import BillingStandIn

pytestmark = pytest.mark.integration
AT = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
LATE = AT + PENDING_GRACE * 2  # the reaper's clock: the reservation is past its grace period


@pytest.fixture
def billing() -> Iterator[BillingStandIn]:
    with BillingStandIn() as standin:
        standin.open_account("u-1", "free", "10.00")
        yield standin


def hold(hold_id: str) -> HoldRequest:
    return HoldRequest(hold_id, "u-1", "g-1", "samples", Decimal("0.25"), AT)


def db_status(engine: Engine, hold_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(select(holds.c.status)
                            .where(holds.c.hold_id == hold_id)).scalar_one_or_none()


def wait_until(check: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


def test_a_reservation_still_committing_is_not_released_under_it(
        pg_engine: Engine, billing: BillingStandIn) -> None:
    """The hold is reserved remotely and turned ``open`` in a transaction that has not
    committed yet when the reaper runs: the reaper must leave it alone."""
    client = HttpBillingClient(billing.url, timeout=2, attempts=2, backoff=0.01)
    reaped: list[int] = []
    uow = SqlUnitOfWork(pg_engine, functools.partial(ExternalBilling, client=client))
    with uow:
        uow.billing.reserve(hold("h-slow-commit"), quota=None, month="2026-11")
        reaper = threading.Thread(
            target=lambda: reaped.append(reap_pending_holds(pg_engine, client, LATE)))
        reaper.start()
        # Give the reaper every chance to act on the row before our commit lands.
        wait_until(lambda: not reaper.is_alive()
                   or billing.holds["h-slow-commit"]["status"] != "open", timeout=2)
        uow.commit()
    reaper.join(timeout=10)
    assert not reaper.is_alive()
    assert reaped == [0]
    assert billing.holds["h-slow-commit"]["status"] == "open"
    assert db_status(pg_engine, "h-slow-commit") == "open"
    client.close()


class GatedClient(HttpBillingClient):
    """Holds every reservation request (``POST /holds``) until the test opens the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = threading.Event()
        self.gate = threading.Event()

    def call(self, method: str, path: str, json: dict[str, Any] | None = None,
             ok: tuple[int, ...] = (200, 201, 204)) -> httpx.Response:
        if (method, path) == ("POST", "/holds"):
            self.in_flight.set()
            assert self.gate.wait(timeout=10)
        return super().call(method, path, json=json, ok=ok)


def test_a_reservation_request_in_flight_past_the_grace_is_not_reaped(
        pg_engine: Engine, billing: BillingStandIn) -> None:
    """The ``pending`` row is committed, the reservation request is still being served when
    the reaper runs: releasing it now (404, nothing held yet) would leak the hold that the
    request then creates. The reservation's transaction holds the row lock meanwhile."""
    client = GatedClient(billing.url, timeout=2, attempts=2, backoff=0.01)
    errors: list[BaseException] = []

    def reserve_and_commit() -> None:
        try:
            with SqlUnitOfWork(pg_engine, functools.partial(ExternalBilling,
                                                            client=client)) as uow:
                uow.billing.reserve(hold("h-in-flight"), quota=None, month="2026-11")
                uow.commit()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=reserve_and_commit)
    worker.start()
    assert client.in_flight.wait(timeout=5)
    assert db_status(pg_engine, "h-in-flight") == "pending"
    released = reap_pending_holds(pg_engine, client, LATE)
    client.gate.set()
    worker.join(timeout=10)
    assert not worker.is_alive() and errors == []
    assert released == 0
    assert billing.holds["h-in-flight"]["status"] == "open"
    assert db_status(pg_engine, "h-in-flight") == "open"
    client.close()


def test_two_reapers_side_by_side_release_each_stale_hold_once(
        pg_engine: Engine, billing: BillingStandIn) -> None:
    """Stale pending rows (their process died): two reapers at once split them, each is
    released exactly once, and nothing is left pending."""
    client = HttpBillingClient(billing.url, timeout=2, attempts=2, backoff=0.01)
    ids = [f"h-dead-{i}" for i in range(20)]
    for hold_id in ids:
        uow = SqlUnitOfWork(pg_engine, functools.partial(ExternalBilling, client=client))
        with uow:
            uow.billing.reserve(hold(hold_id), quota=None, month="2026-11")
            uow.billing.abandon = lambda: None  # type: ignore[method-assign] # process dies
    counts: list[int] = []
    reapers = [threading.Thread(
        target=lambda: counts.append(reap_pending_holds(pg_engine, client, LATE)))
        for _ in range(2)]
    for reaper in reapers:
        reaper.start()
    for reaper in reapers:
        reaper.join(timeout=20)
    assert sum(counts) == len(ids)
    assert billing.status_counts() == {"released": len(ids)}
    assert [h for h, status in billing.transitions if status == "released"].count(ids[0]) == 1
    assert billing.violations == []
    assert {db_status(pg_engine, h) for h in ids} == {"released"}
    client.close()
