"""The outbox's central guarantee: a row is marked sent only once the broker confirmed it.

The broker stub answers each message with a scripted outcome — confirmed, nacked, returned
as unroutable, or no confirm before the timeout — the way the RabbitMQ adapter reports them
through the ``Broker`` port (one flag per message, True only for a confirm). The relay and
the real SQL outbox store (SQLite) must mark exactly the confirmed rows sent and leave every
other row unsent, to go out on a later pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, select

from messaging.broker import Delivery, Disposition
from messaging.relay import OutboxRelay
from persistence.outbox_store import SqlOutboxStore
from persistence.tables import outbox
from persistence.uow import SqlUnitOfWork
from saga.messages import NOTIFICATION_EXCHANGE, OutboundMessage
from saga.observer import NullObserver

AT = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
# What the stub answers the first time it sees each message; later, everything is confirmed.
FIRST_OUTCOMES = {
    "m-confirmed-1": "confirmed", "m-nacked": "nacked", "m-confirmed-2": "confirmed",
    "m-returned": "returned", "m-timed-out": "timed_out", "m-confirmed-3": "confirmed",
}


class ScriptedBroker:
    """A ``Broker`` whose confirms follow a script, message by message."""

    def __init__(self, first: dict[str, str]) -> None:
        self.first = dict(first)
        self.calls: list[list[str]] = []
        self.raise_next = False

    def publish(self, messages: Sequence[OutboundMessage]) -> list[bool]:
        ids = [m.message_id for m in messages]
        self.calls.append(ids)
        if self.raise_next:  # the connection dropped mid-batch
            self.raise_next = False
            raise ConnectionError("connection lost while waiting for confirms")
        return [self.first.pop(i, "confirmed") == "confirmed" for i in ids]

    def start(self) -> None: ...
    def dead_letter(self, delivery: Delivery, reason: str) -> None: ...
    def consume(self, queue: str, handler: object) -> None: ...
    def healthy(self) -> bool:
        return True
    def stop(self) -> None: ...
    close = stop

    def published(self, message_id: str) -> int:
        return sum(ids.count(message_id) for ids in self.calls)

    def handle(self, delivery: Delivery) -> Disposition:
        return Disposition.ACK


def add_rows(engine: Engine, ids: list[str]) -> None:
    with SqlUnitOfWork(engine) as uow:
        for message_id in ids:
            uow.outbox.add(OutboundMessage(NOTIFICATION_EXCHANGE, "notification.u-1",
                                           message_id, "g-1", "GenerationNotification",
                                           {"id": message_id}), AT)
        uow.commit()


def rows(engine: Engine) -> dict[str, tuple[bool, int, str | None]]:
    """message_id -> (sent, attempts, last_error)."""
    with engine.connect() as conn:
        return {r.message_id: (r.sent_at is not None, r.attempts, r.last_error)
                for r in conn.execute(select(outbox))}


def relay_for(engine: Engine, broker: ScriptedBroker) -> OutboxRelay:
    return OutboxRelay(SqlOutboxStore(engine), broker, NullObserver(), batch_size=100)


def test_only_confirmed_rows_are_marked_sent_and_the_rest_go_out_later(
        sqlite_engine: Engine) -> None:
    add_rows(sqlite_engine, list(FIRST_OUTCOMES))
    broker = ScriptedBroker(FIRST_OUTCOMES)
    relay = relay_for(sqlite_engine, broker)

    assert relay.run_once() == 6
    after_first = rows(sqlite_engine)
    sent = {m for m, (is_sent, _, _) in after_first.items() if is_sent}
    assert sent == {"m-confirmed-1", "m-confirmed-2", "m-confirmed-3"}
    for message_id in ("m-nacked", "m-returned", "m-timed-out"):
        assert after_first[message_id] == (False, 1, "not confirmed")

    assert relay.run_once() == 3  # the next pass takes exactly the unconfirmed rows again
    assert broker.calls[1] == ["m-nacked", "m-returned", "m-timed-out"]
    assert all(is_sent for is_sent, _, _ in rows(sqlite_engine).values())
    assert relay.run_once() == 0
    for message_id, outcome in FIRST_OUTCOMES.items():  # confirmed once: never sent again
        assert broker.published(message_id) == (1 if outcome == "confirmed" else 2)


def test_a_batch_whose_connection_drops_marks_nothing_sent(sqlite_engine: Engine) -> None:
    add_rows(sqlite_engine, ["m-1", "m-2"])
    broker = ScriptedBroker({})
    broker.raise_next = True
    relay = relay_for(sqlite_engine, broker)

    with pytest.raises(ConnectionError):
        relay.run_once()
    assert rows(sqlite_engine) == {"m-1": (False, 0, None), "m-2": (False, 0, None)}
    assert relay.run_once() == 2
    assert all(is_sent for is_sent, _, _ in rows(sqlite_engine).values())


def test_the_relay_thread_keeps_retrying_until_every_row_is_confirmed(
        sqlite_engine: Engine) -> None:
    import time

    ids = [f"m-{i}" for i in range(20)]
    add_rows(sqlite_engine, ids)
    broker = ScriptedBroker({m: "nacked" for m in ids[::2]})
    broker.raise_next = True  # first pass: broker unreachable
    relay = relay_for(sqlite_engine, broker)
    relay.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
                s for s, _, _ in rows(sqlite_engine).values()):
            time.sleep(0.05)
    finally:
        relay.stop()
    assert all(is_sent for is_sent, _, _ in rows(sqlite_engine).values())
    # every row went out in the failed pass, then once more; the nacked ones a third time
    assert sorted(broker.published(m) for m in ids) == [2] * 10 + [3] * 10


# ------------------------------------------------------------------ the RabbitMQ adapter's flags
class FakeChannel:
    """Answers each basic_publish as scripted by its routing key, on another thread."""

    is_open = True

    def __init__(self, publisher: object) -> None:
        self.publisher = publisher
        self.tag = 0

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: object,
                      mandatory: bool = False) -> None:
        import threading
        from types import SimpleNamespace

        from pika.spec import Basic

        self.tag += 1
        tag, outcome = self.tag, routing_key
        on_confirm = self.publisher._on_confirm  # type: ignore[attr-defined]
        if outcome == "timed_out":
            return  # the broker never answers
        method = (Basic.Nack(delivery_tag=tag) if outcome == "nacked"
                  else Basic.Ack(delivery_tag=tag))
        threading.Timer(0.01 * tag, on_confirm, [SimpleNamespace(method=method)]).start()


def test_the_rabbitmq_publisher_flags_only_acked_messages_as_confirmed() -> None:
    from types import SimpleNamespace

    from messaging.rabbitmq.publisher import AsyncPublisher

    publisher = AsyncPublisher("amqp://guest:guest@127.0.0.1:1/none", confirm_timeout=0.5)
    publisher._channel = FakeChannel(publisher)  # type: ignore[assignment]
    publisher._conn = SimpleNamespace(  # type: ignore[assignment]
        ioloop=SimpleNamespace(add_callback_threadsafe=lambda callback: callback()))
    publisher._ready.set()
    outcomes = ["confirmed", "nacked", "timed_out", "confirmed"]
    messages = [OutboundMessage(NOTIFICATION_EXCHANGE, outcome, f"m-{n}", "g-1", "t", {})
                for n, outcome in enumerate(outcomes)]
    assert publisher.publish(messages) == [True, False, False, True]
