"""PostgreSQL's read-ahead and deferred ledger moves keep every guarantee of the ledger.

On PostgreSQL a command names what it reads first (``Prefetch``): its stored response, its
saga locked, the account it reserves on locked and the month's sample rounds come back in
one statement, and a reservation decided on that locked row is written with the command's
one write statement. A result batch locks its sagas' open holds with the sagas, so their
settling goes into the batch's write statement too.

These tests pin what must not change: a refusal writes nothing, concurrent reservations
never exceed a balance or the free plan's quota (also when the count was read before a lock
that had to wait), idempotent replays still replay, and a saga that moved on while a batch
waited for it is settled through the statement-per-move path.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, func, insert, select, text, update

from persistence.ledger import SqlLedger
from persistence.tables import accounts, generations, holds, idempotency_keys, journal, outbox
from persistence.uow import SqlUnitOfWork
from saga.commands import (
    ApplyResult,
    ApplyResults,
    Grant,
    SelectSample,
    SetPlan,
    StartGeneration,
)
from saga.errors import DomainError, InsufficientCredits, QuotaExceeded
from saga.model import new_id
from saga.ports import AlreadyAnswered, IdempotencyRecord
from tests.conftest import World
from tests.unit.handlers.helpers import (
    FORMAT,
    SAMPLES_READY,
    fund,
    one_job,
    sample_list,
    start,
    to_awaiting,
)

pytestmark = pytest.mark.integration


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The statements the engine sends while the block runs."""
    seen: list[str] = []

    def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)


def table_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in (generations, holds, journal, outbox, idempotency_keys)}


def account_cents(engine: Engine, user: str = "u-1") -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(select(accounts.c.balance_cents, accounts.c.held_cents)
                           .where(accounts.c.user_id == user)).one()
    return int(row.balance_cents), int(row.held_cents)


def month(world: World) -> str:
    return f"{world.clock.now.year:04d}-{world.clock.now.month:02d}"


def in_thread(call: Callable[[], Any]) -> Future[Any]:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def wait_until_waiting_for_a_lock(engine: Engine, timeout: float = 10.0) -> None:
    """Until some backend of this database waits for a row lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            waiting = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")).scalar_one()
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError("nobody waited for the lock")


def reserve_by_hand(conn: Connection, world: World, gen_id: str, cents: int,
                    stage: str = "samples") -> None:
    """What another transaction's reservation writes: the account row and an open hold."""
    conn.execute(update(accounts).where(accounts.c.user_id == "u-1")
                 .values(held_cents=accounts.c.held_cents + cents))
    conn.execute(insert(holds).values(
        hold_id=new_id(), user_id="u-1", generation_id=gen_id, stage=stage,
        amount_cents=cents, status="open", month=month(world), created_at=world.clock.now))


# ------------------------------------------------------------------ round trips
def test_start_and_selection_are_one_read_and_one_write(pg_world: World) -> None:
    fund(pg_world, plan="free")
    with statements(pg_world.engine) as sent:
        gen = start(pg_world)
    assert len(sent) == 2, sent  # stored response + account + rounds; then every write
    job = one_job(pg_world)
    with statements(pg_world.engine) as sent:
        outcomes = pg_world.bus.handle(ApplyResults((ApplyResult(
            SAMPLES_READY, gen["id"], job["job_id"], samples=sample_list()),)))
    assert outcomes == ["applied"]
    assert len(sent) == 3, sent  # sagas + open holds; inbox; saga, history, outbox, ledger
    with statements(pg_world.engine) as sent:
        pg_world.bus.handle(SelectSample(gen["id"], "s1"))
    assert len(sent) == 2, sent  # saga + account; then every write
    assert account_cents(pg_world.engine) == (975, 100)  # samples charged, final held
    with pg_world.engine.connect() as conn:
        kinds = [r.kind for r in conn.execute(select(journal).order_by(journal.c.id))]
    assert kinds == ["grant", "reserve", "commit", "reserve"]


# ------------------------------------------------------------------ refusals
def test_a_start_refused_for_credits_writes_nothing(pg_world: World) -> None:
    fund(pg_world, amount="0.10")
    before, cents = table_counts(pg_world.engine), account_cents(pg_world.engine)
    with pytest.raises(InsufficientCredits) as refused:
        start(pg_world)
    assert refused.value.extra == {"required": "0.25", "available": "0.10"}
    assert table_counts(pg_world.engine) == before
    assert account_cents(pg_world.engine) == cents
    with pytest.raises(InsufficientCredits) as unknown:
        start(pg_world, user="nobody")
    assert unknown.value.extra["available"] == "0.00"
    assert table_counts(pg_world.engine) == before


