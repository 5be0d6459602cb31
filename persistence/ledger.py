"""The built-in credit ledger: accounts, holds and an append-only journal in our database.

It runs inside the caller's transaction, so a hold, the saga's state change and the outbox
rows that announce it commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, func, insert, select, update

from persistence.sql import insert_ignore
from persistence.tables import accounts, holds, journal
from saga.errors import InsufficientCredits, QuotaExceeded
from saga.ports import Account, HoldRequest
from saga.pricing import money


def to_cents(amount: Decimal) -> int:
    return int(money(amount) * 100)


def from_cents(cents: int) -> Decimal:
    return money(Decimal(cents) / 100)


# Hot-path statements are built once; each execution only binds parameters.
_COUNT_ROUNDS = select(func.count()).select_from(holds).where(
    holds.c.user_id == bindparam("user_id"), holds.c.stage == "samples",
    holds.c.month == bindparam("month"), holds.c.status != "released")
_INSERT_HOLD = insert(holds)
_CLOSE_HOLD = (update(holds)
               .where(holds.c.hold_id == bindparam("hid"), holds.c.status == "open")
               .values(status=bindparam("new_status"), settled_at=bindparam("at"))
               .returning(holds.c.user_id, holds.c.amount_cents, holds.c.generation_id))
_ACCOUNT = select(accounts).where(accounts.c.user_id == bindparam("uid"))
_ACCOUNT_FOR_UPDATE = _ACCOUNT.with_for_update()
_MOVE = (update(accounts).where(accounts.c.user_id == bindparam("uid"))
         .values(balance_cents=accounts.c.balance_cents + bindparam("balance_delta"),
                 held_cents=accounts.c.held_cents + bindparam("held_delta"),
                 updated_at=bindparam("at")))
_INSERT_JOURNAL = insert(journal)

# PostgreSQL: a ledger move in one statement. The funds check is in the UPDATE's WHERE, so
# it is evaluated on the row version the UPDATE locks (READ COMMITTED re-checks it after
# waiting for a concurrent writer): the lock, the check, the move, the hold and the journal
# row are one round trip. Nothing is written when the check fails (the CTEs read ``a``).
_PG_RESERVE = """
WITH a AS (
  UPDATE accounts SET held_cents = held_cents + %(cents)s, updated_at = %(at)s
  WHERE user_id = %(uid)s AND balance_cents - held_cents >= %(cents)s
  RETURNING user_id),
h AS (
  INSERT INTO holds (hold_id, user_id, generation_id, stage, amount_cents, status, month,
                     created_at)
  SELECT %(hid)s, user_id, %(gid)s, %(stage)s, %(cents)s, 'open', %(month)s, %(at)s FROM a),
j AS (
  INSERT INTO journal (user_id, at, kind, balance_delta_cents, held_delta_cents, hold_id,
                       generation_id, reason)
  SELECT user_id, %(at)s, 'reserve', 0, %(cents)s, %(hid)s, %(gid)s, %(reason)s FROM a)
SELECT count(*) FROM a
"""
# Closing the hold locks it (only an open one matches), then the account moves and the
# journal row is written from what the hold says.
_PG_SETTLE = """
WITH h AS (
  UPDATE holds SET status = %(status)s, settled_at = %(at)s
  WHERE hold_id = %(hid)s AND status = 'open'
  RETURNING user_id, amount_cents, generation_id),
a AS (
  UPDATE accounts SET balance_cents = balance_cents - %(commit)s * h.amount_cents,
                      held_cents = held_cents - h.amount_cents, updated_at = %(at)s
  FROM h WHERE accounts.user_id = h.user_id),
j AS (
  INSERT INTO journal (user_id, at, kind, balance_delta_cents, held_delta_cents, hold_id,
                       generation_id, reason)
  SELECT user_id, %(at)s, %(kind)s, -%(commit)s * amount_cents, -amount_cents, %(hid)s,
         generation_id, NULL FROM h)
