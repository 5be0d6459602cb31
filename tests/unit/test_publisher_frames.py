"""The publisher hands a batch's frames to the socket as one buffer: the same bytes, in order.

pika queues each frame of a message (method, header, body) as a buffer of its own and sends
every buffer with its own system call; ``AsyncPublisher`` joins what a batch queued so it
leaves in one. Here pika's real frame encoding writes into a stand-in transport; the joined
buffer must be byte for byte what pika would have sent, frame after frame, and a confirm
must still settle each message of the batch.
"""

from __future__ import annotations

import collections
from types import SimpleNamespace
from typing import Any

from pika import frame, spec

from messaging.rabbitmq.publisher import AsyncPublisher, _Batch, _Outgoing, outgoing
from saga.messages import NOTIFICATION_EXCHANGE, OutboundMessage


class PikaLikeChannel:
    """Encodes each publish as pika does and queues its frames one buffer each."""

    is_open = True

    def __init__(self, buffers: collections.deque[bytes]) -> None:
        self.buffers = buffers
        self.frames: list[bytes] = []

    def basic_publish(self, exchange: str, routing_key: str, body: bytes,
                      properties: spec.BasicProperties, mandatory: bool = False) -> None:
        frames = [frame.Method(1, spec.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                                     mandatory=mandatory)).marshal(),
                  frame.Header(1, len(body), properties).marshal(),
                  frame.Body(1, body).marshal()]
        self.frames += frames
        self.buffers.extend(frames)


def publisher_with(buffers: collections.deque[bytes]) -> tuple[AsyncPublisher, PikaLikeChannel]:
    publisher = AsyncPublisher("amqp://guest:guest@127.0.0.1:1/none", confirm_timeout=1.0)
    channel = PikaLikeChannel(buffers)
    publisher._channel = channel  # type: ignore[assignment]
    publisher._conn = SimpleNamespace(  # type: ignore[assignment]
        _transport=SimpleNamespace(_tx_buffers=buffers),
        ioloop=SimpleNamespace(add_callback_threadsafe=lambda callback: callback()))
    publisher._ready.set()
    return publisher, channel


def messages(n: int) -> list[OutboundMessage]:
    return [OutboundMessage(NOTIFICATION_EXCHANGE, f"notification.u-{i}", f"m-{i}", "g-1",
                            "GenerationNotification", {"n": i, "text": "é" * i},
                            traceparent=f"00-{i:032x}-{i:016x}-01" if i % 2 else None)
            for i in range(n)]


def test_a_batch_leaves_as_one_buffer_of_exactly_the_frames_pika_encoded() -> None:
    leftover = b"\x01\x00\x01rest-of-an-earlier-partial-send"
    buffers: collections.deque[bytes] = collections.deque([leftover])
    publisher, channel = publisher_with(buffers)
    confirms: list[Any] = []
    publisher._on_confirm = confirms.append  # type: ignore[method-assign]

    batch = messages(16)
    publisher._publish_batch(publisher_batch(len(batch)), publisher_items(publisher, batch))

    assert len(channel.frames) == 48
    assert list(buffers) == [leftover + b"".join(channel.frames)]  # the earlier bytes first


def test_confirms_still_settle_every_message_of_a_coalesced_batch() -> None:
    buffers: collections.deque[bytes] = collections.deque()
    publisher, _ = publisher_with(buffers)
    batch = messages(5)
    pending = publisher_batch(len(batch))
    publisher._publish_batch(pending, publisher_items(publisher, batch))
    assert len(buffers) == 1
    publisher._on_confirm(SimpleNamespace(method=spec.Basic.Ack(delivery_tag=3, multiple=True)))
    publisher._on_confirm(SimpleNamespace(method=spec.Basic.Nack(delivery_tag=4)))
    publisher._on_confirm(SimpleNamespace(method=spec.Basic.Ack(delivery_tag=5)))
    assert pending.done.is_set()
    assert pending.results == [True, True, True, False, True]


def test_without_pikas_buffer_queue_the_frames_go_out_as_queued() -> None:
    publisher = AsyncPublisher("amqp://guest:guest@127.0.0.1:1/none", confirm_timeout=1.0)
    buffers: collections.deque[bytes] = collections.deque()
    channel = PikaLikeChannel(buffers)
    publisher._channel = channel  # type: ignore[assignment]
    publisher._conn = SimpleNamespace()  # type: ignore[assignment]
    publisher._publish_batch(publisher_batch(2), publisher_items(publisher, messages(2)))
    assert list(buffers) == channel.frames


def publisher_batch(n: int) -> _Batch:
    return _Batch(n)


def publisher_items(publisher: AsyncPublisher, batch: list[OutboundMessage]) -> list[_Outgoing]:
    return [outgoing(m) for m in batch]  # what ``publish`` hands the I/O thread
