"""The result consumer's group commit: the deliveries that are ready, in one transaction.

The real pieces — ``QueueConsumer`` (the RabbitMQ adapter's batching and settling),
``ResultConsumer.handle_batch`` and the message bus — on SQLite here and on PostgreSQL in
``tests/integration/test_consumer_batch_pg.py`` (the same checks; PostgreSQL locks the
batch's sagas and records its inbox keys in one statement each). A fake pika channel records
acks and nacks; the unit of work records its commits, or fails at COMMIT.
"""

from __future__ import annotations

import json
import queue
from typing import Any

import pytest
from sqlalchemy import Engine, update

from messaging.broker import Delivery, Disposition
from messaging.consumer import ResultConsumer
from messaging.rabbitmq import consumer as rabbit_consumer
from messaging.rabbitmq.consumer import QueueConsumer
from persistence.tables import generations
from persistence.uow import SqlUnitOfWork
from saga.messagebus import MessageBus
from saga.messages import DEAD_LETTER_QUEUE
from saga.retry import RetryPolicy
from tests.conftest import TEST_CONFIG, FakeClock, World
from tests.unit.handlers.helpers import (
    SAMPLES_READY,
    account,
    credit_ops,
    fund,
    one_job,
    rejections,
    sample_list,
    start,
)
from tests.unit.test_consumer_ack import (
    FakeChannel,
    FakeConnection,
    Recorder,
    RecordingUnitOfWork,
)

RESULTS = "orchestrator.generation.results"


class CountingObserver:
    def __init__(self) -> None:
        self.counts: list[tuple[str, dict[str, str]]] = []

    def count(self, name: str, **labels: str) -> None:
        self.counts.append((name, labels))

    def batches(self) -> list[str]:
        return [labels["outcome"] for name, labels in self.counts if name == "result_batches"]


class Wired:
    def __init__(self, engine: Engine, clock: FakeClock) -> None:
        self.world = World(engine, clock)
        self.recorder = Recorder()
        self.observer = CountingObserver()

        def uow() -> SqlUnitOfWork:
            unit = RecordingUnitOfWork(engine)
            unit.recorder = self.recorder
            return unit

        bus = MessageBus(uow, TEST_CONFIG, clock=clock)
        self.results = ResultConsumer(bus, self.world.broker, self.observer,
                                      RetryPolicy(base=0.01, jitter=0, max_attempts=8))
        self.consumer = QueueConsumer("amqp://guest:guest@127.0.0.1:1/none", RESULTS,
                                      prefetch=10, workers=1, max_batch=10,
                                      batch_handler=self.results.handle_batch)

    def deliver(self, deliveries: list[Delivery], first_tag: int = 1) -> None:
        """What one worker does with a batch: handle it, then settle every delivery."""
        channel = FakeChannel(self.recorder)
        self.consumer._work_batch([(FakeConnection(), channel, first_tag + n, d)
                                   for n, d in enumerate(deliveries)])

    def started(self, user: str) -> tuple[str, str]:
        fund(self.world, user)
        gen = start(self.world, user)
        return gen["id"], one_job(self.world)["job_id"]

    def dead_letters(self) -> list[str]:
        q = self.world.broker.queues[DEAD_LETTER_QUEUE]
        found = []
        while not q.empty():
            found.append(q.get_nowait().headers["x-rejection-reason"])
        return found


def samples(gen_id: str, job_id: str, message_id: str, *, redelivered: bool = False
            ) -> Delivery:
    body = {"event_type": SAMPLES_READY, "generation_id": gen_id, "job_id": job_id,
            "samples": sample_list()}
    return Delivery(json.dumps(body).encode(), "generation.result.samples", message_id,
                    redelivered=redelivered, queue=None)


def commits_then_acks(log: list[Any]) -> tuple[list[Any], list[Any]]:
    """Split the log where the first settle happens; every settle must come after."""
    first = next(i for i, e in enumerate(log) if isinstance(e, tuple))
    assert all(isinstance(e, tuple) for e in log[first:]), log
    return log[:first], log[first:]