def test_a_start_beyond_the_quota_writes_nothing(pg_world: World) -> None:
    fund(pg_world, plan="free", amount="50.00")
    with pg_world.engine.begin() as conn:  # 100 rounds this month: the free plan's quota
        for _ in range(100):
            conn.execute(insert(holds).values(
                hold_id=new_id(), user_id="u-1", generation_id=new_id(), stage="samples",
                amount_cents=0, status="committed", month=month(pg_world),
                created_at=pg_world.clock.now))
    before, cents = table_counts(pg_world.engine), account_cents(pg_world.engine)
    with pytest.raises(QuotaExceeded):
        start(pg_world)
    assert table_counts(pg_world.engine) == before
    assert account_cents(pg_world.engine) == cents


def test_a_selection_refused_for_credits_writes_nothing_but_its_refusal(
        pg_world: World) -> None:
    fund(pg_world, amount="0.25")  # the samples, not the final
    gen, _ = to_awaiting(pg_world)
    before, cents = table_counts(pg_world.engine), account_cents(pg_world.engine)
    with pytest.raises(InsufficientCredits):
        pg_world.bus.handle(SelectSample(gen["id"], "s1"))
    assert account_cents(pg_world.engine) == cents
    after = table_counts(pg_world.engine)
    assert after == before  # the refusal's history row is not counted here
    assert pg_world.queries.get(gen["id"])["state"] == "awaiting_selection"


# ------------------------------------------------------------------ concurrency
def test_a_count_read_before_a_waited_for_lock_is_not_trusted(pg_world: World) -> None:
    """The start reads the rounds in the snapshot its statement began with; another
    reservation commits the 100th round while the start waits for the account's lock: the
    start must count that round and be refused."""
    fund(pg_world, plan="free", amount="50.00")
    with pg_world.engine.begin() as conn:
        for _ in range(99):
            conn.execute(insert(holds).values(
                hold_id=new_id(), user_id="u-1", generation_id=new_id(), stage="samples",
                amount_cents=0, status="committed", month=month(pg_world),
                created_at=pg_world.clock.now))
    with pg_world.engine.connect() as other:
        tx = other.begin()
        reserve_by_hand(other, pg_world, new_id(), 25)
        started = in_thread(lambda: start(pg_world))
        wait_until_waiting_for_a_lock(pg_world.engine)
        tx.commit()
    with pytest.raises(QuotaExceeded):
        started.result(timeout=10)
    assert account_cents(pg_world.engine) == (5000, 25)


def test_funds_are_decided_on_the_locked_row_not_the_snapshot(pg_world: World) -> None:
    fund(pg_world, amount="0.30")
    with pg_world.engine.connect() as other:
        tx = other.begin()
        reserve_by_hand(other, pg_world, new_id(), 25)  # leaves 0.05 available
        started = in_thread(lambda: start(pg_world))
        wait_until_waiting_for_a_lock(pg_world.engine)
        tx.commit()
    with pytest.raises(InsufficientCredits) as refused:
        started.result(timeout=10)
    assert refused.value.extra["available"] == "0.05"
    assert account_cents(pg_world.engine) == (30, 25)


def test_concurrent_selections_on_one_account_never_exceed_its_balance(
        pg_world: World) -> None:
    fund(pg_world, amount="1.00")
    sagas = [to_awaiting(pg_world)[0]["id"] for _ in range(4)]  # all 1.00 charged for samples
    pg_world.bus.handle(Grant("u-1", Decimal("2.50"), "two finals and a half"))
    barrier = threading.Barrier(len(sagas))

    def select(gen_id: str) -> str:
        barrier.wait(timeout=10)
        try:
            pg_world.bus.handle(SelectSample(gen_id, "s1"))
        except DomainError as exc:
            return exc.code
        return "ok"

    with ThreadPoolExecutor(max_workers=len(sagas)) as pool:
        outcomes = Counter(pool.map(select, sagas))
    assert outcomes == {"ok": 2, "insufficient_credits": 2}
    balance, held = account_cents(pg_world.engine)
    assert (balance, held) == (250, 200) and balance - held >= 0
    with pg_world.engine.connect() as conn:
        open_finals = conn.execute(select_open_finals()).scalar_one()
    assert open_finals == 2


def select_open_finals() -> Any:
    return select(func.count()).select_from(holds).where(holds.c.stage == "final",
                                                         holds.c.status == "open")


def test_concurrent_starts_on_one_account_never_exceed_its_balance(pg_world: World) -> None:
    fund(pg_world, amount="1.00")  # four rounds of samples
    barrier = threading.Barrier(8)

    def one(_: int) -> str:
        barrier.wait(timeout=10)
        try:
            start(pg_world)
        except DomainError as exc:
            return exc.code
        return "ok"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = Counter(pool.map(one, range(8)))
    assert outcomes == {"ok": 4, "insufficient_credits": 4}
    assert account_cents(pg_world.engine) == (100, 100)


