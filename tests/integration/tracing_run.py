"""One traced generation against the real service, run in its own process.

The OpenTelemetry SDK lets a process set its tracer provider once, so
tests/integration/test_tracing.py runs this module in a subprocess:
``python -m tests.integration.tracing_run PG_URL AMQP_URL OUT.json``. It traces into the
SDK's in-memory exporter, logs JSON lines (DEBUG) to a file, runs one generation from
``POST /generations`` through samples and selection to a final that times out (the sweeper
fires the deadline on its own thread), and writes spans, history and log lines to OUT.json.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

from aigen import logging as aigen_logging
from aigen import telemetry
from aigen.bootstrap import build
from standins.n8n import ScriptedN8n, happy, wait_for
from tests.integration.rabbit_fixtures import SERVICE, SUPPORT, settings_for

SUPPORT_KEY = SUPPORT["Authorization"].removeprefix("Bearer ")

# What Odoo sends when it propagates its own trace: the generation's requests share it.
ODOO_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
START_TRACEPARENT = f"00-{ODOO_TRACE}-00f067aa0ba902b7-01"
SELECT_TRACEPARENT = f"00-{ODOO_TRACE}-00f067aa0ba902b8-01"


def _span(s: Any) -> dict[str, Any]:
    ctx = s.get_span_context()
    return {
        "name": s.name, "kind": s.kind.name, "trace_id": format_trace_id(ctx.trace_id),
        "span_id": format_span_id(ctx.span_id),
        "parent": format_span_id(s.parent.span_id) if s.parent else None,
        "attributes": dict(s.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in s.events],
        "links": [{"trace_id": format_trace_id(link.context.trace_id),
                   "span_id": format_span_id(link.context.span_id),
                   "attributes": dict(link.attributes or {})} for link in s.links],
    }


def main(pg_url: str, amqp_url: str, out: str, log_path: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert telemetry.configure(tracer_provider=provider)
    aigen_logging.configure("DEBUG", json=True)
    log_file = open(log_path, "w")  # noqa: SIM115 - closed at exit
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(log_file)

    runtime = build(settings_for(pg_url, amqp_url, final_deadline_s=1.0), run_migrations=False)
    runtime.start()
    try:
        with TestClient(runtime.app) as client, ScriptedN8n(
                amqp_url, lambda job: happy(job) if job["stage"] == "samples" else []):
            def get(gid: str) -> dict[str, Any]:
                return dict(client.get(f"/api/v1/generations/{gid}", headers=SERVICE).json())

            assert client.post("/api/v1/accounts/t-1/grants", headers=SERVICE,
                               json={"amount": "5.00", "reason": "test"}).status_code == 201
            r = client.post("/api/v1/generations", json={
                "user_id": "t-1", "prompt": "spring sale banner", "format": "instagram_post"},
                headers={**SERVICE, "Idempotency-Key": "trace-1",
                         "traceparent": START_TRACEPARENT})
            assert r.status_code == 202, r.text
            gid = r.json()["id"]
            wait_for(lambda: get(gid)["state"] == "awaiting_selection", 20,
                     message="the samples")
            r = client.post(f"/api/v1/generations/{gid}/selection",
                            json={"sample_id": "s1", "resolution": "high"},
                            headers={**SERVICE, "traceparent": SELECT_TRACEPARENT})
            assert r.status_code == 202, r.text
            wait_for(lambda: get(gid)["error"] is not None, 20, message="the final deadline")
            # the state change the timed-out final published, confirmed by the broker
            wait_for(lambda: runtime.relay.store.backlog() == 0, 10,  # type: ignore[attr-defined]
                     message="the relay")
            history = client.get(f"/api/v1/generations/{gid}/history",
                                 headers=SUPPORT).json()["events"]
            form = client.get("/console/sign-in").text
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
            assert csrf, form
            client.post("/console/sign-in", data={"csrf_token": csrf.group(1),
                                                  "api_key": SUPPORT_KEY})
            page = client.get(f"/console/generations/{gid}")
    finally:
        runtime.stop()
        log_file.close()
    with open(log_path) as f:
        logs = [json.loads(line) for line in f if line.startswith("{")]
    with open(out, "w") as f:
        json.dump({"generation_id": gid, "odoo_trace": ODOO_TRACE, "history": history,
                   "state": get_state(history), "console_status": page.status_code,
                   "console": page.text, "logs": logs,
                   "spans": [_span(s) for s in exporter.get_finished_spans()]}, f)


def get_state(history: list[dict[str, Any]]) -> str | None:
    transitions = [e for e in history if e["to_state"]]
    return transitions[-1]["to_state"] if transitions else None


if __name__ == "__main__":
    main(*sys.argv[1:5])