# ------------------------------------------------------------------ the checks (both tiers)
def check_a_batch_is_one_transaction_acked_after_its_commit(wired: Wired) -> None:
    sagas = [wired.started(f"u-{n}") for n in range(3)]
    wired.recorder.log.clear()

    wired.deliver([samples(gid, job, f"m-{n}") for n, (gid, job) in enumerate(sagas)])

    before, settles = commits_then_acks(wired.recorder.log)
    assert before == ["committed"]  # one transaction for the three of them
    assert settles == [("ack", 1), ("ack", 2), ("ack", 3)]
    assert wired.observer.batches() == ["committed"]
    for gid, _ in sagas:
        assert wired.world.queries.get(gid)["state"] == "awaiting_selection"


def check_one_poison_among_good_ones_is_dead_lettered_and_parked_alone(wired: Wired) -> None:
    good = [wired.started(f"g-{n}") for n in range(3)]
    bad_id, bad_job = wired.started("bad")
    with wired.world.engine.begin() as conn:  # its row no longer loads: a permanent failure
        conn.execute(update(generations).where(generations.c.id == bad_id)
                     .values(body={"broken": True}))
    wired.recorder.log.clear()
    batch = [samples(good[0][0], good[0][1], "m-1"), samples(bad_id, bad_job, "m-bad"),
             Delivery(b"\xff not json", "generation.result.samples", "m-junk"),
             samples(good[1][0], good[1][1], "m-2"), samples(good[2][0], good[2][1], "m-3")]

    wired.deliver(batch)

    before, settles = commits_then_acks(wired.recorder.log)
    assert settles == [("ack", n) for n in range(1, 6)]  # each exactly once, after the work
    # The batch failed as a whole (nothing of it stays), then each went on its own:
    # three results committed, and the parking of the bad one.
    assert before == ["committed"] * 4
    assert wired.observer.batches() == ["split"]
    for gid, _ in good:
        assert wired.world.queries.get(gid)["state"] == "awaiting_selection"
    reasons = sorted(r.split(":")[0] for r in wired.dead_letters())
    assert reasons == ["not_json", "processing_error"]
    with wired.world.engine.connect() as conn:
        row = conn.execute(generations.select().where(generations.c.id == bad_id)).one()
    assert (row.attention_kind, row.state) == ("result", "processing_samples")


def check_duplicates_inside_one_batch_are_applied_once(wired: Wired) -> None:
    (gid, job), (other, other_job) = wired.started("u-1"), wired.started("u-2")
    wired.recorder.log.clear()

    wired.deliver([samples(gid, job, "m-1"), samples(other, other_job, "m-2"),
                   samples(gid, job, "m-1", redelivered=True),
                   samples(gid, job, "m-1", redelivered=True)])

    before, settles = commits_then_acks(wired.recorder.log)
    assert before == ["committed"]
    assert [s[0] for s in settles] == ["ack"] * 4
    view = wired.world.queries.get(gid)
    assert view["state"] == "awaiting_selection"
    assert credit_ops(wired.world, gid) == [("reserve", "samples", "0.25"),
                                            ("commit", "samples", "0.25")]  # charged once
    assert rejections(wired.world, gid) == ["duplicate", "duplicate"]
    assert account(wired.world, "u-1")["balance"] == "9.75"
    assert wired.world.queries.get(other)["state"] == "awaiting_selection"

    # Delivered again in a later batch: still a duplicate, nothing moves.
    wired.deliver([samples(gid, job, "m-1", redelivered=True), samples(other, other_job, "m-2")],
                  first_tag=10)
    assert rejections(wired.world, gid) == ["duplicate"] * 3
    assert rejections(wired.world, other) == ["duplicate"]
    assert account(wired.world, "u-1")["balance"] == "9.75"


