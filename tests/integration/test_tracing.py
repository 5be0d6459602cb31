"""One generation, one trace: OpenTelemetry across the outbox, RabbitMQ and the sweeper.

The traced service runs in a subprocess (tests/integration/tracing_run.py): the SDK sets its
tracer provider once per process, and this session's other tests run with tracing off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def traced(pg_engine: Engine, pg_url: str, amqp_url: str, tmp_path: Path) -> dict[str, Any]:
    out, logs = tmp_path / "trace.json", tmp_path / "log.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.tracing_run", pg_url, amqp_url, str(out),
         str(logs)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(json.loads(out.read_text()))


def test_one_generation_is_one_trace_across_outbox_broker_and_sweeper(
        traced: dict[str, Any]) -> None:
    gid, trace_id, spans = traced["generation_id"], traced["odoo_trace"], traced["spans"]
    ours = [s for s in spans if s["trace_id"] == trace_id]
    names = {s["name"] for s in ours}
    # Odoo's trace is continued by the HTTP spans, and everything the saga does joins it
    assert {"POST /api/v1/generations",
            "POST /api/v1/generations/{generation_id}/selection"} <= names
    for expected in ("transition start", "transition samples_ready", "transition select",
                     "transition timeout", "credits reserve", "credits commit",
                     "credits release", "creativeflow.generation publish",
                     "creativeflow.events publish", "creativeflow.notifications publish",
                     "orchestrator.generation.results process", "timer fired"):
        assert expected in names, (expected, sorted(names))
    # ... and no span about this generation (or any saga work) lies outside that trace
    saga_work = ("transition ", "credits ", "timer fired")
    for s in spans:
        if (s["attributes"].get("aigen.generation_id") == gid
                or s["name"].startswith(saga_work)
                or s["kind"] in ("PRODUCER", "CONSUMER")):
            assert s["trace_id"] == trace_id, s
    # The other traces are only the grant request and the relay's / sweeper's polling SQL
    for s in spans:
        if s["trace_id"] != trace_id:
            assert s["kind"] in ("SERVER", "CLIENT"), s
            assert "aigen.generation_id" not in s["attributes"], s

    by_id = {s["span_id"]: s for s in ours}
    reserve = next(s for s in ours if s["name"] == "credits reserve")
    assert reserve["kind"] == "INTERNAL"  # the built-in ledger; CLIENT for external billing
    assert reserve["attributes"] == {"aigen.generation_id": gid, "aigen.step": "reserve",
                                     "aigen.amount": "0.25", "aigen.stage": "samples"}
    assert by_id[reserve["parent"]]["name"] == "transition start"
    # the relay's publish continues the transition that wrote the outbox row
    job_publishes = [s for s in ours if s["name"] == "creativeflow.generation publish"]
    assert len(job_publishes) == 2  # the samples job and the final job
    assert all(by_id[s["parent"]]["name"].startswith("transition ") for s in job_publishes)
    # the result is consumed under the job's trace (n8n copied the job's `trace` field)
    consumed = [s for s in ours if s["name"] == "orchestrator.generation.results process"]
    assert len(consumed) == 1 and consumed[0]["attributes"]["aigen.generation_id"] == gid
    assert by_id[consumed[0]["parent"]]["name"] == "transition start"
    # the fired deadline is a child of, and linked to, the transition that armed it
    (fired,) = [s for s in ours if s["name"] == "timer fired"]
    armer = by_id[fired["parent"]]
    assert armer["name"] == "transition select"
    assert fired["links"] == [{"trace_id": trace_id, "span_id": armer["span_id"],
                               "attributes": {"aigen.link": "armed_by"}}]
    timeout = next(s for s in ours if s["name"] == "transition timeout")
    assert timeout["parent"] == fired["span_id"]
    assert timeout["attributes"] == {
        "aigen.generation_id": gid, "aigen.trigger": "timeout",
        "aigen.from_state": "processing_final", "aigen.to_state": "awaiting_selection",
        "aigen.attempt": 1}


def test_the_trace_id_is_in_the_history_the_console_and_every_log_line(
        traced: dict[str, Any]) -> None:
    gid, trace_id = traced["generation_id"], traced["odoo_trace"]
    history = traced["history"]
    assert history
    assert [e for e in history if e["trace_id"] != trace_id] == []
    assert traced["console_status"] == 200
    assert "<dt>Trace</dt>" in traced["console"] and trace_id in traced["console"]
    # (httpx logs the test's own client calls, which are not the service's)
    lines = [line for line in traced["logs"]
             if gid in json.dumps(line) and line["logger"] != "httpx"]
    loggers = {line["logger"] for line in lines}
    assert {"messaging.relay", "messaging.consumer"} <= loggers, lines
    assert all(line.get("trace_id") == trace_id for line in lines), lines
