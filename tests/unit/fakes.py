"""An in-memory unit of work for handler unit tests (cosmicpython's ``FakeUnitOfWork``).

It keeps the saga's ports honest without a database: state lives in a :class:`FakeStore`
shared by every unit of work; each unit of work works on a copy and writes it back only on
``commit()``, so a handler that forgets to commit, or raises, changes nothing. Sagas are kept
as copies too, so the optimistic version check behaves as the SQL repository's does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Self

from saga import intents as it
from saga.errors import ConcurrencyConflict, InsufficientCredits, QuotaExceeded
from saga.messages import OutboundMessage
from saga.model import Generation
from saga.ports import (
    Account,
    Billing,
    GenerationRepository,
    HistoryRepository,
    HoldRequest,
    IdempotencyRace,
    IdempotencyRecord,
    IdempotencyStore,
    Inbox,
    Outbox,
    Prefetch,
)


@dataclass
class FakeStore:
    sagas: dict[str, Generation] = field(default_factory=dict)
    history: dict[str, list[tuple[int, it.HistoryEntry]]] = field(default_factory=dict)
    outbox: list[OutboundMessage] = field(default_factory=list)
    inbox: set[tuple[str, str]] = field(default_factory=set)
    accounts: dict[str, Account] = field(default_factory=dict)
    holds: dict[str, tuple[HoldRequest, str, str]] = field(default_factory=dict)  # status, month
    responses: dict[tuple[str, str], tuple[str, int, Any]] = field(default_factory=dict)
    commits: int = 0
    fire_failures: dict[str, int] = field(default_factory=dict)
    # Holds whose commit went to an (imagined) external backend, our transaction lost.
    commits_sent: set[str] = field(default_factory=set)


class FakeGenerations:
    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.fire_failures = store.fire_failures

    def get(self, generation_id: str, *, for_update: bool = False) -> Generation | None:
        saga = self.store.sagas.get(generation_id)
        return copy.deepcopy(saga) if saga else None

    def get_many(self, generation_ids: list[str], *, for_update: bool = False
                 ) -> dict[str, Generation]:
        return {gid: copy.deepcopy(self.store.sagas[gid])
                for gid in sorted(set(generation_ids)) if gid in self.store.sagas}

    def add(self, saga: Generation) -> None:
        saga.version = 0
        self.store.sagas[saga.id] = copy.deepcopy(saga)

    def save(self, saga: Generation) -> None:
        stored = self.store.sagas.get(saga.id)
        if stored is None or stored.version != saga.version:
            raise ConcurrencyConflict(saga.id)
        saga.version += 1
        self.store.sagas[saga.id] = copy.deepcopy(saga)

    def claim_due(self, now: datetime) -> Generation | None:
        due = sorted((s for s in self.store.sagas.values()
                      if s.due_at and s.due_at <= now and s.attention is None),
                     key=lambda s: s.due_at or now)
        return copy.deepcopy(due[0]) if due else None

    def _note(self, saga: Generation, actor: Any, detail: dict[str, Any]) -> None:
        saga.history_seq += 1
        self.store.history.setdefault(saga.id, []).append(
            (saga.history_seq, it.HistoryEntry(kind="note", actor=actor, detail=detail)))
        saga.version += 1

    def park(self, generation_id: str, kind: str, reason: str, now: datetime) -> bool:
        saga = self.store.sagas.get(generation_id)
        if saga is None or saga.attention is not None:
            return False
        saga.attention = {"reason": reason, "since": now.isoformat(), "kind": kind}
        self._note(saga, "system", {"parked": True, "kind": kind, "reason": reason})
        return True

    def fire_failed(self, generation_id: str, retry_at: Callable[[int], datetime],
                    note: dict[str, Any] | None = None, at: datetime | None = None) -> int:
        saga = self.store.sagas[generation_id]
        self.fire_failures[generation_id] = self.fire_failures.get(generation_id, 0) + 1
        saga.due_at = retry_at(self.fire_failures[generation_id])
        saga.version += 1
        if note is not None:
            self._note(saga, "system", {**note, "attempt": self.fire_failures[generation_id]})
            saga.version -= 1  # _note bumps it too
        return self.fire_failures[generation_id]

    def unpark(self, generation_id: str, now: datetime, *, actor: str, reason: str,
               due_now: bool, note: dict[str, Any] | None = None) -> bool | None:
        saga = self.store.sagas.get(generation_id)
        if saga is None:
            return None
        if saga.attention is None:
            return False
        kind = saga.attention["kind"]
        saga.attention = None
        self.fire_failures.pop(generation_id, None)
        if due_now and saga.due_at is not None and kind != "result":
            saga.due_at = now
        self._note(saga, actor, {"unparked": True, "kind": kind, "reason": reason,
                                 **(note or {})})
        return True

    def attention(self, limit: int, after: tuple[datetime, str] | None
                  ) -> list[dict[str, Any]]:
        parked = sorted((s for s in self.store.sagas.values() if s.attention is not None),
                        key=lambda s: (str((s.attention or {})["since"]), s.id))
        return [{"generation_id": s.id, "user_id": s.user_id, "state": s.state,
                 "attention": dict(s.attention or {}),
                 "_since": datetime.fromisoformat(str((s.attention or {})["since"]))}
                for s in parked
                if after is None or (datetime.fromisoformat(
                    str((s.attention or {})["since"])), s.id) > after][:limit]

    def search(self, *, user_id: str | None, state: str | None, limit: int,
               after: tuple[datetime, str] | None) -> list[Generation]:
        found = [s for s in self.store.sagas.values()
                 if (user_id is None or s.user_id == user_id)
                 and (state is None or s.state == state)
                 and (after is None or (s.created_at, s.id) < after)]
        found.sort(key=lambda s: (s.created_at, s.id), reverse=True)
        return [copy.deepcopy(s) for s in found[:limit]]


class FakeHistory:
    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def append(self, generation_id: str, seq: int, at: datetime, entry: it.HistoryEntry) -> None:
        self.store.history.setdefault(generation_id, []).append((seq, entry))

    def events(self, generation_id: str) -> list[dict[str, Any]]:
        return [{"seq": seq, "kind": e.kind, "actor": e.actor, "trigger": e.trigger,
                 "from_state": e.from_state, "to_state": e.to_state, "detail": e.detail}
                for seq, e in self.store.history.get(generation_id, [])]


class FakeOutbox:
    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def add(self, message: OutboundMessage, at: datetime) -> None:
        self.store.outbox.append(message)


class FakeInbox:
    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def add(self, job_id: str, event_type: str, generation_id: str, at: datetime) -> bool:
        key = (job_id, event_type)
        if key in self.store.inbox:
            return False
        self.store.inbox.add(key)
        return True

    def add_many(self, keys: list[tuple[str, str, str]], at: datetime) -> set[tuple[str, str]]:
        return {(job, event) for job, event, gid in keys if self.add(job, event, gid, at)}


class FakeBilling:
    """The built-in ledger's rules (available = balance - held, free-plan quota) in memory."""

    may_be_unavailable = False

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def account(self, user_id: str) -> Account | None:
        return self.store.accounts.get(user_id)

    def reserve(self, hold: HoldRequest, *, quota: int | None, month: str) -> None:
        account = self.store.accounts.get(hold.user_id)
        if account is None or account.available < hold.amount:
            raise InsufficientCredits("not enough credits")
        rounds = sum(1 for h, status, m in self.store.holds.values()
                     if h.user_id == hold.user_id and h.stage == "samples" and m == month
                     and status != "released")
        if quota is not None and rounds >= quota:
            raise QuotaExceeded("quota", limit=quota, month=month)
        self.store.holds[hold.hold_id] = (hold, "open", month)
        self._move(hold.user_id, Decimal("0"), hold.amount)

    def prepare_settle(self, hold_id: str, *, commit: bool) -> None:
        return None

    def settle(self, hold_id: str, *, commit: bool, at: datetime) -> bool:
        hold, status, month = self.store.holds[hold_id]
        if status != "open":
            return False
        self.store.holds[hold_id] = (hold, "committed" if commit else "released", month)
        self._move(hold.user_id, -hold.amount if commit else Decimal("0"), -hold.amount)
        return True

    def abandon(self) -> None:
        return None

    def commit_sent(self, hold_ids: Collection[str]) -> set[str]:
        return set(hold_ids) & self.store.commits_sent

    def set_plan(self, user_id: str, plan: str, at: datetime) -> Account:
        old = self.store.accounts.get(user_id) or Account(user_id, plan, Decimal("0"),
                                                          Decimal("0"))
        self.store.accounts[user_id] = Account(user_id, plan, old.balance, old.held)
        return self.store.accounts[user_id]

    def grant(self, user_id: str, amount: Decimal, reason: str, at: datetime) -> Account:
        if user_id not in self.store.accounts:
            self.store.accounts[user_id] = Account(user_id, "free", Decimal("0"), Decimal("0"))
        self._move(user_id, amount, Decimal("0"))
        return self.store.accounts[user_id]

    def _move(self, user_id: str, balance: Decimal, held: Decimal) -> None:
        a = self.store.accounts[user_id]
        self.store.accounts[user_id] = Account(a.user_id, a.plan, a.balance + balance,
                                               a.held + held)