def check_a_batch_whose_commit_fails_is_handed_back_whole(wired: Wired) -> None:
    sagas = [wired.started(f"u-{n}") for n in range(2)]
    wired.recorder.log.clear()
    wired.recorder.fail_commit = True

    batch = [samples(gid, job, f"m-{n}") for n, (gid, job) in enumerate(sagas)]
    wired.deliver(batch)
    assert wired.results.later.wait_idle(5)  # the two retries' backoff

    # The batch, then each on its own, failed at COMMIT; the republish a transient failure
    # gets (after its backoff, off the worker) needs a queue these deliveries lack, so both
    # go back to the broker unacked. Each nack comes from its own retry timer, so the nacks'
    # order, and where they fall among the one-by-one attempts, is not fixed.
    log = wired.recorder.log
    assert log[0] == "commit failed"  # the batch's own attempt comes first
    assert sorted(log, key=repr) == sorted(
        ["commit failed"] * 3 + [("nack", 1, True), ("nack", 2, True)], key=repr)
    for gid, _ in sagas:
        assert wired.world.queries.get(gid)["state"] == "processing_samples"

    wired.recorder.fail_commit = False  # redelivered once the database is back
    wired.recorder.log.clear()
    wired.deliver(batch, first_tag=3)
    assert wired.recorder.log == ["committed", ("ack", 3), ("ack", 4)]
    for gid, _ in sagas:
        assert wired.world.queries.get(gid)["state"] == "awaiting_selection"


CHECKS = [check_a_batch_is_one_transaction_acked_after_its_commit,
          check_one_poison_among_good_ones_is_dead_lettered_and_parked_alone,
          check_duplicates_inside_one_batch_are_applied_once,
          check_a_batch_whose_commit_fails_is_handed_back_whole]


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__[6:] for c in CHECKS])
def test_on_sqlite(check: Any, sqlite_engine: Engine, clock: FakeClock,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rabbit_consumer, "RETRY_PAUSE_S", 0.0)
    check(Wired(sqlite_engine, clock))


# ------------------------------------------------------------------ batching in the adapter
def test_a_worker_takes_what_is_ready_up_to_the_batch_size() -> None:
    seen: list[list[str]] = []

    def handler(deliveries: Any) -> list[Disposition]:
        seen.append([d.body.decode() for d in deliveries])
        return [Disposition.ACK] * len(deliveries)

    consumer = QueueConsumer("amqp://guest:guest@127.0.0.1:1/none", RESULTS, prefetch=10,
                             workers=1, batch_handler=handler, max_batch=4)
    channel = FakeChannel(Recorder())
    conn = FakeConnection()
    # What three reads of the socket brought, handed over as the I/O thread does.
    for reads in (["a", "b"], ["c", "d", "e"], ["f"]):
        consumer._arrived = [(conn, channel, n, Delivery(x.encode(), "k"))
                             for n, x in enumerate(reads)]
        consumer._hand_over()
    consumer.work.put(None)
    consumer._worker()  # returns at the stop marker, after the work before it
    assert seen == [["a", "b", "c", "d"], ["e", "f"]]


def test_the_hand_over_splits_a_large_read_into_batches() -> None:
    consumer = QueueConsumer("amqp://guest:guest@127.0.0.1:1/none", RESULTS, prefetch=10,
                             workers=1, batch_handler=lambda ds: [], max_batch=2)
    consumer._arrived = [(None, None, n, Delivery(b"x", "k")) for n in range(5)]
    consumer._hand_over()
    sizes = []
    while True:
        try:
            item = consumer.work.get_nowait()
        except queue.Empty:
            break
        assert item is not None
        sizes.append(len(item))
    assert sizes == [2, 2, 1] and consumer._arrived == []


def test_a_batch_handler_that_raises_hands_every_delivery_back() -> None:
    recorder = Recorder()

    def broken(deliveries: Any) -> list[Disposition]:
        raise RuntimeError("a bug")

    consumer = QueueConsumer("amqp://guest:guest@127.0.0.1:1/none", RESULTS, prefetch=10,
                             workers=1, batch_handler=broken, max_batch=4)
    consumer._loop.stopping.set()  # no retry pause
    channel = FakeChannel(recorder)
    consumer._work_batch([(FakeConnection(), channel, n, Delivery(b"x", "k"))
                          for n in (1, 2)])
    assert recorder.log == [("nack", 1, True), ("nack", 2, True)]
