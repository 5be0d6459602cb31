"""A result's retry waits on a timer, unacked, not in the worker (``messaging/deferred.py``).

The real ``QueueConsumer`` settle logic with a fake pika channel, ``ResultConsumer`` and the
message bus on SQLite; a broker whose ``redeliver`` (the confirmed republish) the test holds
back or makes fail. And the in-process broker end to end, as the embedded service runs it.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from messaging.broker import ATTEMPTS_HEADER, Delivery, Disposition, Settler
from messaging.consumer import ResultConsumer
from messaging.deferred import Later
from messaging.rabbitmq import consumer as rabbit_consumer
from messaging.rabbitmq.consumer import QueueConsumer
from saga.commands import ApplyResult, ApplyResults
from saga.messagebus import HANDLERS
from saga.messages import RESULTS_QUEUE
from saga.observer import NullObserver
from saga.retry import RetryPolicy
from standins.n8n import wait_for
from tests.conftest import FakeClock, World
from tests.unit.handlers.helpers import SAMPLES_READY, fund, one_job, sample_list, start
from tests.unit.test_consumer_ack import FakeChannel, FakeConnection, Recorder

LONG = RetryPolicy(base=60.0, cap=60.0, jitter=0, max_attempts=3)  # never over in a test
AT_ONCE = RetryPolicy(base=0.0, jitter=0, max_attempts=3)


class HeldBroker:
    """Records republishes; ``gate`` holds each until the test opens it (the confirm)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.gate = threading.Event()
        self.gate.set()
        self.refuse = False

    def redeliver(self, delivery: Delivery, headers: dict[str, Any]) -> None:
        self.recorder.log.append("republishing")
        assert self.gate.wait(10)
        if self.refuse:
            self.recorder.log.append("refused")
            raise ConnectionError("redelivery publish was not confirmed")
        self.recorder.log.append(("republished", headers[ATTEMPTS_HEADER]))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.recorder.log.append(("dead_letter", reason.split(":")[0]))


def a_saga(world: World, user: str) -> Delivery:
    fund(world, user)
    gen = start(world, user)
    body = {"event_type": SAMPLES_READY, "generation_id": gen["id"],
            "job_id": one_job(world)["job_id"], "samples": sample_list()}
    return Delivery(json.dumps(body).encode(), "generation.result.samples", f"m-{user}",
                    queue=RESULTS_QUEUE)


def gen_id(delivery: Delivery) -> str:
    return str(json.loads(delivery.body)["generation_id"])