SELECT count(*) FROM h
"""


class LedgerOutOfStep(RuntimeError):
    """A deferred ledger write did not find the rows this transaction locked (a bug, never a
    refusal): the transaction is rolled back, nothing of the command stays."""


@dataclass
class LockedAccount:
    """An account row this transaction holds ``FOR UPDATE``, kept in step with our moves.

    ``rounds``: month -> the free plan's sample rounds counted in a snapshot that sees every
    reservation committed before the lock was taken (and this transaction's own)."""

    plan: str
    balance_cents: int
    held_cents: int
    rounds: dict[str, int] = field(default_factory=dict)


@dataclass
class LedgerWrites:
    """PostgreSQL: the ledger moves of a command, written in the command's one statement.

    Only moves decided on rows this transaction already holds locked are buffered here (a
    reservation on a :class:`LockedAccount`, the settling of a hold locked open), so their
    outcome is known before the statement runs; the statement still checks each of them
    and raises :class:`LedgerOutOfStep` if a row is not as it was locked."""

    # user -> [balance delta, held delta, at, whether the move reserves (funds check)]
    moves: dict[str, list[Any]] = field(default_factory=dict)
    new_holds: list[tuple[Any, ...]] = field(default_factory=list)
    closed_holds: list[tuple[str, str, datetime]] = field(default_factory=list)
    journal: list[tuple[Any, ...]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.moves or self.new_holds or self.closed_holds or self.journal)

    def move(self, user_id: str, balance: int, held: int, at: datetime, *,
             reserves: bool) -> None:
        earlier = self.moves.get(user_id)
        if earlier is None:
            self.moves[user_id] = [balance, held, at, reserves]
        else:
            earlier[0] += balance
            earlier[1] += held
            earlier[2] = at
            earlier[3] = earlier[3] or reserves

    def ctes(self, ctes: list[str], params: list[Any],
             checks: list[tuple[str, int, Exception]]) -> None:
        """Append this buffer's CTEs, parameters and (CTE, expected count, error) checks."""
        if self.moves:
            users = sorted(self.moves)
            # The accounts are locked in user order first (as the row-by-row path takes
            # them), so two commands moving credits of the same users never wait crosswise.
            listed = ", ".join(["%s"] * len(users))
            ctes.append(f"al AS MATERIALIZED (SELECT user_id FROM accounts WHERE user_id IN "
                        f"({listed}) ORDER BY user_id FOR UPDATE)")
            params += users
            # The list again on the updated table: an index scan whatever the statistics.
            ctes.append(
                "am AS (UPDATE accounts SET balance_cents = accounts.balance_cents + v.b, "
                "held_cents = accounts.held_cents + v.h, updated_at = v.at FROM al JOIN "
                "(VALUES " + ", ".join(["(%s, %s::bigint, %s::bigint, %s::timestamptz, "
                                        "%s::boolean)"] * len(users))
                + ") AS v (uid, b, h, at, chk) ON v.uid = al.user_id "
                f"WHERE accounts.user_id IN ({listed}) AND accounts.user_id = al.user_id "
                "AND (NOT v.chk OR accounts.balance_cents + v.b >= accounts.held_cents + v.h) "
                "RETURNING v.chk)")
            for user in users:
                params += [user, *self.moves[user]]
            params += users
            reserving = sum(1 for user in users if self.moves[user][3])
            checks.append(("am WHERE chk", reserving,
                           LedgerOutOfStep("an account moved under its lock")))
        if self.new_holds:
            ctes.append("hi AS (INSERT INTO holds (hold_id, user_id, generation_id, stage, "
                        "amount_cents, status, month, created_at) VALUES "
                        + ", ".join(["(%s, %s, %s, %s, %s, 'open', %s, %s)"]
                                    * len(self.new_holds)) + ")")
            for row in self.new_holds:
                params += row
        if self.closed_holds:
            ctes.append("hc AS (UPDATE holds SET status = v.st, settled_at = v.at FROM (VALUES "
                        + ", ".join(["(%s, %s, %s::timestamptz)"] * len(self.closed_holds))
                        + ") AS v (hid, st, at) WHERE holds.hold_id IN ("
                        + ", ".join(["%s"] * len(self.closed_holds))
                        + ") AND holds.hold_id = v.hid AND holds.status = 'open' RETURNING 1)")
            for row in self.closed_holds:
                params += row
            params += [row[0] for row in self.closed_holds]
            checks.append(("hc", len(self.closed_holds),
                           LedgerOutOfStep("a hold locked open was not open")))
        if self.journal:
            ctes.append("j AS (INSERT INTO journal (user_id, at, kind, balance_delta_cents, "
                        "held_delta_cents, hold_id, generation_id, reason) VALUES "
                        + ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s)"] * len(self.journal))
                        + ")")
            for row in self.journal:
                params += row
        self.moves, self.new_holds, self.closed_holds, self.journal = {}, [], [], []


