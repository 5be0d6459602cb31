"""The result policy over the real RabbitMQ and PostgreSQL: a result from n8n whose URLs, ids
or format the web app must never render is not applied, is recorded as ``rejected`` with the
reason ``unsafe_result`` (and what was wrong), is counted, and never becomes a notification."""

from __future__ import annotations

import json
from typing import Any

import pytest

from standins.n8n import Collector, Reply, ScriptedN8n, publish_raw, result_body, wait_for
from tests.integration.rabbit_fixtures import SERVICE, Running

pytestmark = pytest.mark.integration

UNSAFE_SAMPLES = [
    ("samples.0.url", {"url": "javascript:alert(document.cookie)"}),
    ("samples.0.url", {"url": "data:text/html,<script>alert(1)</script>"}),
    ("samples.0.url", {"url": "file:///etc/passwd"}),
    ("samples.0.url", {"url": "http://169.254.169.254/latest/meta-data/"}),  # http: off here
    ("samples.0.url", {"url": "https://user:pw@cdn.example.com/a.png"}),
    ("samples.0.url", {"url": "https://cdn.example.com/a\u202e.png"}),
    ("samples.0.sample_id", {"sample_id": "<img src=x onerror=alert(1)>"}),
    ("samples.0.sample_id", {"sample_id": "s1\u200b"}),
]
UNSAFE_ASSETS = [
    ("asset.url", {"url": "javascript:alert(1)"}),
    ("asset.url", {"url": "http://127.0.0.1/final.png"}),
    ("asset.format", {"format": "<svg>"}),
    ("asset.format", {"format": "svg"}),
]


def _body(job: dict[str, Any], kind: str, change: dict[str, Any]) -> bytes:
    _, raw = result_body(job, Reply(kind))
    data = json.loads(raw)
    if kind == "samples_ready":
        data["samples"][0].update(change)
    else:
        data["asset"].update(change)
    return json.dumps(data).encode()


def _unsafe_rows(running: Running, gen_id: str) -> list[dict[str, Any]]:
    return [e["detail"] for e in running.history(gen_id)
            if e["kind"] == "rejected" and e["detail"].get("reason") == "unsafe_result"]


def test_every_unsafe_result_is_rejected_and_never_notified(running: Running) -> None:
    url = running.runtime.settings.amqp_url or ""
    running.grant("u-unsafe", "10.00")
    with Collector(url) as seen, ScriptedN8n(url, lambda job: []) as n8n:
        gen = running.start("u-unsafe", "unsafe-1")
        wait_for(lambda: len(n8n.jobs) == 1, message="the samples job")
        samples_job = n8n.jobs[0]
        for _, change in UNSAFE_SAMPLES:
            publish_raw(url, "generation.result.samples_ready",
                        _body(samples_job, "samples_ready", change))
        wait_for(lambda: len(_unsafe_rows(running, gen["id"])) == len(UNSAFE_SAMPLES),
                 message="every unsafe samples result rejected")
        assert running.get(gen["id"])["state"] == "processing_samples"
        assert running.get(gen["id"])["samples"] == []

        # The inbox did not swallow the job: the corrected result still applies.
        suffix, good = result_body(samples_job, Reply("samples_ready"))
        publish_raw(url, f"generation.result.{suffix}", good)
        running.wait_state(gen["id"], "awaiting_selection")
        r = running.client.post(f"/api/v1/generations/{gen['id']}/selection",
                                json={"sample_id": "s1"}, headers=SERVICE)
        assert r.status_code == 202, r.text
        wait_for(lambda: len(n8n.jobs) == 2, message="the final job")
        final_job = n8n.jobs[1]
        for _, change in UNSAFE_ASSETS:
            publish_raw(url, "generation.result.final_ready",
                        _body(final_job, "final_ready", change))
        total = len(UNSAFE_SAMPLES) + len(UNSAFE_ASSETS)
        wait_for(lambda: len(_unsafe_rows(running, gen["id"])) == total,
                 message="every unsafe final result rejected")
        view = running.get(gen["id"])
        assert view["state"] == "processing_final" and view["final_asset"] is None
        wait_for(lambda: any(n["type"] == "samples_ready" for n in seen.notifications),
                 message="the one safe notification")

    rows = _unsafe_rows(running, gen["id"])
    # Several consumer workers: the order of rejection is not the order of publishing.
    assert sorted(r["field"] for r in rows) == sorted(
        f for f, _ in UNSAFE_SAMPLES + UNSAFE_ASSETS)
    for row in rows:
        assert row["problem"] and row["job_id"] in (samples_job["job_id"], final_job["job_id"])
        assert "<" not in json.dumps(row)  # the detail names the problem, not the payload
    published = json.dumps(seen.notifications + seen.events)
    for needle in ("javascript:", "data:text", "file:", "169.254", "onerror", "svg",
                   "127.0.0.1", "\\u202e", "\\u200b", "user:pw"):
        assert needle not in published, needle
    assert [n["type"] for n in seen.notifications if n["type"] != "progress"] == [
        "samples_ready"]
    metrics = running.client.get("/metrics").text
    for event_type, count in (("AIGenerationSamplesReady", len(UNSAFE_SAMPLES)),
                              ("AIGenerationFinalAssetReady", len(UNSAFE_ASSETS))):
        assert (f'aigen_results_total{{event_type="{event_type}",'
                f'outcome="unsafe_result"}} {float(count)}') in metrics