@pytest.fixture
def busy_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Generation ids whose next ApplyResult fails transiently (billing answered 503)."""
    failing: list[str] = []
    original, original_batch = HANDLERS[ApplyResult], HANDLERS[ApplyResults]

    def busy(generation_id: str) -> None:
        if generation_id in failing:
            failing.remove(generation_id)
            raise OperationalError("UPDATE generations", {}, Exception("server closed"))

    def handler(ctx: Any, cmd: ApplyResult, idem: Any) -> Any:
        busy(cmd.generation_id)
        return original(ctx, cmd, idem)

    def batch_handler(ctx: Any, cmd: ApplyResults, idem: Any) -> Any:
        for one in cmd.results:
            busy(one.generation_id)
        return original_batch(ctx, cmd, idem)

    monkeypatch.setitem(HANDLERS, ApplyResult, handler)
    monkeypatch.setitem(HANDLERS, ApplyResults, batch_handler)
    monkeypatch.setattr(rabbit_consumer, "RETRY_PAUSE_S", 0.0)
    return failing


def wired(world: World, broker: Any, retry: RetryPolicy) -> tuple[ResultConsumer,
                                                                   QueueConsumer]:
    results = ResultConsumer(world.bus, broker, NullObserver(), retry)
    consumer = QueueConsumer("amqp://guest:guest@127.0.0.1:1/none", RESULTS_QUEUE,
                             prefetch=10, workers=1, max_batch=10,
                             batch_handler=results.handle_batch)
    return results, consumer


def test_the_worker_goes_on_and_the_original_is_acked_only_after_its_copy_is_confirmed(
        world: World, busy_once: list[str]) -> None:
    recorder = Recorder()
    broker = HeldBroker(recorder)
    broker.gate.clear()  # the broker has not confirmed the copy yet
    results, consumer = wired(world, broker, AT_ONCE)
    slow, healthy = a_saga(world, "u-slow"), a_saga(world, "u-ok")
    busy_once.append(gen_id(slow))
    channel = FakeChannel(recorder)

    consumer._work_batch([(FakeConnection(), channel, 1, slow)])  # returns: nothing waits
    consumer._work_batch([(FakeConnection(), channel, 2, healthy)])
    wait_for(lambda: "republishing" in recorder.log, timeout=5, message="the republish")

    assert ("ack", 2) in recorder.log  # the healthy one, while the slow one's copy is unconfirmed
    assert not any(e == ("ack", 1) or e[0] == "nack" for e in recorder.log if isinstance(e, tuple))
    assert world.queries.get(gen_id(healthy))["state"] == "awaiting_selection"

    broker.gate.set()
    assert results.later.wait_idle(5)
    slow_events = [e for e in recorder.log if e in ("republishing", ("republished", 1),
                                                    ("ack", 1))]
    assert slow_events == ["republishing", ("republished", 1), ("ack", 1)]


def test_a_refused_copy_hands_the_original_back_unchanged(
        world: World, busy_once: list[str]) -> None:
    recorder = Recorder()
    broker = HeldBroker(recorder)
    broker.refuse = True
    results, consumer = wired(world, broker, AT_ONCE)
    slow = a_saga(world, "u-slow")
    busy_once.append(gen_id(slow))

    consumer._work_batch([(FakeConnection(), FakeChannel(recorder), 5, slow)])
    assert results.later.wait_idle(5)

    assert recorder.log == ["republishing", "refused", ("nack", 5, True)]
    assert world.queries.get(gen_id(slow))["state"] == "processing_samples"


def test_a_batch_member_that_fails_transiently_is_deferred_alone(
        world: World, busy_once: list[str]) -> None:
    recorder = Recorder()
    broker = HeldBroker(recorder)
    results, consumer = wired(world, broker, LONG)
    deliveries = [a_saga(world, f"u-{n}") for n in range(3)]
    busy_once.append(gen_id(deliveries[1]))  # fails in the batch, and once more alone
    busy_once.append(gen_id(deliveries[1]))
    channel = FakeChannel(recorder)

    consumer._work_batch([(FakeConnection(), channel, n + 1, d)
                          for n, d in enumerate(deliveries)])

    assert recorder.log == [("ack", 1), ("ack", 3)]  # the middle one waits, unacked
    assert results.waiting() == 1
    results.stop()  # dropped, unrun
    assert results.waiting() == 0
    assert recorder.log == [("ack", 1), ("ack", 3)]  # never acked: the broker redelivers it
    assert world.queries.get(gen_id(deliveries[1]))["state"] == "processing_samples"


def test_a_budget_that_is_spent_still_dead_letters_and_parks_at_once(
        world: World, busy_once: list[str]) -> None:
    recorder = Recorder()
    results, consumer = wired(world, HeldBroker(recorder), LONG)
    slow = a_saga(world, "u-slow")
    slow.headers[ATTEMPTS_HEADER] = 3  # the budget (3) is spent
    busy_once.append(gen_id(slow))

    consumer._work_batch([(FakeConnection(), FakeChannel(recorder), 4, slow)])

    assert recorder.log == [("dead_letter", "retry_budget_exhausted"), ("ack", 4)]
    assert results.waiting() == 0
    assert world.queries.get(gen_id(slow))["attention"]["kind"] == "result"


def test_stop_leaves_a_waiting_retry_unacked_on_the_in_process_broker(
        world: World, busy_once: list[str]) -> None:
    """The embedded service: healthy results flow past the waiting one; at stop the waiting
    one goes back to its queue, as RabbitMQ would redeliver it, with the count it came with."""
    broker = world.broker
    results = ResultConsumer(world.bus, broker, NullObserver(), LONG)
    slow = a_saga(world, "u-slow")
    healthy = [a_saga(world, f"u-{n}") for n in range(3)]
    busy_once.append(gen_id(slow))
    broker.queues[RESULTS_QUEUE].put(slow)
    broker.consume_batches(RESULTS_QUEUE, results.handle_batch, max_batch=10)
    wait_for(lambda: results.waiting() == 1, timeout=5, message="the slow one deferred")
    for delivery in healthy:
        broker.queues[RESULTS_QUEUE].put(delivery)
    healthy_ids = [gen_id(d) for d in healthy]
    wait_for(lambda: all(world.queries.get(g)["state"] == "awaiting_selection"
                         for g in healthy_ids), timeout=5, message="the healthy ones applied")
    assert results.waiting() == 1
    assert world.queries.get(gen_id(slow))["state"] == "processing_samples"

    results.stop()
    broker.stop()

    (back,) = list(broker.queues[RESULTS_QUEUE].queue)
    assert back.message_id == slow.message_id and back.redelivered
    assert ATTEMPTS_HEADER not in back.headers  # not republished: the same message


def test_the_in_process_broker_puts_a_refused_copy_back_and_applies_it_later(
        sqlite_engine: Engine, clock: FakeClock, busy_once: list[str]) -> None:
    world = World(sqlite_engine, clock)
    results = ResultConsumer(world.bus, world.broker, NullObserver(), AT_ONCE)
    slow = a_saga(world, "u-slow")
    busy_once.append(gen_id(slow))
    world.broker.consume_batches(RESULTS_QUEUE, results.handle_batch, max_batch=10)
    try:
        world.broker.queues[RESULTS_QUEUE].put(slow)
        wait_for(lambda: world.queries.get(gen_id(slow))["state"] == "awaiting_selection",
                 timeout=5, message="the retry applied")
    finally:
        results.stop()
        world.broker.stop()
    assert list(world.broker.queues[RESULTS_QUEUE].queue) == []  # acked, nothing left


# ------------------------------------------------------------------ the pieces on their own
def test_a_settler_settles_once() -> None:
    seen: list[Disposition] = []
    settler = Settler(seen.append)
    settler(Disposition.ACK)
    settler(Disposition.RETRY)
    assert seen == [Disposition.ACK] and settler.settled() and not settler.claim()


def test_a_deferred_delivery_the_worker_settled_already_is_not_settled_again() -> None:
    """A batch handler that deferred one delivery and then raised: every delivery goes back
    (nack); the deferred job's later settle must not ack a tag already nacked."""
    recorder = Recorder()
    kept: list[Any] = []

    def defers_then_breaks(deliveries: Any) -> list[Disposition]:
        kept.append(deliveries[0].settle)
        raise RuntimeError("a bug")

    consumer = QueueConsumer("amqp://guest:guest@127.0.0.1:1/none", RESULTS_QUEUE,
                             prefetch=10, workers=1, batch_handler=defers_then_breaks,
                             max_batch=4)
    consumer._loop.stopping.set()  # no retry pause
    consumer._work_batch([(FakeConnection(), FakeChannel(recorder), 1, Delivery(b"x", "k"))])
    kept[0](Disposition.ACK)
    assert recorder.log == [("nack", 1, True)]


def test_later_runs_jobs_in_due_order_and_applies_back_pressure_at_its_limit() -> None:
    later = Later("t", limit=2)
    ran: list[str] = []
    release = threading.Event()
    assert later.call_later(0.05, lambda: ran.append("second"))
    assert later.call_later(0.0, lambda: (release.wait(5), ran.append("first")))
    third_taken = threading.Event()
    threading.Thread(target=lambda: (later.call_later(0.0, lambda: ran.append("third")),
                                     third_taken.set()), daemon=True).start()
    time.sleep(0.2)
    assert not third_taken.is_set()  # two pending: the caller waits for a slot
    release.set()
    assert third_taken.wait(5)
    assert later.wait_idle(5)
    assert ran == ["first", "second", "third"]


def test_later_drops_what_waits_at_stop_and_takes_nothing_after() -> None:
    later = Later("t", limit=5)
    ran: list[str] = []
    assert later.call_later(60, lambda: ran.append("late"))
    assert later.stop() == 1
    assert later.call_later(0, lambda: ran.append("after stop")) is False
    time.sleep(0.05)
    assert ran == []
