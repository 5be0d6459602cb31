"""aigen.telemetry: W3C propagation helpers, spans, links, events, log ids; off by default."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from structlog.testing import LogCapture

from aigen import telemetry

W3C = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
REPO = Path(__file__).resolve().parents[2]
ARMED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.disable()
    assert telemetry.configure(tracer_provider=provider)
    yield exporter
    telemetry.disable()
    provider.shutdown()


def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


# -- propagation ----------------------------------------------------------------------------
def test_current_traceparent_is_the_active_spans_w3c_traceparent(
        spans: InMemorySpanExporter) -> None:
    assert telemetry.current_traceparent() is None  # no span yet
    with telemetry.span("POST /generations"):
        traceparent = telemetry.current_traceparent()
        trace_id = telemetry.current_trace_id()
    outer = finished(spans, "POST /generations")
    assert traceparent is not None
    match = W3C.match(traceparent)
    assert match, traceparent
    assert match.group(1) == hex_trace(outer) == trace_id
    assert match.group(2) == hex_span(outer)
    assert int(match.group(3), 16) & 0x01  # sampled
    assert telemetry.trace_id_from_traceparent(traceparent) == trace_id
    assert telemetry.current_traceparent() is None


def test_headers_carry_the_stored_traceparent_to_a_consumer_in_the_same_trace(
        spans: InMemorySpanExporter) -> None:
    with telemetry.span("transition"):
        stored = telemetry.current_traceparent()  # what the outbox row keeps
    # later, on the relay's thread, outside any request
    headers: dict[str, Any] = {"x-other": "kept"}
    with telemetry.span("publish", parent=stored, kind="producer"):
        assert telemetry.inject_headers(headers, telemetry.current_traceparent()) is headers
    assert headers["x-other"] == "kept"
    # and on the consumer, from the AMQP headers (pika may hand over bytes)
    delivered = {"traceparent": headers["traceparent"].encode()}
    with telemetry.span("consume", parent=delivered, kind="consumer"):
        pass
    transition, publish, consume = (finished(spans, n) for n in ("transition", "publish",
                                                                 "consume"))
    assert hex_trace(transition) == hex_trace(publish) == hex_trace(consume)
    assert publish.parent is not None and publish.parent.span_id == transition.context.span_id
    assert consume.parent is not None and consume.parent.span_id == publish.context.span_id
    assert publish.kind is SpanKind.PRODUCER and consume.kind is SpanKind.CONSUMER


def test_a_result_continues_the_jobs_trace_from_its_trace_field(
        spans: InMemorySpanExporter) -> None:
    result_body = {"event_type": "AIGenerationSamplesReady", "trace": {"traceparent": ARMED}}
    ctx = telemetry.extract_context(result_body["trace"])
    assert ctx is not None
    with telemetry.span("result consumed", parent=ctx):
        assert telemetry.current_trace_id() == ARMED.split("-")[1]
    result = finished(spans, "result consumed")
    assert result.parent is not None and format(result.parent.span_id, "016x") == ARMED[36:52]
    assert result.parent.is_remote


@pytest.mark.parametrize("bad", [
    "", "garbage", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # too short
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case is invalid
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
    {"traceparent": 12}, {"no": "traceparent"}, 42,
])
def test_malformed_traceparents_never_become_parents(spans: InMemorySpanExporter,
                                                     bad: Any) -> None:
    with telemetry.span("current"):
        # a failed extraction must not fall back to the span that happens to be current
        assert telemetry.extract_context(bad) is None
    with telemetry.span("orphan", parent=bad):
        pass
    assert finished(spans, "orphan").parent is None  # a new trace, not an error


def test_a_span_in_another_thread_continues_an_extracted_trace(
        spans: InMemorySpanExporter) -> None:
    with telemetry.span("arm"):
        stored = telemetry.current_traceparent()
    seen: list[str | None] = []

    def sweeper() -> None:
        seen.append(telemetry.current_traceparent())  # a fresh thread has no span
        with telemetry.span("in thread", parent=stored):
            pass

    worker = threading.Thread(target=sweeper)
    worker.start()
    worker.join()
    assert seen == [None]
    assert hex_trace(finished(spans, "in thread")) == hex_trace(finished(spans, "arm"))


# -- timers, events, attributes -------------------------------------------------------------
def test_a_fired_timer_links_to_the_span_that_armed_it_and_stays_in_its_trace(
        spans: InMemorySpanExporter) -> None:
    with telemetry.span("arm deadline"):
        armed_tp = telemetry.current_traceparent()

    def fire() -> None:
        with telemetry.link_to(armed_tp, "deadline fired", generation_id="g-1", timer="stage"):
            pass

    sweeper = threading.Thread(target=fire)
    sweeper.start()
    sweeper.join()
    armed, fired = finished(spans, "arm deadline"), finished(spans, "deadline fired")
    assert len(fired.links) == 1
    link = fired.links[0]
    assert link.context.trace_id == armed.context.trace_id
    assert link.context.span_id == armed.context.span_id
    assert link.attributes == {"aigen.link": "armed_by"}
    assert hex_trace(fired) == hex_trace(armed)
    assert fired.attributes == {"aigen.generation_id": "g-1", "aigen.timer": "stage"}


def test_a_timer_can_start_its_own_trace_that_only_links(spans: InMemorySpanExporter) -> None:
    with telemetry.span("current"), telemetry.link_to(ARMED, "fired", continue_trace=False):
        pass
    fired = finished(spans, "fired")
    assert fired.parent is None  # neither the armed span nor the current one
    assert hex_trace(fired) not in (ARMED.split("-")[1], hex_trace(finished(spans, "current")))
    assert format(fired.links[0].context.trace_id, "032x") == ARMED.split("-")[1]


def test_a_timer_without_a_stored_traceparent_gets_a_plain_new_trace(
        spans: InMemorySpanExporter) -> None:
    with telemetry.link_to(None, "fired"):
        pass
    fired = finished(spans, "fired")
    assert fired.parent is None and not fired.links


def test_span_event_records_a_refusal_on_the_current_span(spans: InMemorySpanExporter) -> None:
    assert telemetry.span_event("message refused", reason="schema") is False  # no span
    with telemetry.span("consume"):
        assert telemetry.span_event("message refused", reason="unknown generation",
                                    attributes={"messaging.message.id": "m-1"})
    (event,) = finished(spans, "consume").events
    assert event.name == "message refused"
    assert event.attributes == {"aigen.reason": "unknown generation",
                                "messaging.message.id": "m-1"}


def test_span_attributes_kinds_and_errors(spans: InMemorySpanExporter) -> None:
    with pytest.raises(RuntimeError), telemetry.span(
            "transition", kind="client", generation_id="g-1", trigger="samples_ready",
            from_state="generating", to_state="awaiting_selection", attempt=2, missing=None,
            amount=object.__new__(type("Money", (), {"__str__": lambda self: "0.25"})),
            attributes={"messaging.system": "rabbitmq"}) as current:
        assert current.is_recording()
        raise RuntimeError("boom")
    span = finished(spans, "transition")
    assert span.kind is SpanKind.CLIENT
    assert dict(span.attributes or {}) == {
        "aigen.generation_id": "g-1", "aigen.trigger": "samples_ready",
        "aigen.from_state": "generating", "aigen.to_state": "awaiting_selection",
        "aigen.attempt": 2, "aigen.amount": "0.25", "messaging.system": "rabbitmq"}
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


def test_inject_headers_without_a_traceparent_leaves_headers_alone(
        spans: InMemorySpanExporter) -> None:
    headers: dict[str, Any] = {}
    assert telemetry.inject_headers(headers, None) == {}


@pytest.mark.parametrize(("traceparent", "trace_id"), [
    (ARMED, ARMED.split("-")[1]), (None, None), ("", None), ("nonsense", None),
    ("00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
])
def test_trace_id_from_a_stored_traceparent(traceparent: str | None,
                                            trace_id: str | None) -> None:
    assert telemetry.trace_id_from_traceparent(traceparent) == trace_id


# -- logs -----------------------------------------------------------------------------------
def test_log_lines_inside_a_span_carry_its_trace_and_span_id(
        spans: InMemorySpanExporter) -> None:
    capture = LogCapture()
    log = structlog.wrap_logger(None, processors=[telemetry.add_trace_ids, capture],
                                cache_logger_on_first_use=False)
    log.info("outside")
    with telemetry.span("work"):
        log.info("inside")
        log.info("explicit", trace_id="given")
    work = finished(spans, "work")
    outside, inside, explicit = capture.entries
    assert "trace_id" not in outside and "span_id" not in outside
    assert inside["trace_id"] == hex_trace(work) and inside["span_id"] == hex_span(work)
    assert explicit["trace_id"] == "given"  # never overwritten


# -- maintained instrumentations ------------------------------------------------------------
def test_fastapi_requests_get_a_server_span_that_continues_an_incoming_traceparent(
        spans: InMemorySpanExporter) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    app = FastAPI()

    @app.post("/generations")
    def create() -> dict[str, str | None]:
        return {"traceparent": telemetry.current_traceparent()}

    @app.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    assert telemetry.instrument_fastapi(app)
    try:
        with TestClient(app) as client:
            answer = client.post("/generations", headers={"traceparent": ARMED}).json()
            client.get("/health/live")
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    (server,) = spans.get_finished_spans()  # the probe is excluded, receive/send spans too
    assert server.kind is SpanKind.SERVER and server.name == "POST /generations"
    assert hex_trace(server) == ARMED.split("-")[1]
    assert answer["traceparent"] == f"00-{hex_trace(server)}-{hex_span(server)}-01"


def test_sql_statements_get_client_spans_under_the_current_span(
        spans: InMemorySpanExporter) -> None:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from sqlalchemy import create_engine, text

    engine = create_engine("sqlite://")
    assert telemetry.instrument_sqlalchemy(engine)
    try:
        with telemetry.span("transition"), engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        SQLAlchemyInstrumentor().uninstrument()
        engine.dispose()
    transition = finished(spans, "transition")

    def statement(s: ReadableSpan) -> str:
        attrs = s.attributes or {}
        return str(attrs.get("db.statement", attrs.get("db.query.text", "")))

    # (the instrumentor is process-wide: other tests' engines may add spans of their own)
    select = [s for s in spans.get_finished_spans()
              if s.kind is SpanKind.CLIENT and "SELECT 1" in statement(s)]
    assert len(select) == 1
    assert select[0].parent is not None
    assert select[0].parent.span_id == transition.context.span_id


def test_instrumentations_honour_otel_python_disabled_instrumentations(
        spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "sqlalchemy, fastapi")
    assert telemetry.instrument_fastapi(object()) is False
    assert telemetry.instrument_sqlalchemy(object()) is False


# -- configuration from the OTEL_* environment ----------------------------------------------
@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"OTEL_SERVICE_NAME": "aigen"}, None),  # a name alone exports nowhere
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp_proto_http"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp_proto_http"]),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console"}, []),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, None),
])
def test_requested_exporters(env: dict[str, str], expected: list[str] | None) -> None:
    assert telemetry.requested_exporters(env) == expected


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60,
                          check=False)


NOTHING_CONFIGURED = """
    import sys
    from aigen import telemetry
    assert telemetry.configure() is False and not telemetry.enabled()
    assert telemetry.current_traceparent() is None and telemetry.current_trace_id() is None
    with telemetry.span("x", generation_id="g") as span, telemetry.link_to(ARMED) as fired:
        assert not span.is_recording() and not fired.is_recording()
        span.set_attribute("k", "v"); span.add_event("e"); span.record_exception(ValueError())
        assert telemetry.current_traceparent() is None
    assert telemetry.extract_context(ARMED) is None
    assert telemetry.extract_context({"traceparent": ARMED}) is None
    assert telemetry.inject_headers({}, ARMED) == {}
    assert telemetry.span_event("message refused", reason="r") is False
    assert telemetry.add_trace_ids(None, "info", {"event": "e"}) == {"event": "e"}
    assert telemetry.instrument_fastapi(object()) is False
    assert telemetry.instrument_sqlalchemy(object()) is False
    telemetry.shutdown()
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    assert not loaded, loaded  # off costs no import at all
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    print("off")
"""


@pytest.mark.parametrize("env", [
    {}, {"OTEL_SERVICE_NAME": "aigen"},
    {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
    {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
])
def test_with_nothing_configured_tracing_is_off_and_imports_nothing(env: dict[str, str]) -> None:
    done = run_python(f"ARMED = {ARMED!r}\n" + textwrap.dedent(NOTHING_CONFIGURED), **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "off"


SPAN_AND_EXIT = """
    from aigen import telemetry
    assert telemetry.configure() is True
    with telemetry.span("POST /generations", generation_id="g-1"):
        print(telemetry.current_trace_id())
    telemetry.shutdown()