class Flusher(Protocol):
    """The unit of work's deferred writes (``persistence.uow.PendingWrites``)."""

    ledger: LedgerWrites

    def flush(self) -> None: ...


def count_sample_rounds(conn: Connection, user_id: str, month: str,
                        writes: Flusher | None = None) -> int:
    """Sample rounds reserved this month and not released (the free plan's quota)."""
    if writes is not None:
        writes.flush()  # this transaction's own deferred holds count too
    return int(conn.execute(_COUNT_ROUNDS, {"user_id": user_id, "month": month}).scalar_one())


def record_hold(conn: Connection, hold: HoldRequest, month: str, status: str = "open") -> None:
    conn.execute(_INSERT_HOLD, {
        "hold_id": hold.hold_id, "user_id": hold.user_id, "generation_id": hold.generation_id,
        "stage": hold.stage, "amount_cents": to_cents(hold.amount), "status": status,
        "month": month, "created_at": hold.at})


def close_hold(conn: Connection, hold_id: str, *, commit: bool,
               at: datetime) -> tuple[str, int, str] | None:
    """Mark an open hold settled; (user_id, cents, generation_id), or None if it was not open."""
    row = conn.execute(_CLOSE_HOLD, {"hid": hold_id, "at": at,
                                     "new_status": "committed" if commit else "released"}
                       ).first()
    return (row.user_id, row.amount_cents, row.generation_id) if row else None


