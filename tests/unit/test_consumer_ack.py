"""The result consumer acknowledges a delivery only after the saga's transaction committed.

The real pieces — ``QueueConsumer`` (the RabbitMQ adapter's settle logic), ``ResultConsumer``
and the message bus on SQLite — with a fake pika channel that records acks and nacks, and a
unit of work that records its commit or fails at it (the database went away at COMMIT).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from messaging.broker import Delivery
from messaging.consumer import ResultConsumer
from messaging.rabbitmq import consumer as rabbit_consumer
from messaging.rabbitmq.consumer import QueueConsumer
from persistence.uow import SqlUnitOfWork
from saga.messagebus import MessageBus
from saga.observer import NullObserver
from saga.retry import RetryPolicy
from tests.conftest import TEST_CONFIG, FakeClock, World
from tests.unit.handlers.helpers import SAMPLES_READY, fund, one_job, sample_list, start


class Recorder:
    def __init__(self) -> None:
        self.log: list[Any] = []
        self.fail_commit = False


class RecordingUnitOfWork(SqlUnitOfWork):
    recorder: Recorder

    def commit(self) -> None:
        if self.recorder.fail_commit:
            self.recorder.log.append("commit failed")
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        super().commit()
        self.recorder.log.append("committed")


class FakeChannel:
    is_open = True

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def basic_ack(self, tag: int) -> None:
        self.recorder.log.append(("ack", tag))

    def basic_nack(self, tag: int, requeue: bool) -> None:
        self.recorder.log.append(("nack", tag, requeue))


class FakeConnection:
    def add_callback_threadsafe(self, callback: Any) -> None:
        callback()  # the I/O thread runs it; here, at once


@pytest.fixture
def wired(sqlite_engine: Engine, clock: FakeClock,
          monkeypatch: pytest.MonkeyPatch) -> tuple[World, Recorder, QueueConsumer]:
    world, recorder, queue_consumer, _ = wired_with_results(sqlite_engine, clock, monkeypatch)
    return world, recorder, queue_consumer


def wired_with_results(sqlite_engine: Engine, clock: FakeClock,
                       monkeypatch: pytest.MonkeyPatch
                       ) -> tuple[World, Recorder, QueueConsumer, ResultConsumer]:
    monkeypatch.setattr(rabbit_consumer, "RETRY_PAUSE_S", 0.0)
    world = World(sqlite_engine, clock)
    recorder = Recorder()

    def uow() -> SqlUnitOfWork:
        unit = RecordingUnitOfWork(sqlite_engine)
        unit.recorder = recorder
        return unit

    bus = MessageBus(uow, TEST_CONFIG, clock=clock)
    results = ResultConsumer(bus, world.broker, NullObserver(),
                             RetryPolicy(base=0.01, jitter=0, max_attempts=8))
    queue_consumer = QueueConsumer("amqp://guest:guest@127.0.0.1:1/none",
                                   "orchestrator.generation.results", results.handle,
                                   prefetch=1, workers=1)
    return world, recorder, queue_consumer, results


def samples_delivery(world: World) -> tuple[str, Delivery]:
    fund(world)
    gen = start(world)
    job = one_job(world)
    body = {"event_type": SAMPLES_READY, "generation_id": gen["id"], "job_id": job["job_id"],
            "samples": sample_list()}
    return gen["id"], Delivery(json.dumps(body).encode(), "generation.result.samples", "e-1")


def test_the_ack_follows_the_commit(wired: tuple[World, Recorder, QueueConsumer]) -> None:
    world, recorder, consumer = wired
    gen_id, delivery = samples_delivery(world)

    consumer._work(FakeConnection(), FakeChannel(recorder), 7, delivery)

    assert recorder.log == ["committed", ("ack", 7)]
    assert world.queries.get(gen_id)["state"] == "awaiting_selection"


def test_a_commit_that_fails_is_not_acked_but_requeued(
        sqlite_engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    world, recorder, consumer, results = wired_with_results(sqlite_engine, clock, monkeypatch)
    gen_id, delivery = samples_delivery(world)
    recorder.fail_commit = True

    consumer._work(FakeConnection(), FakeChannel(recorder), 8, delivery)
    # A transient failure: unsettled while its backoff runs; then the republish (which
    # needs a queue this delivery lacks) fails, so it goes back to the broker unacked.
    assert results.later.wait_idle(5)

    assert recorder.log == ["commit failed", ("nack", 8, True)]
    assert world.queries.get(gen_id)["state"] == "processing_samples"  # nothing applied

    recorder.fail_commit = False  # the redelivery, once the database is back, applies it
    consumer._work(FakeConnection(), FakeChannel(recorder), 9, delivery)
    assert recorder.log[-2:] == ["committed", ("ack", 9)]
    assert world.queries.get(gen_id)["state"] == "awaiting_selection"
