"""The relay backs off while the outbox stays empty, and a commit's wake-up still relays at once.

An idle service should cost ~nothing: polling every 50 ms forever was 20 transactions a
second. The slow poll only bounds rows that no wake-up announces (another process's).
"""

from __future__ import annotations

import threading
import time

from messaging.inprocess import InProcessBroker
from messaging.relay import OutboxRelay, Publish
from saga.messages import OutboundMessage
from saga.observer import NullObserver


class CountingStore:
    def __init__(self) -> None:
        self.polls = 0
        self.rows: list[OutboundMessage] = []
        self.relayed = threading.Event()

    def relay_batch(self, limit: int, publish: Publish) -> int:
        self.polls += 1
        batch, self.rows = self.rows[:limit], self.rows[limit:]
        if batch:
            publish(batch)
            self.relayed.set()
        return len(batch)


def message() -> OutboundMessage:
    return OutboundMessage("creativeflow.events", "generation.x", "m-1", "c-1", "X", {})


def test_idle_polls_back_off_and_a_wake_up_relays_at_once() -> None:
    store = CountingStore()
    relay = OutboxRelay(store, InProcessBroker(), NullObserver(), idle_interval=0.05,
                        max_idle_interval=30.0)
    relay.start()
    try:
        time.sleep(1.0)
        # 0.05 + 0.1 + 0.2 + 0.4 s: a fixed 50 ms poll would have made about 20 by now.
        assert 2 <= store.polls <= 6
        store.rows.append(message())
        started = time.monotonic()
        relay.wake()  # what a commit that added outbox rows does
        assert store.relayed.wait(5.0)
        assert time.monotonic() - started < 5.0  # not the 30 s idle poll
    finally:
        relay.stop()


def test_an_unannounced_row_is_picked_up_by_the_slow_poll() -> None:
    store = CountingStore()
    relay = OutboxRelay(store, InProcessBroker(), NullObserver(), idle_interval=0.01,
                        max_idle_interval=0.05)
    relay.start()
    try:
        time.sleep(0.2)
        store.rows.append(message())  # committed elsewhere: no wake-up
        assert store.relayed.wait(5.0)
    finally:
        relay.stop()
