"""The external billing backend (docs/api.md, credits): Odoo's billing adapter over HTTP.

Every call is idempotent by ``hold_id``, so a call that timed out is simply repeated. Our
database keeps a mirror of each hold (the ``holds`` table) so that settling stays exactly-once
on our side, the free plan's quota can be counted, and support can see what was held.

When the service does not answer, reservations are refused (503, nothing dispatched) and
releases make the saga wait in ``compensating`` until a retry succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, delete, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from persistence.ledger import close_hold, count_sample_rounds, from_cents, record_hold
from persistence.tables import billing_commits_sent, holds
from saga.errors import (
    BillingRefused,
    BillingUnavailable,
    DomainError,
    InsufficientCredits,
    QuotaExceeded,
)
from saga.ports import Account, HoldRequest
from saga.pricing import fmt, money
from saga.retry import RetryPolicy

log = logging.getLogger(__name__)


PENDING_GRACE = timedelta(minutes=1)  # far longer than a reservation request can take


def _mark_released(engine: Engine, hold_id: str) -> None:
    with engine.begin() as side:
        side.execute(update(holds).where(holds.c.hold_id == hold_id,
                                         holds.c.status == "pending")
                     .values(status="released", settled_at=datetime.now(UTC)))


def reap_pending_holds(engine: Engine, client: HttpBillingClient, now: datetime,
                       limit: int = 100, grace: timedelta = PENDING_GRACE) -> int:
    """Release remote holds whose reservation never reached a commit of ours.

    A ``pending`` row older than ``grace`` (:data:`PENDING_GRACE` unless
    ``AIGEN_BILLING_PENDING_GRACE_S`` says otherwise) belongs to a request that rolled back
    or to a process that died mid-request: the backend may hold credits for it, nobody will
    ever settle them, so they are released (idempotently; 404 means nothing was held).

    The rows are claimed with ``FOR UPDATE SKIP LOCKED`` and stay locked until they are marked
    released: a reservation whose transaction is still alive holds its row's lock (see
    :meth:`ExternalBilling.reserve`), so however late it is, it is skipped rather than
    released under it; two reapers side by side never take the same row.
    """
    released = 0
    with engine.connect() as conn, conn.begin():
        stale = conn.execute(select(holds.c.hold_id).where(
            holds.c.status == "pending", holds.c.created_at < now - grace)
            .order_by(holds.c.created_at).limit(limit)
            .with_for_update(skip_locked=True)).scalars().all()
        for hold_id in stale:
            try:
                response = client.call("POST", f"/holds/{hold_id}/release")
            except BillingUnavailable as exc:
                log.error("could not release stale hold %s: %s", hold_id, exc)
                continue
            if response.status_code in (200, 201, 204, 404):
                conn.execute(update(holds).where(holds.c.hold_id == hold_id)
                             .values(status="released", settled_at=datetime.now(UTC)))
                released += 1
            else:
                log.error("billing refused to release stale hold %s: %s", hold_id,
                          response.status_code)
    return released


class ExternalBillingNotSupported(DomainError):
    code = "external_billing"


def is_transient_status(status: int) -> bool:
    """5xx and 429 (rate limited) may pass if asked again later; other answers will not."""
    return status >= 500 or status == 429


def refused(status: int, what: str) -> BillingRefused:
    """A 4xx that asking again will not change: the step parks instead of retrying."""
    return BillingRefused(f"billing refused {what} with HTTP {status}", status=status)


class HttpBillingClient:
    """Thin HTTP client with timeouts and a few quick retries; shared by all threads.

    Retries follow the service's one :class:`~saga.retry.RetryPolicy`, with a budget small
    enough for a request: by default ``attempts`` calls ``backoff`` seconds apart, doubling.
    """

    def __init__(self, base_url: str, *, timeout: float = 2.0, attempts: int = 3,
                 backoff: float = 0.1, transport: httpx.BaseTransport | None = None,
                 policy: RetryPolicy | None = None) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                 transport=transport)
        self.policy = policy or RetryPolicy(base=backoff, cap=1.0, jitter=0.5,
                                            max_attempts=attempts - 1)

    def call(self, method: str, path: str, json: dict[str, Any] | None = None,
             ok: tuple[int, ...] = (200, 201, 204)) -> httpx.Response:
        """Return the first answer that is not a transient failure (transport error, timeout,
        5xx, 429). Raises :class:`BillingUnavailable` when the retry budget ran out."""
        last: str = ""
        retry = 0
        while True:
            try:
                response = self.http.request(method, path, json=json)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if not is_transient_status(response.status_code):
                    return response
                last = f"HTTP {response.status_code}"
            retry += 1
            if not self.policy.allows(retry):
                break
            time.sleep(self.policy.delay(retry))
        raise BillingUnavailable(f"billing backend {method} {path} failed: {last}")

    def close(self) -> None:
        self.http.close()


class ExternalBilling:
    may_be_unavailable = True

    def __init__(self, conn: Connection, client: HttpBillingClient) -> None:
        self.conn = conn
        self.client = client
        # A `pending` row committed on a side connection before each remote reservation makes
        # a crash between the reservation and our commit recoverable. SQLite (one writer at a
        # time, held by our own transaction) cannot take that side write.
        self.durable = conn.dialect.name != "sqlite"
        self._reserved: list[str] = []  # holds reserved remotely in this unit of work

    def account(self, user_id: str) -> Account | None:
        response = self.client.call("GET", f"/accounts/{user_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise refused(response.status_code, f"the account {user_id}")
        data = response.json()
        try:
            available = money(Decimal(str(data["available"])))
            plan = str(data["plan"])
        except (KeyError, InvalidOperation) as exc:
            raise BillingUnavailable(f"malformed account from billing: {exc}") from exc
        held = from_cents(int(self.conn.execute(
            select(func.coalesce(func.sum(holds.c.amount_cents), 0))
            .where(holds.c.user_id == user_id, holds.c.status == "open")).scalar_one()))
        return Account(user_id, plan, available + held, held)

    def reserve(self, hold: HoldRequest, *, quota: int | None, month: str) -> None:
        if quota is not None and count_sample_rounds(self.conn, hold.user_id, month) >= quota:
            raise QuotaExceeded(f"the free plan allows {quota} sample rounds per month",
                                limit=quota, month=month)
        # Remember it before asking: if the answer is lost, rolling back must still release
        # it — and if this process dies first, the reaper finds the `pending` row and does.
        self._reserved.append(hold.hold_id)
        if self.durable:
            with self.conn.engine.connect() as side, side.begin():
                record_hold(side, hold, month, status="pending")
            # Lock the row in our transaction before asking the backend, and keep the lock
            # until we commit or roll back: the reaper skips locked rows, so it can never
            # release a reservation whose request or commit is merely slow.
            status = self.conn.execute(select(holds.c.status)
                                       .where(holds.c.hold_id == hold.hold_id)
                                       .with_for_update()).scalar_one()
            if status != "pending":  # only if our clock is far behind the reaper's
                raise BillingUnavailable(f"hold {hold.hold_id} was reaped before it was made")
        response = self.client.call("POST", "/holds", json={
            "hold_id": hold.hold_id, "user_id": hold.user_id, "amount": fmt(hold.amount),
            "reason": f"{hold.stage} for generation {hold.generation_id}"})
        if response.status_code == 402:
            raise InsufficientCredits(f"{money(hold.amount)} credits needed",
                                      required=fmt(hold.amount))
        if response.status_code not in (200, 201):
            raise refused(response.status_code, f"the hold {hold.hold_id}")
        if self.durable:
            opened = self.conn.execute(update(holds).where(holds.c.hold_id == hold.hold_id,
                                                           holds.c.status == "pending")
                                       .values(status="open"))
            if opened.rowcount != 1:  # cannot happen while we hold the lock; never claim it
                raise BillingUnavailable(f"hold {hold.hold_id} is no longer pending")
        else:
            record_hold(self.conn, hold, month)

    def prepare_settle(self, hold_id: str, *, commit: bool) -> None:
        op = "commit" if commit else "release"
        if commit and self.durable:
            # Say durably that a commit is on its way before sending it: if this process dies
            # after the backend committed but before our commit, the hold still looks open
            # here, and only this row stops a deadline or a cancel from releasing it.
            self._mark_commit_sent(hold_id)
        response = self.client.call("POST", f"/holds/{hold_id}/{op}")
        if response.status_code in (200, 201, 204):
            return
        if response.status_code == 404 and not commit:
            return  # the backend never held it: nothing to release
        if commit and self.durable:
            self._unmark_commit_sent(hold_id)  # a refusal: the backend did not commit it
        raise refused(response.status_code, f"to {op} {hold_id}")

    def _mark_commit_sent(self, hold_id: str) -> None:
        # A side connection, committed at once, on a table our own transaction never locks
        # before this point (the settle deletes the row afterwards): it cannot wait on us.
        with self.conn.engine.connect() as side, side.begin():
            side.execute(pg_insert(billing_commits_sent).from_select(
                ["hold_id", "generation_id", "sent_at"],
                select(holds.c.hold_id, holds.c.generation_id,
                       literal(datetime.now(UTC), billing_commits_sent.c.sent_at.type))
                .where(holds.c.hold_id == hold_id)).on_conflict_do_nothing())

    def _unmark_commit_sent(self, hold_id: str) -> None:
        with self.conn.engine.connect() as side, side.begin():
            side.execute(delete(billing_commits_sent)
                         .where(billing_commits_sent.c.hold_id == hold_id))

    def commit_sent(self, hold_ids: Collection[str]) -> set[str]:
        if not self.durable or not hold_ids:
            return set()
        return set(self.conn.execute(
            select(billing_commits_sent.c.hold_id)
            .where(billing_commits_sent.c.hold_id.in_(list(hold_ids)))).scalars())

    def settle(self, hold_id: str, *, commit: bool, at: datetime) -> bool:
        settled = close_hold(self.conn, hold_id, commit=commit, at=at) is not None
        if self.durable:  # settled here, in the same transaction: no commit in flight any more
            self.conn.execute(delete(billing_commits_sent)
                              .where(billing_commits_sent.c.hold_id == hold_id))
        return settled

    def abandon(self) -> None:
        """The transaction that reserved holds rolled back: release them remotely."""
        for hold_id in self._reserved:
            try:
                response = self.client.call("POST", f"/holds/{hold_id}/release")
            except BillingUnavailable:
                response = None
            if response is not None and response.status_code in (200, 201, 204):
                if self.durable:
                    _mark_released(self.conn.engine, hold_id)
                continue
            # Not released yet — or "unknown hold", which may only mean that a reservation
            # request that timed out on our side is still being served: the pending row stays
            # and the reaper releases it once such a request must have finished.
            if not self.durable:
                log.error("could not release abandoned hold %s; release it by hand", hold_id)
        self._reserved = []

    def set_plan(self, user_id: str, plan: str, at: datetime) -> Account:
        raise ExternalBillingNotSupported("plans are managed by the external billing service")

    def grant(self, user_id: str, amount: Decimal, reason: str, at: datetime) -> Account:
        raise ExternalBillingNotSupported("credits are granted by the external billing service")
