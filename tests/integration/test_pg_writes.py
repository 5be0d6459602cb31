"""PostgreSQL's one-round-trip writes keep every guarantee of the portable path.

On PostgreSQL a command's saga write, history rows, outbox rows and stored response go in
one data-modifying CTE chain at the flush, and each ledger move is one statement; SQLite
keeps the statement-per-row path. These tests run the same commands on both and compare
the rows, and check that a failed version check, a taken idempotency key, a refused
reservation and an exceeded quota leave nothing behind on PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from persistence.ledger import SqlLedger
from persistence.tables import accounts, generation_events, generations, holds, journal, outbox
from persistence.uow import SqlUnitOfWork
from saga import intents as it
from saga.commands import Grant, SetPlan
from saga.errors import ConcurrencyConflict, InsufficientCredits, QuotaExceeded
from saga.messages import OutboundMessage
from saga.model import Generation, new_id
from saga.ports import HoldRequest, IdempotencyRace, IdempotencyRecord
from tests.conftest import World
from tests.unit.handlers.helpers import full_run

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def rows(engine: Engine) -> dict[str, Any]:
    """What a run wrote, without ids and timestamps that differ between two runs."""
    with engine.connect() as conn:
        return {
            "generations": [(r.state, r.version, r.body["held"], r.body["charged"],
                             r.body["history_seq"])
                            for r in conn.execute(select(generations))],
            "events": [(r.seq, r.kind, r.trigger, r.from_state, r.to_state, r.actor,
                        sorted(r.detail))
                       for r in conn.execute(select(generation_events)
                                             .order_by(generation_events.c.seq))],
            "outbox": [(r.exchange, r.type) for r in conn.execute(
                select(outbox).order_by(outbox.c.id))],
            "holds": sorted((r.stage, r.amount_cents, r.status)
                            for r in conn.execute(select(holds))),
            "journal": [(r.kind, r.balance_delta_cents, r.held_delta_cents, r.reason)
                        for r in conn.execute(select(journal).order_by(journal.c.id))],
            "accounts": [(r.user_id, r.balance_cents, r.held_cents)
                         for r in conn.execute(select(accounts))],
        }


def test_a_full_run_writes_the_same_rows_on_both_databases(pg_world: World,
                                                           world: World) -> None:
    full_run(pg_world)
    full_run(world)
    on_pg, on_sqlite = rows(pg_world.engine), rows(world.engine)
    assert on_pg == on_sqlite
    assert len(on_pg["events"]) > 10 and len(on_pg["journal"]) == 5  # grant + 4 moves
    (balance, held), = [(b, h) for _, b, h in on_pg["accounts"]]
    assert held == 0 and balance == sum(j[1] for j in on_pg["journal"])


AWKWARD = ("it's \"quoted\", back\\slashed, 100% %s %(x)s, line\nbreak, tab\t, "
           "\u00e9\u4e2d\U0001f600")
SHORT = "'\"\\%s\u00e9\U0001f600"  # fits a varchar(32) column


def written(engine: Engine) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        events = [(r.generation_id, r.seq, r.at, r.kind, r.trigger, r.from_state, r.to_state,
                   r.actor, r.detail, r.trace_id)
                  for r in conn.execute(select(generation_events)
                                        .order_by(generation_events.c.seq))]
        messages = [(r.exchange, r.routing_key, r.message_id, r.correlation_id, r.type,
                     r.body, r.created_at, r.attempts, r.sent_at, r.traceparent)
                    for r in conn.execute(select(outbox).order_by(outbox.c.id))]
    return events, messages


def test_history_and_outbox_rows_come_back_exactly_as_written(
        pg_engine: Engine, sqlite_engine: Engine) -> None:
    """The one-statement write on PostgreSQL: every history and outbox value (quotes,
    backslashes, percent signs, non-ASCII, NULLs, timestamps with and without microseconds
    or in another zone, integers beyond 64 bits) reads back as on SQLite, and outbox ids
    follow the order of the adds (the relay publishes in id order)."""
    plus_two = timezone(timedelta(hours=2))
    times = [NOW, NOW.replace(microsecond=123456), datetime(2026, 3, 1, 14, 0, 0, 1, plus_two)]
    for engine in (pg_engine, sqlite_engine):
        with SqlUnitOfWork(engine) as uow:
            gid = "g-exact"
            for seq, at in enumerate(times, 1):
                uow.history.append(gid, seq, at, it.HistoryEntry(
                    kind="note", actor="support", trigger=SHORT if seq == 1 else None,
                    from_state=None, to_state="queued" if seq == 2 else None,
                    detail={"text": AWKWARD, "big": 2**70, "nested": [{"n": None}, 1.5]},
                    trace_id="0af7651916cd43dd8448eb211c80319c" if seq == 3 else None))
            for n, at in enumerate(times):
                uow.outbox.add(OutboundMessage(
                    exchange="x", routing_key=f"rk.{n}", message_id=f"m-{n}",
                    correlation_id=gid, type="t", body={"text": AWKWARD, "n": n},
                    traceparent=None if n else "00-0af7651916cd43dd8448eb211c80319c-"
                                                "b7ad6b7169203331-01"), at)
            uow.commit()
    on_pg, on_sqlite = written(pg_engine), written(sqlite_engine)
    assert on_pg == on_sqlite
    events, messages = on_pg
    assert [e[2] for e in events] == times  # the same instants
    assert events[0][4] == SHORT
    assert events[0][8]["text"] == AWKWARD and events[0][8]["big"] == 2**70
    assert [m[2] for m in messages] == ["m-0", "m-1", "m-2"]
    assert json.loads(messages[0][5]) == {"text": AWKWARD, "n": 0}


def saga(user: str = "u-1") -> Generation:
    return Generation(id=new_id(), user_id=user, prompt="p", format={"name": "x"},
                      created_at=NOW, updated_at=NOW)


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_reads_in_the_same_transaction_see_the_deferred_writes(pg_engine: Engine) -> None:
    s = saga()
    with SqlUnitOfWork(pg_engine) as uow:
        uow.generations.add(s)
        uow.history.append(s.id, 1, NOW, it.HistoryEntry(kind="note", actor="system"))
        s.state = "dispatching"
        uow.generations.save(s)
        read = uow.generations.get(s.id)
        assert read is not None and read.state == "dispatching" and read.version == 1
        assert [e["seq"] for e in uow.history.events(s.id)] == [1]
        uow.commit()
    assert count(pg_engine, generations) == 1


def test_a_stale_version_fails_the_commit_and_writes_nothing(pg_engine: Engine) -> None:
    s = saga()
    with SqlUnitOfWork(pg_engine) as uow:
        uow.generations.add(s)
        uow.commit()
    events, messages = count(pg_engine, generation_events), count(pg_engine, outbox)
    with SqlUnitOfWork(pg_engine) as uow:
        stale = uow.generations.get(s.id)
        assert stale is not None
        stale.version = 7  # another writer moved it on meanwhile
        uow.generations.save(stale)
        uow.history.append(s.id, 1, NOW, it.HistoryEntry(kind="note", actor="system"))
        with pytest.raises(ConcurrencyConflict):
            uow.commit()
    assert count(pg_engine, generation_events) == events
    assert count(pg_engine, outbox) == messages
    with SqlUnitOfWork(pg_engine) as uow:
        current = uow.generations.get(s.id)
        assert current is not None and current.version == 0


def test_a_taken_idempotency_key_fails_the_commit_and_writes_nothing(
        pg_engine: Engine) -> None:
    record = IdempotencyRecord("service POST /x", "k-1", "h" * 64)
    with SqlUnitOfWork(pg_engine) as uow:
        uow.idempotency.put(record, 202, {"first": True}, NOW)
        uow.commit()
    with SqlUnitOfWork(pg_engine) as uow:
        uow.generations.add(saga())
        uow.idempotency.put(record, 202, {"first": False}, NOW)
        with pytest.raises(IdempotencyRace):
            uow.commit()
    assert count(pg_engine, generations) == 0
    with SqlUnitOfWork(pg_engine) as uow:
        assert uow.idempotency.get(record) == ("h" * 64, 202, {"first": True})


def hold(user: str, amount: str, stage: str = "samples") -> HoldRequest:
    return HoldRequest(new_id(), user, new_id(), stage, Decimal(amount), NOW)


def ledger_rows(engine: Engine) -> tuple[int, int, list[Any]]:
    with engine.connect() as conn:
        return (count(engine, holds), count(engine, journal),
                [tuple(r) for r in conn.execute(
                    select(accounts.c.balance_cents, accounts.c.held_cents))])


def test_a_refused_reservation_writes_nothing(pg_world: World) -> None:
    pg_world.bus.handle(Grant("u-1", Decimal("0.10"), "test"))
    before = ledger_rows(pg_world.engine)
    with SqlUnitOfWork(pg_world.engine) as uow:
        with pytest.raises(InsufficientCredits) as refused:
            uow.billing.reserve(hold("u-1", "0.25"), quota=None, month="2026-03")
        assert refused.value.extra == {"required": "0.25", "available": "0.10"}
        with pytest.raises(InsufficientCredits) as unknown:
            uow.billing.reserve(hold("nobody", "0.25"), quota=None, month="2026-03")
        assert unknown.value.extra["available"] == "0.00"
        uow.commit()
    assert ledger_rows(pg_world.engine) == before


def test_a_reservation_beyond_the_quota_is_refused_and_rolled_back(pg_world: World) -> None:
    pg_world.bus.handle(SetPlan("u-1", "free"))
    pg_world.bus.handle(Grant("u-1", Decimal("5.00"), "test"))
    with SqlUnitOfWork(pg_world.engine) as uow:
        uow.billing.reserve(hold("u-1", "0.25"), quota=2, month="2026-03")
        uow.billing.reserve(hold("u-1", "0.25"), quota=2, month="2026-03")
        uow.billing.reserve(hold("u-1", "1.00", stage="final"), quota=None, month="2026-03")
        uow.commit()
    before = ledger_rows(pg_world.engine)
    assert before[:2] == (3, 4) and before[2] == [(500, 150)]
    with SqlUnitOfWork(pg_world.engine) as uow, pytest.raises(QuotaExceeded):
        uow.billing.reserve(hold("u-1", "0.25"), quota=2, month="2026-03")
    assert ledger_rows(pg_world.engine) == before


def test_settling_a_hold_twice_moves_the_account_once(pg_world: World) -> None:
    pg_world.bus.handle(Grant("u-1", Decimal("1.00"), "test"))
    h = hold("u-1", "0.25")
    with SqlUnitOfWork(pg_world.engine) as uow:
        uow.billing.reserve(h, quota=None, month="2026-03")
        assert uow.billing.settle(h.hold_id, commit=True, at=NOW) is True
        assert uow.billing.settle(h.hold_id, commit=False, at=NOW) is False
        uow.commit()
    with pg_world.engine.connect() as conn:
        account = SqlLedger(conn).account("u-1")
        kinds = [r.kind for r in conn.execute(select(journal).order_by(journal.c.id))]
    assert account is not None
    assert (account.balance, account.held) == (Decimal("0.75"), Decimal("0.00"))
    assert kinds == ["grant", "reserve", "commit"]