# ------------------------------------------------------------------ idempotency
def test_an_idempotent_replay_still_replays_and_changes_nothing(pg_world: World) -> None:
    fund(pg_world)
    record = IdempotencyRecord("service POST /api/v1/generations", "k-1", "h" * 64)
    first = pg_world.bus.handle(start_cmd(), record)
    before, cents = table_counts(pg_world.engine), account_cents(pg_world.engine)
    with pytest.raises(AlreadyAnswered) as replay:
        pg_world.bus.handle(start_cmd(), record)
    assert replay.value.stored == ("h" * 64, 202, first)
    assert table_counts(pg_world.engine) == before
    assert account_cents(pg_world.engine) == cents


def start_cmd() -> StartGeneration:
    return StartGeneration(user_id="u-1", prompt="spring sale banner", format=FORMAT)


# ------------------------------------------------------------------ result batches
def test_a_batch_trusts_only_the_holds_of_sagas_that_did_not_move_meanwhile(
        pg_world: World) -> None:
    fund(pg_world)
    moved, still = start(pg_world)["id"], start(pg_world)["id"]
    with SqlUnitOfWork(pg_world.engine) as uow:  # nobody else on them: both trusted
        uow.generations.get_many([moved, still], for_update=True)
        assert isinstance(uow.billing, SqlLedger)
        assert sorted(gid for _, _, gid in uow.billing.open_holds.values()) == sorted(
            [moved, still])
    with pg_world.engine.connect() as other:
        tx = other.begin()
        other.execute(update(generations).where(generations.c.id == moved)
                      .values(updated_at=generations.c.updated_at))  # a new row version
        with SqlUnitOfWork(pg_world.engine) as uow:
            ledger = uow.billing
            assert isinstance(ledger, SqlLedger)

            def load() -> set[str]:
                uow.generations.get_many([moved, still], for_update=True)
                return {gid for _, _, gid in ledger.open_holds.values()}

            loaded = in_thread(load)
            wait_until_waiting_for_a_lock(pg_world.engine)
            tx.commit()
            assert loaded.result(timeout=10) == {still}


def test_a_batch_settles_held_and_moved_sagas_alike(pg_world: World) -> None:
    fund(pg_world)
    moved_gen, still_gen = start(pg_world), start(pg_world)
    jobs = {j["generation_id"]: j["job_id"] for j in pg_world.jobs()}
    batch = ApplyResults(tuple(ApplyResult(SAMPLES_READY, g["id"], jobs[g["id"]],
                                           samples=sample_list())
                               for g in (moved_gen, still_gen)))
    with pg_world.engine.connect() as other:
        tx = other.begin()
        other.execute(update(generations).where(generations.c.id == moved_gen["id"])
                      .values(updated_at=generations.c.updated_at))
        applied = in_thread(lambda: pg_world.bus.handle(batch))
        wait_until_waiting_for_a_lock(pg_world.engine)
        tx.commit()
    assert applied.result(timeout=10) == ["applied", "applied"]
    assert account_cents(pg_world.engine) == (950, 0)
    with pg_world.engine.connect() as conn:
        statuses = sorted(r.status for r in conn.execute(select(holds)))
        kinds = Counter(r.kind for r in conn.execute(select(journal)))
    assert statuses == ["committed", "committed"]
    assert kinds == {"grant": 1, "reserve": 2, "commit": 2}


def test_a_hold_settled_outside_the_saga_is_skipped_in_a_batch(pg_world: World) -> None:
    fund(pg_world)
    gen = start(pg_world)
    job = one_job(pg_world)
    with pg_world.engine.begin() as conn:  # support released it by hand meanwhile
        conn.execute(update(holds).values(status="released"))
        conn.execute(update(accounts).values(held_cents=0))
    assert pg_world.bus.handle(ApplyResults((ApplyResult(
        SAMPLES_READY, gen["id"], job["job_id"], samples=sample_list()),))) == ["applied"]
    assert account_cents(pg_world.engine) == (1000, 0)  # nothing charged
    view = pg_world.queries.get(gen["id"])
    assert view["credits"]["charged"] == "0.00"
    notes = [e["detail"] for e in pg_world.queries.history(gen["id"])["events"]
             if e["kind"] == "note"]
    assert {"credit_skipped": "commit", "reason": "hold_not_open"}.items() <= notes[-1].items()


def test_a_plan_change_in_the_same_transaction_is_seen(pg_world: World) -> None:
    pg_world.bus.handle(SetPlan("u-1", "pro"))
    fund(pg_world)
    gen = start(pg_world)  # pro pays no samples: nothing held
    assert pg_world.queries.get(gen["id"])["credits"]["held"] == "0.00"
    assert account_cents(pg_world.engine) == (1000, 0)
