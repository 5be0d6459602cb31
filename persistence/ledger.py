"""The built-in credit ledger: accounts, holds and an append-only journal in our database.

It runs inside the caller's transaction, so a hold, the saga's state change and the outbox
rows that announce it commit together or not at all.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

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


def count_sample_rounds(conn: Connection, user_id: str, month: str) -> int:
    """Sample rounds reserved this month and not released (the free plan's quota)."""
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

    def account(self, user_id: str, *, lock: bool = False) -> Account | None:
        row = self.conn.execute(_ACCOUNT_FOR_UPDATE if lock else _ACCOUNT,
                                {"uid": user_id}).first()
        if row is None:
            return None
        return Account(row.user_id, row.plan, from_cents(row.balance_cents),
                       from_cents(row.held_cents))

    def reserve(self, hold: HoldRequest, *, quota: int | None, month: str) -> None:
        account = self.account(hold.user_id, lock=True)  # serialises one user's reservations
        if account is None:
            raise InsufficientCredits(f"account {hold.user_id} has no credits",
                                      required=str(money(hold.amount)), available="0.00")
        if quota is not None and count_sample_rounds(self.conn, hold.user_id, month) >= quota:
            raise QuotaExceeded(f"the free plan allows {quota} sample rounds per month",
                                limit=quota, month=month)
        if account.available < hold.amount:
            raise InsufficientCredits(
                f"{money(hold.amount)} credits needed, {money(account.available)} available",
                required=str(money(hold.amount)), available=str(money(account.available)))
        cents = to_cents(hold.amount)
        self._move(hold.user_id, 0, cents, hold.at)
        record_hold(self.conn, hold, month)
        self._journal(hold.user_id, hold.at, "reserve", 0, cents, hold.hold_id,
                      hold.generation_id, f"{hold.stage} hold")

    def prepare_settle(self, hold_id: str, *, commit: bool) -> None:
        return None

    def abandon(self) -> None:
        return None  # everything we did was inside the rolled-back transaction

    def settle(self, hold_id: str, *, commit: bool, at: datetime) -> bool:
        closed = close_hold(self.conn, hold_id, commit=commit, at=at)
        if closed is None:
            return False
        user_id, cents, generation_id = closed
        balance_delta = -cents if commit else 0
        self._move(user_id, balance_delta, -cents, at)
        self._journal(user_id, at, "commit" if commit else "release", balance_delta, -cents,
                      hold_id, generation_id, None)
        return True

    def set_plan(self, user_id: str, plan: str, at: datetime) -> Account:
        self._create(user_id, plan, at)
        self.conn.execute(update(accounts).where(accounts.c.user_id == user_id)
                          .values(plan=plan, updated_at=at))
        account = self.account(user_id)
        assert account is not None
        return account

    def grant(self, user_id: str, amount: Decimal, reason: str, at: datetime) -> Account:
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