class SqlLedger:
    may_be_unavailable = False

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.one_statement = conn.dialect.name == "postgresql"
        # PostgreSQL, once the unit of work attached its deferred writes (see attach()).
        self.writes: Flusher | None = None
        self.locked: dict[str, LockedAccount | None] = {}  # None: no row when locked
        self.open_holds: dict[str, tuple[str, int, str]] = {}  # id -> user, cents, saga

    # -- rows the unit of work read and locked ahead (PostgreSQL) -------------------------
    def attach(self, writes: Flusher) -> None:
        """Defer the moves decidable on locked rows into ``writes`` (the command's one
        statement); every other statement of the ledger flushes them first."""
        self.writes = writes

    def adopt_account(self, user_id: str, account: LockedAccount | None) -> None:
        """``user_id``'s account row (None: there was none) is locked by this transaction."""
        self.locked[user_id] = account

    def adopt_open_holds(self, found: list[tuple[str, str, int, str]]) -> None:
        """These holds (id, user, cents, saga) are open and locked by this transaction, and
        are all the open holds of their sagas."""
        for hold_id, user_id, cents, generation_id in found:
            self.open_holds[hold_id] = (user_id, cents, generation_id)

    def _flush(self) -> None:
        if self.writes is not None:
            self.writes.flush()

    def account(self, user_id: str, *, lock: bool = False) -> Account | None:
        if user_id in self.locked:
            held = self.locked[user_id]
            return None if held is None else Account(
                user_id, held.plan, from_cents(held.balance_cents), from_cents(held.held_cents))
        self._flush()
        row = self.conn.execute(_ACCOUNT_FOR_UPDATE if lock else _ACCOUNT,
                                {"uid": user_id}).first()
        if row is None:
            return None
        return Account(row.user_id, row.plan, from_cents(row.balance_cents),
                       from_cents(row.held_cents))

    def reserve(self, hold: HoldRequest, *, quota: int | None, month: str) -> None:
        if self.writes is not None and hold.user_id in self.locked:
            return self._reserve_locked(hold, quota=quota, month=month)
        if self.one_statement:
            return self._reserve_pg(hold, quota=quota, month=month)
        account = self.account(hold.user_id, lock=True)  # serialises one user's reservations
        self._refuse_if_cannot_hold(account, hold, quota=quota, month=month)
        cents = to_cents(hold.amount)
        self._move(hold.user_id, 0, cents, hold.at)
        record_hold(self.conn, hold, month)
        self._journal(hold.user_id, hold.at, "reserve", 0, cents, hold.hold_id,
                      hold.generation_id, f"{hold.stage} hold")

    def _reserve_locked(self, hold: HoldRequest, *, quota: int | None, month: str) -> None:
        """Reserve on an account this transaction holds locked: decided here on its row,
        written with the command's statement. Refused exactly as the other paths refuse."""
        assert self.writes is not None
        held = self.locked[hold.user_id]
        account = None if held is None else Account(
            hold.user_id, held.plan, from_cents(held.balance_cents),
            from_cents(held.held_cents))
        rounds: int | None = None
        if quota is not None and held is not None:
            rounds = held.rounds.get(month)
            if rounds is None:  # not read with the lock: count now (the lock is ours)
                rounds = held.rounds[month] = count_sample_rounds(
                    self.conn, hold.user_id, month, self.writes)
        self._refuse_if_cannot_hold(account, hold, quota=quota, month=month, rounds=rounds)
        assert held is not None  # refused above otherwise
        cents = to_cents(hold.amount)
        held.held_cents += cents
        if hold.stage == "samples" and month in held.rounds:
            held.rounds[month] += 1
        ledger = self.writes.ledger
        ledger.move(hold.user_id, 0, cents, hold.at, reserves=True)
        ledger.new_holds.append((hold.hold_id, hold.user_id, hold.generation_id, hold.stage,
                                 cents, month, hold.at))
        ledger.journal.append((hold.user_id, hold.at, "reserve", 0, cents, hold.hold_id,
                               hold.generation_id, f"{hold.stage} hold"))

    def _reserve_pg(self, hold: HoldRequest, *, quota: int | None, month: str) -> None:
        self._flush()
        cents = to_cents(hold.amount)
        moved = self.conn.exec_driver_sql(_PG_RESERVE, {
            "cents": cents, "at": hold.at, "uid": hold.user_id, "hid": hold.hold_id,
            "gid": hold.generation_id, "stage": hold.stage, "month": month,
            "reason": f"{hold.stage} hold"}).scalar_one()
        if moved:
            if quota is not None:
                # Counted after the UPDATE above took the account's row lock, so in a
                # snapshot that sees every reservation committed before ours (and our own).
                rounds = count_sample_rounds(self.conn, hold.user_id, month)
                if rounds - (hold.stage == "samples") >= quota:
                    raise QuotaExceeded(  # the caller's transaction rolls the move back
                        f"the free plan allows {quota} sample rounds per month",
                        limit=quota, month=month)
            return
        # Refused (rare): read the account for the error; nothing was written.
        account = self.account(hold.user_id)
        self._refuse_if_cannot_hold(account, hold, quota=quota, month=month)
        assert account is not None  # refused above otherwise
        raise self._insufficient(account, hold)  # the UPDATE found too little

    def _refuse_if_cannot_hold(self, account: Account | None, hold: HoldRequest, *,
                               quota: int | None, month: str, rounds: int | None = None
                               ) -> None:
        """Raise the refusal a reservation gets: no account, the free plan's quota reached,
        or too little available (checked in that order). ``rounds``: the month's sample
        rounds when already counted under the account's lock."""
        if account is None:
            raise InsufficientCredits(f"account {hold.user_id} has no credits",
                                      required=str(money(hold.amount)), available="0.00")
        if quota is not None and rounds is None:
            rounds = count_sample_rounds(self.conn, hold.user_id, month)
        if quota is not None and rounds is not None and rounds >= quota:
            raise QuotaExceeded(f"the free plan allows {quota} sample rounds per month",
                                limit=quota, month=month)
        if account.available < hold.amount:
            raise self._insufficient(account, hold)

    @staticmethod
    def _insufficient(account: Account, hold: HoldRequest) -> InsufficientCredits:
        return InsufficientCredits(
            f"{money(hold.amount)} credits needed, {money(account.available)} available",
            required=str(money(hold.amount)), available=str(money(account.available)))

    def prepare_settle(self, hold_id: str, *, commit: bool) -> None:
        return None

    def abandon(self) -> None:
        # Everything we did was inside the rolled-back transaction; so were the locks.
        self.locked.clear()
        self.open_holds.clear()

    def commit_sent(self, hold_ids: Collection[str]) -> set[str]:
        return set()  # a commit is settled in our own transaction: never in flight

    def settle(self, hold_id: str, *, commit: bool, at: datetime) -> bool:
        if self.writes is not None and hold_id in self.open_holds:
            self._settle_locked(hold_id, commit=commit, at=at)
            return True
        if self.one_statement:
            self._flush()
            return bool(self.conn.exec_driver_sql(_PG_SETTLE, {
                "status": "committed" if commit else "released", "at": at, "hid": hold_id,
                "commit": 1 if commit else 0, "kind": "commit" if commit else "release",
            }).scalar_one())
        closed = close_hold(self.conn, hold_id, commit=commit, at=at)
        if closed is None:
            return False
        user_id, cents, generation_id = closed
        balance_delta = -cents if commit else 0
        self._move(user_id, balance_delta, -cents, at)
        self._journal(user_id, at, "commit" if commit else "release", balance_delta, -cents,
                      hold_id, generation_id, None)
        return True

    def _settle_locked(self, hold_id: str, *, commit: bool, at: datetime) -> None:
        """Settle a hold this transaction holds locked open: written with the command's
        statement, exactly the rows :data:`_PG_SETTLE` writes."""
        assert self.writes is not None
        user_id, cents, generation_id = self.open_holds.pop(hold_id)
        balance_delta = -cents if commit else 0
        held = self.locked.get(user_id)
        if held is not None:
            held.balance_cents += balance_delta
            held.held_cents -= cents
            if not commit:
                held.rounds.clear()  # a released round no longer counts: count again
        ledger = self.writes.ledger
        ledger.move(user_id, balance_delta, -cents, at, reserves=False)
        ledger.closed_holds.append((hold_id, "committed" if commit else "released", at))
        ledger.journal.append((user_id, at, "commit" if commit else "release", balance_delta,
                               -cents, hold_id, generation_id, None))

    def set_plan(self, user_id: str, plan: str, at: datetime) -> Account:
        self._flush()
        self.locked.pop(user_id, None)
        self._create(user_id, plan, at)
        self.conn.execute(update(accounts).where(accounts.c.user_id == user_id)
                          .values(plan=plan, updated_at=at))
        account = self.account(user_id)
        assert account is not None
        return account

    def grant(self, user_id: str, amount: Decimal, reason: str, at: datetime) -> Account:
        self._flush()
        self.locked.pop(user_id, None)
        self._create(user_id, "free", at)
        cents = to_cents(amount)
        self._move(user_id, cents, 0, at)
        self._journal(user_id, at, "grant", cents, 0, None, None, reason)
        account = self.account(user_id)
        assert account is not None
        return account

    def _create(self, user_id: str, plan: str, at: datetime) -> None:
        insert_ignore(self.conn, accounts, {
            "user_id": user_id, "plan": plan, "balance_cents": 0, "held_cents": 0,
            "created_at": at, "updated_at": at})

    def _move(self, user_id: str, balance_delta: int, held_delta: int, at: datetime) -> None:
        self.conn.execute(_MOVE, {"uid": user_id, "balance_delta": balance_delta,
                                  "held_delta": held_delta, "at": at})

    def _journal(self, user_id: str, at: datetime, kind: str, balance_delta: int,
                 held_delta: int, hold_id: str | None, generation_id: str | None,
                 reason: str | None) -> None:
        self.conn.execute(_INSERT_JOURNAL, {
            "user_id": user_id, "at": at, "kind": kind, "balance_delta_cents": balance_delta,
            "held_delta_cents": held_delta, "hold_id": hold_id, "generation_id": generation_id,
            "reason": reason})
