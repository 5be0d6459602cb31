"""A batch's acks go out as one ``multiple`` ack only when that covers nothing still open.

``basic_ack(tag, multiple=True)`` acks *every* unacked delivery of the channel up to ``tag``,
so one that another worker is still applying, or a result waiting (unacked) for its retry,
would be acked before its transaction committed — and lost if the process died then. The
RabbitMQ adapter's ``QueueConsumer`` tracks its channel's open deliveries on the I/O thread;
the fake channel here acts as the broker does (an ack of an unknown tag is a channel error,
a multiple ack takes everything up to its tag) and fails the test if an ack ever takes a
delivery whose handler has not finished with ACK.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messaging.broker import Delivery, Disposition
from messaging.rabbitmq import consumer as rabbit_consumer
from messaging.rabbitmq.consumer import QueueConsumer


@pytest.fixture(autouse=True)
def no_retry_pause() -> Iterator[None]:
    with mock.patch.object(rabbit_consumer, "RETRY_PAUSE_S", 0.0):
        yield


class BrokerChannel:
    """The broker's view of one channel: which deliveries are unacked."""

    is_open = True

    def __init__(self) -> None:
        self.unacked: set[int] = set()
        self.done: set[int] = set()  # handlers finished with ACK (after their commit)
        self.acked: list[int] = []  # in the order the broker took them
        self.requeued: list[int] = []
        self.frames: list[tuple[str, int, bool]] = []

    def deliver(self, tag: int) -> None:
        self.unacked.add(tag)

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.frames.append(("ack", tag, multiple))
        if tag not in self.unacked:
            raise AssertionError(f"PRECONDITION_FAILED - unknown delivery tag {tag}")
        taken = {t for t in self.unacked if t <= tag} if multiple else {tag}
        early = taken - self.done
        assert not early, f"ack of {tag} (multiple={multiple}) took open deliveries {early}"
        self.unacked -= taken
        self.acked.extend(sorted(taken))

    def basic_nack(self, tag: int, requeue: bool) -> None:
        self.frames.append(("nack", tag, requeue))
        assert tag in self.unacked
        self.unacked.discard(tag)
        self.requeued.append(tag)


class NowConnection:
    def add_callback_threadsafe(self, callback: Any) -> None:
        callback()  # the I/O thread runs it; here, at once


class Scripted:
    """A batch handler answering by message id; it marks ACKed deliveries done first."""

    def __init__(self, channel: BrokerChannel, outcomes: dict[str, Disposition]) -> None:
        self.channel = channel
        self.outcomes = outcomes
        self.kept: dict[int, Delivery] = {}  # DEFERRED: settled later by the test

    def __call__(self, deliveries: Sequence[Delivery]) -> list[Disposition]:
        answers = []
        for d in deliveries:
            outcome = self.outcomes.get(d.message_id or "", Disposition.ACK)
            tag = int(d.message_id or 0)
            if outcome is Disposition.ACK:
                self.channel.done.add(tag)  # committed
            elif outcome is Disposition.DEFERRED:
                self.kept[tag] = d
            answers.append(outcome)
        return answers


def consumer_on(channel: BrokerChannel, outcomes: dict[str, Disposition] | None = None
                ) -> tuple[QueueConsumer, Scripted]:
    handler = Scripted(channel, outcomes or {})
    consumer = QueueConsumer("amqp://guest:guest@127.0.0.1:1/none", "q", prefetch=200,
                             workers=1, batch_handler=handler, max_batch=50)
    consumer._track(channel)  # what the session does with its channel
    return consumer, handler


def arrive(consumer: QueueConsumer, channel: BrokerChannel, *tags: int) -> list[Any]:
    """Deliveries arriving on the I/O thread, as pika hands them to the consumer."""
    conn = NowConnection()
    for tag in tags:
        channel.deliver(tag)
        consumer._on_message(conn, channel,  # type: ignore[arg-type]
                             SimpleNamespace(delivery_tag=tag, routing_key="k",  # type: ignore[arg-type]
                                             redelivered=False),
                             SimpleNamespace(headers=None, message_id=str(tag)),  # type: ignore[arg-type]
                             b"{}")
    items, consumer._arrived = consumer._arrived, []
    return items


