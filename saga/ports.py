"""The interfaces the saga's handlers need; ``persistence`` and ``messaging`` implement them."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, Self

from saga import intents as it
from saga.messages import OutboundMessage
from saga.model import Generation


@dataclass(frozen=True)
class Account:
    user_id: str
    plan: str
    balance: Decimal
    held: Decimal

    @property
    def available(self) -> Decimal:
        return self.balance - self.held


@dataclass(frozen=True)
class IdempotencyRecord:
    """Where a POST's response is stored so the same key replays it (docs/api.md)."""

    scope: str  # "<role> <METHOD> <path>"
    key: str
    request_hash: str


@dataclass(frozen=True)
class Prefetch:
    """What a command is about to read, named up front so a unit of work can read it all in
    one round trip. A hint only: the repositories answer the same whether it was taken or
    not (PostgreSQL takes it; SQLite and the fakes read row by row when asked).

    ``generation_id`` is locked (``FOR UPDATE``) as ``generations.get(…, for_update=True)``
    does; an account named here (``user_id``, or the saga's owner with ``owner_account``)
    is locked too, after the saga, because the command is about to move credits on it.
    ``rounds_month``: the free plan's sample rounds of that month are wanted as well.
    """

    idempotency: IdempotencyRecord | None = None
    generation_id: str | None = None
    user_id: str | None = None
    owner_account: bool = False
    rounds_month: str | None = None


@dataclass(frozen=True)
class HoldRequest:
    hold_id: str
    user_id: str
    generation_id: str
    stage: str
    amount: Decimal
    at: datetime


class GenerationRepository(Protocol):
    def get(self, generation_id: str, *, for_update: bool = False) -> Generation | None: ...

    def get_many(self, generation_ids: list[str], *, for_update: bool = False
                 ) -> dict[str, Generation]:
        """The sagas of these ids that exist, locked in one statement (in id order, so two
        batches never wait on each other crosswise); raise ``UnloadableSaga`` for a row that
        does not load."""

    def add(self, saga: Generation) -> None: ...

    def save(self, saga: Generation) -> None:
        """Persist; raise ``ConcurrencyConflict`` if the stored version moved on."""

    def claim_due(self, now: datetime) -> Generation | None:
        """Lock and return one saga whose ``due_at`` has passed, skipping locked ones."""

    def search(self, *, user_id: str | None, state: str | None, limit: int,
             after: tuple[datetime, str] | None) -> list[Generation]: ...

    # -- parking: by id, without loading the saga (its row may not load at all) ---------
    def park(self, generation_id: str, kind: str, reason: str, now: datetime) -> bool:
        """Set ``attention`` and add a ``note``; False if unknown or already parked."""

    def fire_failed(self, generation_id: str, retry_at: Callable[[int], datetime],
                    note: dict[str, Any] | None = None, at: datetime | None = None) -> int:
        """Count a failed firing, move ``due_at`` to ``retry_at(count)``; the count. ``note``:
        the detail of a ``note`` history row to add at ``at`` (with ``attempt``: the count)."""

    def unpark(self, generation_id: str, now: datetime, *, actor: str, reason: str,
               due_now: bool, note: dict[str, Any] | None = None) -> bool | None:
        """Clear ``attention`` with a ``note`` (``note``: more of its detail); None if
        unknown, False if not parked."""

    def attention(self, limit: int, after: tuple[datetime, str] | None
                  ) -> list[dict[str, Any]]:
        """Parked sagas oldest first: generation_id, user_id, state, attention, _since."""


class HistoryRepository(Protocol):
    def append(self, generation_id: str, seq: int, at: datetime,
               entry: it.HistoryEntry) -> None: ...

    def events(self, generation_id: str) -> list[dict[str, Any]]: ...


class Outbox(Protocol):
    def add(self, message: OutboundMessage, at: datetime) -> None: ...


