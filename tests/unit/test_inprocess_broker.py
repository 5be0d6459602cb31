"""The in-process broker keeps no copy of what it sends unless a test asks for one."""

from __future__ import annotations

import json

from messaging.inprocess import InProcessBroker
from saga.messages import NOTIFICATION_EXCHANGE, OutboundMessage


def message(n: int) -> OutboundMessage:
    return OutboundMessage(NOTIFICATION_EXCHANGE, "notification.u-1", f"m-{n}", "g-1",
                           "GenerationNotification", {"n": n})


def test_a_long_embedded_run_keeps_no_copy_of_sent_messages() -> None:
    broker = InProcessBroker()  # as the embedded service builds it
    for start in range(0, 5000, 500):
        assert broker.publish([message(n) for n in range(start, start + 500)]) == [True] * 500
    assert len(broker.published) == 0


def test_a_test_that_asks_sees_every_message_in_order() -> None:
    broker = InProcessBroker(keep_published=True)
    broker.publish([message(1), message(2)])
    stored = OutboundMessage(NOTIFICATION_EXCHANGE, "notification.u-1", "m-3", "g-1",
                             "GenerationNotification", {}, payload=json.dumps({"n": 3}).encode())
    broker.publish([stored])  # read back from the outbox: the body is decoded for tests
    assert [(m.message_id, m.body) for m in broker.published] == [
        ("m-1", {"n": 1}), ("m-2", {"n": 2}), ("m-3", {"n": 3})]