"""


def test_console_exporter_and_service_name_come_from_the_sdks_own_env_handling() -> None:
    done = run_python(SPAN_AND_EXIT, OTEL_TRACES_EXPORTER="console",
                      OTEL_SERVICE_NAME="aigen-test", OTEL_RESOURCE_ATTRIBUTES="env=ci")
    assert done.returncode == 0, done.stderr
    trace_id, _, exported = done.stdout.partition("\n")
    span = json.loads(exported)
    assert span["name"] == "POST /generations"
    assert span["context"]["trace_id"] == "0x" + trace_id
    assert span["attributes"] == {"aigen.generation_id": "g-1"}
    assert span["resource"]["attributes"]["service.name"] == "aigen-test"
    assert span["resource"]["attributes"]["env"] == "ci"


def test_a_parent_based_ratio_sampler_from_the_env_is_honoured() -> None:
    done = run_python("""
        from aigen import telemetry
        assert telemetry.configure()
        for _ in range(50):
            with telemetry.span("root") as span:
                assert not span.is_recording()
                print(telemetry.current_traceparent()[-2:])  # sampled-out still propagates
        with telemetry.span("child", parent=ARMED) as span:  # the parent was sampled
            assert span.is_recording()
        telemetry.shutdown()
    """.replace("ARMED", repr(ARMED)), OTEL_TRACES_EXPORTER="console",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
    assert done.returncode == 0, done.stderr
    flags = {line for line in done.stdout.splitlines() if len(line) == 2}
    assert flags and all(int(f, 16) & 0x01 == 0 for f in flags), flags


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


def test_an_otlp_endpoint_alone_exports_over_otlp_http_protobuf() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    _Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = run_python(SPAN_AND_EXIT, OTEL_SERVICE_NAME="aigen-otlp",
                          OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    ((path, content_type, body),) = _Collector.received
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert service["service.name"] == "aigen-otlp"
    (exported,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert exported.name == "POST /generations"
    assert exported.trace_id.hex() == done.stdout.strip()


def test_an_unsatisfiable_configuration_is_logged_and_leaves_tracing_off() -> None:
    done = run_python("""
        import logging
        logging.basicConfig()
        from aigen import telemetry
        assert telemetry.configure() is False
        assert telemetry.current_traceparent() is None
        print("still running")
    """, OTEL_TRACES_EXPORTER="no_such_exporter")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "still running"
    assert "tracing requested by OTEL_* but not started" in done.stderr


# -- the shipped n8n workflow copies the job's trace into every result ----------------------
WORKFLOW = REPO / "aigen" / "n8n" / "workflow.json"
#: Runs one Code node's JavaScript the way n8n does (the code is a function body) with the
#: inputs n8n would give it: ``$input``, ``$env`` and ``$('<node>')`` for earlier outputs.
NODE_HARNESS = r"""
const { code, input, nodes } = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const items = (list) => ({ first: () => list[0], all: () => list });
const run = new Function('$input', '$env', '$', 'Buffer', code);
const out = run(items(input), {}, (name) => items(nodes[name]), Buffer);
process.stdout.write(JSON.stringify(out));
"""


def run_code_node(name: str, input_items: list[dict[str, Any]],
                  nodes: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    import shutil

    if shutil.which("node") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is required to run the workflow's Code nodes")
        pytest.skip("node is not installed")
    workflow = json.loads(WORKFLOW.read_text())
    (code,) = [n["parameters"]["jsCode"] for n in workflow["nodes"] if n["name"] == name]
    done = subprocess.run(["node", "-e", NODE_HARNESS], input=json.dumps(
        {"code": code, "input": input_items, "nodes": nodes or {}}), capture_output=True,
        text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def job_message(**overrides: Any) -> list[dict[str, Any]]:
    job = {
        "event_type": "AIGenerationJobRequested", "generation_id": "g-1", "job_id": "j-12345678",
        "stage": "samples", "prompt": "banner", "sample_count": 2, "sample_size": 512,
        "storage": {"bucket": "b", "prefix": "p/"},
        "reply": {"exchange": "creativeflow.generation",
                  "routing_key_prefix": "generation.result."},
        **overrides,
    }
    return [{"json": {"content": json.dumps(job)}}]


def test_workflow_copies_a_jobs_trace_into_failures_found_while_parsing() -> None:
    (failed,) = run_code_node("Parse job", job_message(prompt="", trace={"traceparent": ARMED}))
    assert failed["json"]["out"]["body"]["error"]["code"] == "invalid_job"
    assert failed["json"]["out"]["body"]["trace"] == {"traceparent": ARMED}


@pytest.mark.parametrize("trace", [None, {"traceparent": "garbage"}, {"traceparent": 7}, "x",
                                   {"traceparent": ARMED.upper()}])
def test_workflow_never_echoes_a_missing_or_malformed_trace(trace: Any) -> None:
    extra = {} if trace is None else {"trace": trace}
    (failed,) = run_code_node("Parse job", job_message(prompt="", **extra))
    assert "trace" not in failed["json"]["out"]["body"]
    (planned,) = run_code_node("Parse job", job_message(**extra))
    assert planned["json"]["ok"] is True and planned["json"]["trace"] is None


def test_workflow_copies_a_jobs_trace_into_model_failures_and_ready_results() -> None:
    (planned,) = run_code_node("Parse job", job_message(trace={"traceparent": ARMED, "x": 1}))
    assert planned["json"]["trace"] == {"traceparent": ARMED}  # only the traceparent
    parsed = {"Parse job": [planned]}
    (model_failed,) = run_code_node("Decode images", [{"json": {"statusCode": 500,
                                                                "data": "{}"}}], parsed)
    assert model_failed["json"]["out"]["body"]["error"]["code"] == "model_unavailable"
    assert model_failed["json"]["out"]["body"]["trace"] == {"traceparent": ARMED}
    images = [{"json": {"ok": True, "sample_id": f"s{i}-j1234567", "bucket": "b",
                        "key": f"p/s{i}.png", "width": 512, "height": 512}} for i in (1, 2)]
    stored = [{"json": {"success": True}}, {"json": {"success": True}}]
    (ready,) = run_code_node("Build result", stored, {**parsed, "Decode images": images})
    body = ready["json"]["out"]["body"]
    assert body["event_type"] == "AIGenerationSamplesReady"
    assert body["trace"] == {"traceparent": ARMED}
    (store_failed,) = run_code_node("Build result", stored[:1], {**parsed, "Decode images": images})
    assert store_failed["json"]["out"]["body"]["event_type"] == "AIGenerationFailed"
    assert store_failed["json"]["out"]["body"]["trace"] == {"traceparent": ARMED}