class Inbox(Protocol):
    def add(self, job_id: str, event_type: str, generation_id: str, at: datetime) -> bool:
        """Record a result's dedup key; False if it was already there."""

    def add_many(self, keys: list[tuple[str, str, str]], at: datetime) -> set[tuple[str, str]]:
        """Record (job id, event type, generation id) keys at once; the (job id, event type)
        pairs that were new."""


class Billing(Protocol):
    """A credit backend: the built-in ledger or the external billing service."""

    #: True when settling can fail for a while (external HTTP service): the saga then waits in
    #: ``compensating``. The built-in ledger settles inside the transaction and never fails.
    may_be_unavailable: bool

    def account(self, user_id: str) -> Account | None: ...

    def reserve(self, hold: HoldRequest, *, quota: int | None, month: str) -> None:
        """Hold ``amount``; raise InsufficientCredits / QuotaExceeded / BillingUnavailable."""

    def prepare_settle(self, hold_id: str, *, commit: bool) -> None:
        """Reach the backend before the transaction commits (external billing only).

        Raises ``BillingUnavailable`` when it does not answer; the built-in ledger does nothing.
        """

    def commit_sent(self, hold_ids: Collection[str]) -> set[str]:
        """Those of ``hold_ids`` whose commit was sent to the backend but not yet settled here.

        External billing commits remotely before our transaction commits; a process that dies
        in between leaves the hold open here although the backend committed it. Such a hold
        must never be released (the result that committed it is redelivered). The built-in
        ledger settles inside the transaction, so it always answers an empty set.
        """

    def settle(self, hold_id: str, *, commit: bool, at: datetime) -> bool:
        """Commit or release an open hold in this transaction; False if already settled."""

    def abandon(self) -> None:
        """The unit of work rolled back: undo anything done outside our database."""

    def set_plan(self, user_id: str, plan: str, at: datetime) -> Account: ...

    def grant(self, user_id: str, amount: Decimal, reason: str, at: datetime) -> Account: ...


class IdempotencyStore(Protocol):
    def get(self, record: IdempotencyRecord) -> tuple[str, int, Any] | None:
        """(request hash, status, body) stored for this scope and key, if any."""

    def put(self, record: IdempotencyRecord, status: int, body: Any, at: datetime) -> None:
        """Store the response; raise ``IdempotencyRace`` (at flush) if the key was taken."""


class UnitOfWork(Protocol):
    generations: GenerationRepository
    history: HistoryRepository
    outbox: Outbox
    inbox: Inbox
    billing: Billing
    idempotency: IdempotencyStore
    dead_letters: DeadLetterStore

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def prefetch(self, what: Prefetch) -> None:
        """Read (and lock) what ``what`` names ahead of the command's own reads; a hint."""

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class IdempotencyRace(Exception):
    """Another request stored a response under the same key first."""


class AlreadyAnswered(Exception):
    """This Idempotency-Key already has a stored response: replay it, change nothing."""

    def __init__(self, stored: tuple[str, int, Any]) -> None:
        super().__init__("idempotency key already answered")
        self.stored = stored



@dataclass(frozen=True)
class DeadLetter:
    """A message the service could not use, kept so support can replay or discard it."""

    id: str
    dead_lettered_at: datetime
    reason: str
    exchange: str  # where a replay publishes it
    routing_key: str  # its original routing key
    generation_id: str | None
    body: bytes
    status: str  # open | replayed | discarded
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolved_reason: str | None = None


class DeadLetterStore(Protocol):
    def add(self, letter: DeadLetter, message_key: str) -> bool:
        """Store ``letter``; False (nothing stored) if ``message_key`` is already there."""

    def get(self, dead_letter_id: str, *, for_update: bool = False) -> DeadLetter | None: ...

    def resolve(self, dead_letter_id: str, status: str, at: datetime, by: str,
                reason: str) -> None: ...

    def search(self, *, status: str | None, limit: int,
               after: tuple[datetime, str] | None) -> list[DeadLetter]:
        """Newest first."""

    def open_for_generation(self, generation_id: str) -> list[DeadLetter]:
        """The generation's open dead letters, oldest first, locked until the commit."""
