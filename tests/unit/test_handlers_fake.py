"""The command handlers on the in-memory :class:`FakeUnitOfWork` (no database at all).

The fastest tier: each test drives the message bus and looks at what the unit of work was
asked to persist — outbox messages, history, holds — and that nothing is persisted without
``commit()``. The SQLite tier (test_handlers.py) and the PostgreSQL tier run the same
handlers on the real unit of work.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from saga.commands import (
    ApplyResult,
    Cancel,
    FireDeadlines,
    Grant,
    SelectSample,
    SetPlan,
    StartGeneration,
    StoreResponse,
)
from saga.errors import InsufficientCredits, InvalidRequest, InvalidState, NotFound
from saga.messagebus import MessageBus
from saga.messages import GENERATION_EXCHANGE, NOTIFICATION_EXCHANGE
from saga.model import SagaConfig
from saga.ports import AlreadyAnswered, IdempotencyRecord
from saga.queries import Queries
from tests.unit.fakes import FakeStore, FakeUnitOfWork

FORMAT = {"name": "instagram_post", "width": 1080, "height": 1080}
SAMPLES = [{"sample_id": f"s{i}", "url": f"s3://b/s{i}.png", "width": 512, "height": 512}
           for i in range(1, 5)]
T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bus(store: FakeStore, clock: Clock) -> MessageBus:
    return MessageBus(lambda: FakeUnitOfWork(store), SagaConfig(), clock=clock)


@pytest.fixture
def queries(store: FakeStore) -> Queries:
    return Queries(lambda: FakeUnitOfWork(store))


def start(bus: MessageBus, idem: IdempotencyRecord | None = None) -> dict[str, object]:
    view: dict[str, object] = bus.handle(
        StartGeneration(user_id="u-1", prompt="spring sale", format=FORMAT), idem)
    return view


def jobs(store: FakeStore) -> list[dict[str, object]]:
    return [m.body for m in store.outbox if m.exchange == GENERATION_EXCHANGE]


def test_start_holds_the_sample_round_and_dispatches_one_job(bus: MessageBus,
                                                             store: FakeStore) -> None:
    bus.handle(Grant("u-1", Decimal("1.00"), "seed"))
    view = start(bus)
    assert view["state"] == "processing_samples"
    assert view["credits"] == {"held": "0.25", "charged": "0.00", "released": "0.00"}
    (job,) = jobs(store)
    assert job["generation_id"] == view["id"] and job["stage"] == "samples"
    assert [(h.stage, status) for h, status, _ in store.holds.values()] == [("samples", "open")]
    assert store.accounts["u-1"].held == Decimal("0.25")


def test_a_refused_start_persists_nothing(bus: MessageBus, store: FakeStore) -> None:
    with pytest.raises(InsufficientCredits):
        start(bus)
    assert store.sagas == {} and store.outbox == [] and store.holds == {}


def test_idempotent_start_replays_and_changes_nothing(bus: MessageBus,
                                                      store: FakeStore) -> None:
    bus.handle(Grant("u-1", Decimal("1.00"), "seed"))
    idem = IdempotencyRecord("service POST /api/v1/generations", "k-1", "h")
    first = start(bus, idem)
    with pytest.raises(AlreadyAnswered) as answered:
        start(bus, idem)
    assert answered.value.stored == ("h", 202, first)
    assert len(store.sagas) == 1 and len(jobs(store)) == 1


def test_results_are_applied_once_then_refused_as_duplicates(bus: MessageBus,
                                                            store: FakeStore) -> None:
    bus.handle(Grant("u-1", Decimal("1.00"), "seed"))
    gen = start(bus)
    job_id = str(jobs(store)[0]["job_id"])
    ready = ApplyResult("AIGenerationSamplesReady", str(gen["id"]), job_id, samples=SAMPLES)
    assert bus.handle(ready) == "applied"
    assert bus.handle(ready) == "duplicate"
    assert bus.handle(ApplyResult("AIGenerationSamplesReady", "nope", job_id)) == \
        "unknown_generation"
    saga = store.sagas[str(gen["id"])]
    assert saga.state == "awaiting_selection" and saga.charged == Decimal("0.25")
    assert "samples_ready" in [m.body.get("type") for m in store.outbox
                               if m.exchange == NOTIFICATION_EXCHANGE]


def test_a_refused_steer_is_recorded_in_the_history(bus: MessageBus, store: FakeStore,
                                                    queries: Queries) -> None:
    bus.handle(Grant("u-1", Decimal("1.00"), "seed"))
    gen = start(bus)
    with pytest.raises(InvalidState):
        bus.handle(SelectSample(str(gen["id"]), "s1"))
    rejected = [e for e in queries.history(str(gen["id"]))["events"] if e["kind"] == "rejected"]
    assert [e["detail"]["reason"] for e in rejected] == ["invalid_state"]
    assert store.sagas[str(gen["id"])].state == "processing_samples"
    with pytest.raises(NotFound):
        bus.handle(Cancel("ghost"))


def test_deadlines_fire_once_each(bus: MessageBus, store: FakeStore, clock: Clock) -> None:
    bus.handle(Grant("u-1", Decimal("1.00"), "seed"))
    gen = start(bus)
    assert bus.handle(FireDeadlines()) == 0
    clock.now += timedelta(seconds=121)
    assert bus.handle(FireDeadlines()) == 1
    assert bus.handle(FireDeadlines()) == 0
    saga = store.sagas[str(gen["id"])]
    assert saga.state == "timed_out" and saga.released == Decimal("0.25")
    assert store.accounts["u-1"].held == Decimal("0.00")


def test_account_commands_validate_before_any_unit_of_work(bus: MessageBus,
                                                           store: FakeStore) -> None:
    with pytest.raises(InvalidRequest):
        bus.handle(SetPlan("u-1", "platinum"))
    with pytest.raises(InvalidRequest):
        bus.handle(Grant("u-1", Decimal("0.00"), "nothing"))
    assert store.commits == 0
    idem = IdempotencyRecord("service PUT /x", "k", "h")
    bus.handle(StoreResponse(idem, 409, {"code": "invalid_state"}))
    assert store.responses[(idem.scope, idem.key)] == ("h", 409, {"code": "invalid_state"})


def test_an_unknown_command_is_a_type_error(bus: MessageBus) -> None:
    with pytest.raises(TypeError):
        bus.handle(object())


def test_a_deadline_never_releases_a_hold_whose_commit_was_sent(
        bus: MessageBus, store: FakeStore, clock: Clock) -> None:
    """The commit went to billing, our transaction was lost: the deadline waits for the
    redelivered result (re-armed, noted), never releasing; a cancel is refused meanwhile."""
    bus.handle(Grant("u-1", Decimal("1.00"), "seed"))
    gen = start(bus)
    gid = str(gen["id"])
    hold = store.sagas[gid].hold
    assert hold is not None
    store.commits_sent.add(hold.hold_id)
    clock.now += timedelta(seconds=121)
    assert bus.handle(FireDeadlines()) == 1
    saga = store.sagas[gid]
    assert saga.state == "processing_samples" and saga.hold == hold
    assert saga.due_at is not None and saga.due_at > clock.now and saga.attention is None
    assert store.holds[hold.hold_id][1] == "open"
    assert store.history[gid][-1][1].detail["deadline_deferred"] == "timer"
    with pytest.raises(InvalidState):
        bus.handle(Cancel(gid))
    assert store.sagas[gid].state == "processing_samples"
    for _ in range(30):  # the result never comes back: parked after commit_wait, not released
        clock.now += timedelta(seconds=60)
        bus.handle(FireDeadlines())
    saga = store.sagas[gid]
    assert saga.attention is not None and saga.attention["kind"] == "timer"
    assert "was sent to billing" in saga.attention["reason"]
    assert saga.state == "processing_samples" and store.holds[hold.hold_id][1] == "open"
