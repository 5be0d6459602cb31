"""``SqlUnitOfWork.rollback()`` undoes what billing did outside the database, like ``__exit__``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine

from persistence.ledger import SqlLedger
from persistence.uow import SqlUnitOfWork


class RecordingBilling(SqlLedger):
    """The built-in ledger, counting ``abandon()`` calls (external billing releases there)."""

    abandoned = 0

    def abandon(self) -> None:
        RecordingBilling.abandoned += 1


def factory(conn: Connection) -> Any:
    return RecordingBilling(conn)


def test_explicit_rollback_abandons_billing_once(sqlite_engine: Engine) -> None:
    RecordingBilling.abandoned = 0
    with SqlUnitOfWork(sqlite_engine, factory) as uow:
        uow.rollback()
        assert RecordingBilling.abandoned == 1
    assert RecordingBilling.abandoned == 1  # leaving the block does not abandon twice


def test_leaving_without_commit_still_abandons(sqlite_engine: Engine) -> None:
    RecordingBilling.abandoned = 0
    with SqlUnitOfWork(sqlite_engine, factory):
        pass
    assert RecordingBilling.abandoned == 1


def test_commit_does_not_abandon(sqlite_engine: Engine) -> None:
    RecordingBilling.abandoned = 0
    with SqlUnitOfWork(sqlite_engine, factory) as uow:
        uow.commit()
    assert RecordingBilling.abandoned == 0
