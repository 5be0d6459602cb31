"""What the dead-letter drain stores for a delivery: reason, original exchange and key, id."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from aigen.jobs.dead_letters import MAX_STORED_BODY, to_command
from messaging.broker import Delivery, unroutable_headers
from saga.messages import DEAD_LETTER_QUEUE, UNROUTABLE_QUEUE

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
GEN = "0b0e6d5c-1111-4222-8333-444455556666"


def test_our_own_dead_letter_keeps_its_reason_routing_key_and_generation() -> None:
    body = json.dumps({"generation_id": GEN, "job_id": "j"}).encode()
    cmd = to_command(Delivery(body, "generation.result.failed", "m-1", {
        "x-rejection-reason": "schema: error: Field required",
        "x-original-routing-key": "generation.result.failed"}), DEAD_LETTER_QUEUE, NOW)
    assert (cmd.reason, cmd.exchange, cmd.routing_key) == (
        "schema: error: Field required", "creativeflow.generation", "generation.result.failed")
    assert cmd.generation_id == GEN and cmd.message_key == "dlq:m-1" and cmd.body == body


def test_rabbitmqs_own_dead_lettering_is_read_from_x_death() -> None:
    cmd = to_command(Delivery(b"{}", "ignored", None, {"x-death": [{
        "reason": "expired", "exchange": "creativeflow.generation",
        "routing-keys": [b"generation.result.samples_ready"]}]}), DEAD_LETTER_QUEUE, NOW)
    assert cmd.reason == "rejected by RabbitMQ: expired"
    assert cmd.routing_key == "generation.result.samples_ready"
    assert cmd.message_key.startswith("dlq:sha256:")  # no message id: a digest of it


def test_the_same_body_without_a_message_id_has_one_key_another_body_another() -> None:
    first = to_command(Delivery(b"a", "k"), DEAD_LETTER_QUEUE, NOW)
    again = to_command(Delivery(b"a", "k"), DEAD_LETTER_QUEUE, NOW)
    other = to_command(Delivery(b"b", "k"), DEAD_LETTER_QUEUE, NOW)
    assert first.message_key == again.message_key != other.message_key


def test_an_unroutable_message_names_where_it_was_going() -> None:
    cmd = to_command(Delivery(b'{"generation_id": "%s"}' % GEN.encode(), UNROUTABLE_QUEUE,
                              "e-1", unroutable_headers("creativeflow.events", "generation.x")),
                     UNROUTABLE_QUEUE, NOW)
    assert (cmd.exchange, cmd.routing_key) == ("creativeflow.events", "generation.x")
    assert cmd.reason.startswith("unroutable") and cmd.message_key == "unroutable:e-1"


def test_nul_characters_and_unusable_generation_ids_are_not_stored_as_text() -> None:
    body = json.dumps({"generation_id": "g\u0000"}).encode()
    cmd = to_command(Delivery(body, "k\x00", None, {"x-rejection-reason": "schema\x00"}),
                     DEAD_LETTER_QUEUE, NOW)
    assert cmd.generation_id is None
    assert "\x00" not in cmd.reason + cmd.routing_key
    assert to_command(Delivery(b"\xff", "k"), DEAD_LETTER_QUEUE, NOW).generation_id is None


def test_a_huge_body_is_cut_and_says_so() -> None:
    cmd = to_command(Delivery(b"x" * (MAX_STORED_BODY + 10), "k", "m"), DEAD_LETTER_QUEUE, NOW)
    assert len(cmd.body) == MAX_STORED_BODY and "cut" in cmd.reason


def test_two_identical_bodies_dead_lettered_by_the_consumer_are_two_dead_letters() -> None:
    from messaging.inprocess import InProcessBroker

    broker = InProcessBroker()
    for _ in range(2):
        broker.dead_letter(Delivery(b"garbage", "generation.result.failed"), "not_json: x")
    q = broker.queues[DEAD_LETTER_QUEUE]
    keys = {to_command(q.get_nowait(), DEAD_LETTER_QUEUE, NOW).message_key for _ in range(2)}
    assert len(keys) == 2


def test_a_deeply_nested_body_is_stored_without_reading_it() -> None:
    deep = b'{"a":' * 1200 + b"1" + b"}" * 1200  # json.loads would raise RecursionError
    cmd = to_command(Delivery(deep, "generation.result.samples_ready", "m-deep", {
        "x-rejection-reason": "schema: body: nested deeper than 32 levels"}),
        DEAD_LETTER_QUEUE, NOW)
    assert cmd.generation_id is None and cmd.body == deep
