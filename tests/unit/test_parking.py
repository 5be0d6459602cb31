"""Sweeper isolation and parking on the in-memory unit of work.

A firing that fails transiently moves the saga's deadline by the retry policy and is retried
until the budget is spent, then parks; a permanent failure parks at once; a release billing
keeps refusing to take parks the saga (kind ``compensation``) once its budget is spent. A
parked saga is never fired again until support retries it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

import persistence.db  # noqa: F401  (registers SQLAlchemy's transient errors)
import saga.handlers
from saga.commands import Cancel, FireDeadlines, Grant, StartGeneration, SupportRetry
from saga.errors import BillingUnavailable
from saga.messagebus import MessageBus
from saga.model import SagaConfig
from saga.retry import RetryPolicy
from tests.unit.fakes import FakeBilling, FakeStore, FakeUnitOfWork

FORMAT = {"name": "instagram_post", "width": 1080, "height": 1080}
T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_bus(store: FakeStore, clock: Clock, **config: Any) -> MessageBus:
    bus = MessageBus(lambda: FakeUnitOfWork(store), SagaConfig(**config), clock=clock,
                     retry=RetryPolicy(base=10, cap=100, jitter=0, max_attempts=2))
    return bus


def started(bus: MessageBus, user: str = "u-1") -> str:
    bus.handle(Grant(user, Decimal("5.00"), "test"))
    return str(bus.handle(StartGeneration(user_id=user, prompt="p", format=FORMAT))["id"])


def notes(store: FakeStore, gid: str) -> list[dict[str, Any]]:
    return [e.detail for _seq, e in store.history[gid] if e.kind == "note"]


def test_a_transient_firing_failure_backs_off_then_parks_and_spares_the_others(
        store: FakeStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = make_bus(store, clock)
    bad, good = started(bus, "u-1"), started(bus, "u-2")
    store.sagas[bad].due_at = T0  # due before the healthy one
    real = saga.handlers.transition

    def flaky(ctx: Any, uow: Any, s: Any, *args: Any, **kw: Any) -> bool:
        if s.id == bad:
            raise OperationalError("UPDATE", {}, Exception("connection reset"))
        return bool(real(ctx, uow, s, *args, **kw))

    monkeypatch.setattr(saga.handlers, "transition", flaky)
    clock.advance(200)  # both deadlines passed
    assert bus.handle(FireDeadlines()) == 2  # the failure did not stop the sweep
    assert store.sagas[good].state == "timed_out"
    assert store.sagas[bad].due_at == clock.now + timedelta(seconds=10)  # backoff 1
    assert bus.handle(FireDeadlines()) == 0  # not claimed again at once
    clock.advance(10)
    assert bus.handle(FireDeadlines()) == 1
    assert store.sagas[bad].due_at == clock.now + timedelta(seconds=20)  # backoff 2
    assert store.sagas[bad].attention is None
    clock.advance(20)
    assert bus.handle(FireDeadlines()) == 1  # third failure: budget (2 retries) spent
    parked = store.sagas[bad]
    assert parked.attention is not None and parked.attention["kind"] == "timer"
    assert parked.attention["reason"].startswith("retry budget exhausted after 3 failures")
    assert parked.state == "processing_samples" and parked.hold is not None
    clock.advance(1000)
    assert bus.handle(FireDeadlines()) == 0  # parked: skipped
    assert notes(store, bad)[-1]["kind"] == "timer"


def test_a_permanent_firing_failure_parks_at_once(
        store: FakeStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = make_bus(store, clock)
    gid = started(bus)

    def buggy(*_a: Any, **_k: Any) -> bool:
        raise KeyError("a bug")

    monkeypatch.setattr(saga.handlers, "transition", buggy)
    clock.advance(200)
    assert bus.handle(FireDeadlines()) == 1
    attention = store.sagas[gid].attention
    assert attention is not None and attention["reason"].startswith("KeyError")
    monkeypatch.undo()
    clock.advance(1000)
    assert bus.handle(FireDeadlines()) == 0
    bus.handle(SupportRetry(gid, "fixed the bug"))
    assert bus.handle(FireDeadlines()) == 1
    assert store.sagas[gid].state == "timed_out"


class UnreachableBilling(FakeBilling):
    may_be_unavailable = True

    def prepare_settle(self, hold_id: str, *, commit: bool) -> None:
        raise BillingUnavailable("billing does not answer")


def test_a_release_billing_never_takes_parks_after_the_compensation_budget(
        store: FakeStore, clock: Clock) -> None:
    bus = make_bus(store, clock, compensation_max_tries=3)
    gid = started(bus)

    class Uow(FakeUnitOfWork):
        def __enter__(self) -> Uow:
            super().__enter__()
            self.billing = UnreachableBilling(self.store)
            return self

    bus.ctx.uow_factory = lambda: Uow(store)
    bus.handle(Cancel(gid))
    assert store.sagas[gid].state == "compensating"
    for _ in range(10):
        clock.advance(3600)
        bus.handle(FireDeadlines())
    parked = store.sagas[gid]
    assert parked.state == "compensating" and parked.attention is not None
    assert parked.attention["kind"] == "compensation"
    assert parked.compensation is not None and parked.compensation.tries == 4
