"""The result consumer's group commit on PostgreSQL (the checks of
``tests/unit/test_consumer_batch.py``): one statement locks the batch's sagas, one records
its inbox keys, the rows go in the unit of work's one flush; one bad result stays alone."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from messaging.rabbitmq import consumer as rabbit_consumer
from tests.conftest import FakeClock
from tests.unit.test_consumer_batch import CHECKS, Wired

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__[6:] for c in CHECKS])
def test_on_postgresql(check: Any, pg_engine: Engine, clock: FakeClock,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rabbit_consumer, "RETRY_PAUSE_S", 0.0)
    check(Wired(pg_engine, clock))
