"""The messages this service publishes (docs/messages.md), built as plain data.

The outbox stores them; ``messaging`` only moves bytes. Keeping the schemas here means the
handlers, the tests and the n8n stand-ins all agree on one definition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from saga.model import Generation, new_id

GENERATION_EXCHANGE = "creativeflow.generation"
NOTIFICATION_EXCHANGE = "creativeflow.notifications"
EVENTS_EXCHANGE = "creativeflow.events"
DEAD_LETTER_EXCHANGE = "creativeflow.dlx"
JOBS_QUEUE = "n8n.generation.jobs"
RESULTS_QUEUE = "orchestrator.generation.results"
DEAD_LETTER_QUEUE = "orchestrator.generation.results.dlq"
# Outbound messages no queue was bound for, parked by the publisher until support replays them.
UNROUTABLE_QUEUE = "orchestrator.unroutable"
JOB_ROUTING_PREFIX = "generation.job."
RESULT_ROUTING_PREFIX = "generation.result."


@dataclass(frozen=True)
class OutboundMessage:
    exchange: str
    routing_key: str
    message_id: str
    correlation_id: str
    type: str
    body: dict[str, Any]
    payload: bytes | None = None  # the encoded body, when read back from the outbox
    traceparent: str | None = None  # W3C trace context, sent as the AMQP header traceparent

    def encode(self) -> bytes:
        if self.payload is not None:
            return self.payload
        return encode_body(self.body)


# orjson writes what json.dumps(…, separators=(",", ":"), default=str) wrote, several times
# faster (non-ASCII as UTF-8 rather than \u escapes; datetimes and dataclasses still go
# through str); integers beyond 64 bits, which orjson refuses, take the standard library.
_ORJSON = (orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
           | orjson.OPT_PASSTHROUGH_DATACLASS)


def encode_body(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body, default=str, option=_ORJSON)
    except TypeError:
        return json.dumps(body, separators=(",", ":"), default=str).encode()


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def job_message(saga: Generation, *, stage: str, job_id: str, attempt: int, now: datetime,
                bucket: str, sample_size: int, traceparent: str | None = None
                ) -> OutboundMessage:
    event_id = new_id()
    final = stage == "final"
    selected = saga.sample(saga.selected_sample_id) if final and saga.selected_sample_id else None
    body = {
        "event_type": "AIGenerationJobRequested",
        "event_id": event_id,
        "occurred_at": iso(now),
        "generation_id": saga.id,
        "job_id": job_id,
        "stage": stage,
        "attempt": attempt,
        "user_id": saga.user_id,
        "prompt": saga.prompt,
        "negative_prompt": saga.negative_prompt,
        "style": saga.style,
        "brand": saga.brand,
        "input_assets": saga.input_assets,
        "format": saga.format,
        "sample_count": saga.sample_count,
        "sample_size": sample_size,
        "selected_sample": (
            {"sample_id": selected["sample_id"], "url": selected.get("url")} if selected else None
        ),
        "output": saga.final_output() if final else None,
        "storage": {
            "bucket": bucket,
            "prefix": f"users/{saga.user_id}/generations/{saga.id}/{stage}/",
        },
        "reply": {"exchange": GENERATION_EXCHANGE, "routing_key_prefix": RESULT_ROUTING_PREFIX},
        "deadline_at": iso(saga.due_at) if saga.due_at else None,
    }
    if traceparent is not None:  # n8n reads only bodies; it copies this into its results
        body["trace"] = {"traceparent": traceparent}
    return OutboundMessage(GENERATION_EXCHANGE, JOB_ROUTING_PREFIX + stage, event_id, saga.id,
                           "AIGenerationJobRequested", body, traceparent=traceparent)


def notification_message(saga: Generation, *, type_: str, message: str, data: dict[str, Any],
                         now: datetime) -> OutboundMessage:
    event_id = new_id()
    body = {
        "event_type": "GenerationNotification",
        "event_id": event_id,
        "occurred_at": iso(now),
        "type": type_,
        "user_id": saga.user_id,
        "generation_id": saga.id,
        "state": saga.state,
        "message": message,
        "data": data,
    }
    return OutboundMessage(NOTIFICATION_EXCHANGE, f"notification.generation.{type_}", event_id,
                           saga.id, "GenerationNotification", body)


def state_changed_message(saga: Generation, *, from_state: str, to_state: str,
                          now: datetime) -> OutboundMessage:
    event_id = new_id()
    body = {
        "event_type": "GenerationStateChanged",
        "event_id": event_id,
        "occurred_at": iso(now),
        "generation_id": saga.id,
        "user_id": saga.user_id,
        "from_state": from_state,
        "to_state": to_state,
        "credits": saga.credits(),
    }
    return OutboundMessage(EVENTS_EXCHANGE, f"generation.{to_state}", event_id, saga.id,
                           "GenerationStateChanged", body)