def test_a_batch_that_is_all_done_is_acked_with_one_multiple_ack() -> None:
    channel = BrokerChannel()
    consumer, _ = consumer_on(channel)
    consumer._work_batch(arrive(consumer, channel, 1, 2, 3, 4, 5))
    assert channel.frames == [("ack", 5, True)]
    assert channel.unacked == set()


def test_a_batch_never_acks_another_workers_deliveries_still_being_applied() -> None:
    channel = BrokerChannel()
    consumer, _ = consumer_on(channel)
    first = arrive(consumer, channel, 1, 2, 3)  # a worker is still applying these
    consumer._work_batch(arrive(consumer, channel, 4, 5, 6))
    assert channel.frames == [("ack", 4, False), ("ack", 5, False), ("ack", 6, False)]
    assert channel.unacked == {1, 2, 3}
    consumer._work_batch(first)
    assert channel.frames[-1] == ("ack", 3, True)
    assert channel.unacked == set()


def test_a_result_waiting_for_its_retry_stays_unacked_under_its_neighbours_acks() -> None:
    channel = BrokerChannel()
    consumer, handler = consumer_on(channel, {"3": Disposition.DEFERRED,
                                              "5": Disposition.RETRY})
    consumer._work_batch(arrive(consumer, channel, 1, 2, 3, 4, 5, 6))
    assert channel.unacked == {3}
    assert channel.requeued == [5]
    assert ("ack", 2, True) in channel.frames  # 1 and 2 in one
    assert channel.acked == [1, 2, 4, 6]
    channel.done.add(3)  # its republish was confirmed: the timer settles it
    deferred = handler.kept[3].settle
    assert deferred is not None
    deferred(Disposition.ACK)
    assert channel.unacked == set()
    assert channel.frames[-1] == ("ack", 3, False)


def test_a_channel_it_does_not_track_gets_one_ack_per_delivery() -> None:
    channel = BrokerChannel()
    consumer, _ = consumer_on(channel)
    consumer._track(None)  # the session ended (or deliveries were handed in by hand)
    for tag in (1, 2):
        channel.deliver(tag)
    consumer._work_batch([(NowConnection(), channel, tag, Delivery(b"{}", "k", str(tag)))
                          for tag in (1, 2)])
    assert channel.frames == [("ack", 1, False), ("ack", 2, False)]


OUTCOMES = st.sampled_from([Disposition.ACK] * 6 + [Disposition.RETRY, Disposition.DEFERRED])


@settings(max_examples=200, deadline=None)
@given(outcomes=st.lists(OUTCOMES, min_size=1, max_size=30), data=st.data())
def test_any_interleaving_acks_each_delivery_once_and_only_after_it_is_done(
        outcomes: list[Disposition], data: st.DataObject) -> None:
    """Deliveries arrive in reads, go to workers in batches that finish in any order, and
    deferred ones settle whenever: no ack takes an open delivery (the channel asserts it),
    none is acked twice, and in the end every delivery was acked or requeued once."""
    channel = BrokerChannel()
    consumer, handler = consumer_on(channel, {str(n + 1): o for n, o in enumerate(outcomes)})
    tags = list(range(1, len(outcomes) + 1))
    pending: list[list[Any]] = []  # batches handed to workers, not yet finished
    while tags or pending or handler.kept:
        moves = (["arrive"] if tags else []) + (["finish"] if pending else []) + (
            ["settle"] if handler.kept else [])
        move = data.draw(st.sampled_from(moves))
        if move == "arrive":
            n = data.draw(st.integers(1, len(tags)))
            items = arrive(consumer, channel, *tags[:n])
            del tags[:n]
            cut = data.draw(st.integers(1, len(items)))
            pending += [b for b in (items[:cut], items[cut:]) if b]
        elif move == "finish":
            batch = pending.pop(data.draw(st.integers(0, len(pending) - 1)))
            consumer._work_batch(batch)
        else:
            tag = data.draw(st.sampled_from(sorted(handler.kept)))
            settle = handler.kept.pop(tag).settle
            assert settle is not None
            channel.done.add(tag)
            settle(Disposition.ACK)
    assert channel.unacked == set()
    assert sorted(channel.acked + channel.requeued) == list(range(1, len(outcomes) + 1))
    assert consumer._unsettled == set()
