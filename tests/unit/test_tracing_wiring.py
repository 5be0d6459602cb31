"""The tracing hooks in the result consumer, seen through a recording tracer (no SDK)."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from messaging.broker import Delivery, Disposition
from messaging.consumer import ResultConsumer, parse_result
from saga.commands import ApplyResult
from saga.observer import NullObserver
from saga.tracing import NullTracer
from tests.conftest import World

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Recorder(NullTracer):
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    def enabled(self) -> bool:
        return True

    def span(self, name: str, *, parent: Any = None, kind: Any = "internal",
             attributes: Any = None, links: Any = (), **named: Any
             ) -> AbstractContextManager[Any]:
        self.spans.append({"name": name, "parent": parent, "kind": kind, **named})
        return nullcontext()

    def span_event(self, name: str, *, attributes: Any = None, **named: Any) -> bool:
        self.events.append((name, named))
        return True


def _result(**extra: Any) -> bytes:
    return json.dumps({"event_type": "AIGenerationProgress", "generation_id": "g-1",
                       "job_id": "j-1", "percent": 5, **extra}).encode()


def test_a_refused_result_gets_a_span_event_with_its_reason(world: World) -> None:
    tracer = Recorder()
    consumer = ResultConsumer(world.bus, world.broker, NullObserver(), tracer=tracer)
    delivery = Delivery(b"{not json", "generation.result.progress", "m-1",
                        headers={"traceparent": TP})
    assert consumer.handle(delivery) is Disposition.ACK
    assert tracer.spans == [{"name": "orchestrator.generation.results process",
                             "parent": {"traceparent": TP}, "kind": "consumer",
                             "generation_id": None}]
    assert tracer.events == [("message refused",
                              {"reason": "not_json: the body is not UTF-8 JSON"})]


def test_the_consume_span_prefers_the_body_trace_over_the_header(world: World) -> None:
    tracer = Recorder()
    consumer = ResultConsumer(world.bus, world.broker, NullObserver(), tracer=tracer)
    body_trace = {"traceparent": TP.replace("00f067aa0ba902b7", "00f067aa0ba902b8")}
    consumer.handle(Delivery(_result(trace=body_trace), "generation.result.progress", "m-2",
                             headers={"traceparent": TP}))
    assert tracer.spans[0]["parent"] == body_trace
    assert tracer.spans[0]["generation_id"] == "g-1"
    assert tracer.events == []


def test_a_malformed_trace_is_no_reason_to_refuse_a_result() -> None:
    for trace in ("garbage", 42, {"traceparent": "not-a-traceparent"}, None, []):
        assert isinstance(parse_result(_result(trace=trace)), ApplyResult), trace