class FakeIdempotency:
    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def get(self, record: IdempotencyRecord) -> tuple[str, int, Any] | None:
        return self.store.responses.get((record.scope, record.key))

    def put(self, record: IdempotencyRecord, status: int, body: Any, at: datetime) -> None:
        key = (record.scope, record.key)
        if key in self.store.responses:
            raise IdempotencyRace()
        self.store.responses[key] = (record.request_hash, status, body)


class FakeUnitOfWork:
    def __init__(self, shared: FakeStore) -> None:
        self.shared = shared
        self.store = copy.deepcopy(shared)
        # Typed as the ports, so mypy checks each fake against its protocol.
        self.generations: GenerationRepository = FakeGenerations(self.store)
        self.history: HistoryRepository = FakeHistory(self.store)
        self.outbox: Outbox = FakeOutbox(self.store)
        self.inbox: Inbox = FakeInbox(self.store)
        self.billing: Billing = FakeBilling(self.store)
        self.idempotency: IdempotencyStore = FakeIdempotency(self.store)
        self.committed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.rollback()

    def prefetch(self, what: Prefetch) -> None:
        return None  # a hint: the fakes read row by row when asked

    def commit(self) -> None:
        for name, value in vars(self.store).items():
            setattr(self.shared, name, value)
        self.shared.commits += 1
        self.committed = True

    def rollback(self) -> None:
        return None  # nothing reaches ``shared`` without commit()
