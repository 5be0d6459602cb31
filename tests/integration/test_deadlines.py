"""Deadlines and retries with short configured deadlines, on PostgreSQL and RabbitMQ (§1, §5)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from standins.n8n import Reply, ScriptedN8n, happy, wait_for
from tests.integration.rabbit_fixtures import SERVICE, cents, ledger_report

pytestmark = pytest.mark.integration


def reasons(running: Any, gid: str) -> list[str]:
    return [e["detail"]["reason"] for e in running.history(gid) if e["kind"] == "rejected"]


def test_samples_deadline_times_out_releases_and_refuses_the_late_result(
        running_with: Any) -> None:
    running = running_with(samples_deadline_s=1.0)
    running.grant("d-1", "1.00")
    url = running.runtime.settings.amqp_url
    with ScriptedN8n(url, lambda job: [Reply("samples_ready", delay=2.5)]):
        gen = running.start("d-1", "d1")
        started = time.monotonic()
        timed_out = running.wait_state(gen["id"], "timed_out", timeout=10)
        assert time.monotonic() - started < 4  # within a few seconds of the deadline
        wait_for(lambda: "wrong_state" in reasons(running, gen["id"]), 10,
                 message="the late result to be refused")
    assert timed_out["error"]["code"] == "timed_out" and timed_out["deadline_at"] is None
    assert running.get(gen["id"])["credits"] == {"held": "0.00", "charged": "0.00",
                                                 "released": "0.25"}
    timers = [e for e in running.history(gen["id"]) if e["actor"] == "timer"]
    assert [e["trigger"] for e in timers] == ["timeout"]  # fired once
    assert ledger_report(running.engine)["balances"]["d-1"] == (cents("1.00"), 0)


def test_final_deadline_returns_to_selection_with_a_fresh_window(running_with: Any) -> None:
    running = running_with(final_deadline_s=1.0)
    running.grant("d-2", "5.00")
    url = running.runtime.settings.amqp_url
    with ScriptedN8n(url, lambda job: happy(job) if job["stage"] == "samples" else []):
        gen = running.start("d-2", "d2")
        running.wait_state(gen["id"], "awaiting_selection")
        r = running.client.post(f"/api/v1/generations/{gen['id']}/selection",
                                json={"sample_id": "s1", "resolution": "high"},
                                headers=SERVICE)
        assert r.status_code == 202
        wait_for(lambda: running.get(gen["id"])["error"] is not None, 10,
                 message="the final deadline")
    back = running.get(gen["id"])
    assert back["state"] == "awaiting_selection"
    assert back["error"]["code"] == "final_timed_out"
    assert back["credits"] == {"held": "0.00", "charged": "0.25", "released": "2.00"}
    assert back["deadline_at"] > r.json()["deadline_at"]  # a new selection window
    assert ledger_report(running.engine)["balances"]["d-2"] == (cents("4.75"), 0)


def test_selection_window_expires(running_with: Any) -> None:
    running = running_with(selection_window_s=1.0)
    running.grant("d-3", "5.00")
    with ScriptedN8n(running.runtime.settings.amqp_url):
        gen = running.start("d-3", "d3")
        expired = running.wait_state(gen["id"], "expired", timeout=10)
    assert expired["credits"] == {"held": "0.00", "charged": "0.25", "released": "0.00"}
    r = running.client.post(f"/api/v1/generations/{gen['id']}/selection",
                            json={"sample_id": "s1"}, headers=SERVICE)
    assert r.status_code == 409 and r.json()["code"] == "invalid_state"


def test_retries_back_off_then_fail_after_max_attempts(running_with: Any) -> None:
    running = running_with(max_attempts=3, retry_backoff_s=0.3, retry_backoff_max_s=2)
    running.grant("d-4", "1.00")
    url = running.runtime.settings.amqp_url
    seen: list[float] = []

    def always_failing(job: dict[str, Any]) -> list[Reply]:
        seen.append(time.monotonic())
        return [Reply("failed", retryable=True)]

    with ScriptedN8n(url, always_failing) as n8n:
        gen = running.start("d-4", "d4")
        failed = running.wait_state(gen["id"], "failed", timeout=15)
    assert [j["attempt"] for j in n8n.jobs] == [1, 2, 3]
    assert len({j["job_id"] for j in n8n.jobs}) == 3
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.55  # 0.3 s, then 0.6 s: exponential
    assert failed["attempt"] == 3 and failed["error"]["code"] == "model_unavailable"
    assert failed["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.25"}
    timers = [e["trigger"] for e in running.history(gen["id"]) if e["actor"] == "timer"]
    assert timers == ["redispatch", "redispatch"]


def test_each_dispatch_gets_its_own_deadline_and_a_passed_one_is_not_retried(
        running_with: Any) -> None:
    running = running_with(samples_deadline_s=1.0, retry_backoff_s=0.1)
    running.grant("d-5", "1.00")

    def first_fails_then_silence(job: dict[str, Any]) -> list[Reply]:
        return [Reply("failed", retryable=True)] if job["attempt"] == 1 else []

    with ScriptedN8n(running.runtime.settings.amqp_url, first_fails_then_silence) as n8n:
        gen = running.start("d-5", "d5")
        done = running.wait_state(gen["id"], "timed_out", timeout=10)
        time.sleep(0.5)
    assert [j["attempt"] for j in n8n.jobs] == [1, 2]  # the timeout was not retried
    assert n8n.jobs[1]["deadline_at"] > n8n.jobs[0]["deadline_at"]
    assert done["credits"]["released"] == "0.25"


def test_deadlines_survive_a_restart(running_with: Any) -> None:
    """A deadline stored while one process runs fires on the next one."""
    first = running_with(samples_deadline_s=1.5)
    first.grant("d-6", "1.00")
    gen = first.start("d-6", "d6")  # nobody answers: no n8n
    first.runtime.stop()
    second = running_with(samples_deadline_s=1.5)
    assert second.wait_state(gen["id"], "timed_out", timeout=10)["credits"]["released"] == \
        "0.25"


def test_housekeeping_trims_only_what_outlived_its_retention(pg_engine: Any) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import func, insert, select

    from persistence.housekeeping import purge
    from persistence.tables import idempotency_keys, inbox, outbox

    now = datetime(2026, 11, 20, tzinfo=UTC)
    old, recent = now - timedelta(days=8), now - timedelta(hours=1)
    with pg_engine.begin() as conn:
        for n, at in enumerate((old, recent)):
            conn.execute(insert(idempotency_keys).values(
                scope="s", key=f"k{n}", request_hash="h", status=202, body={}, created_at=at))
            conn.execute(insert(inbox).values(job_id=f"j{n}", event_type="e",
                                              generation_id="g", received_at=at))
            for sent in (at, None):  # an unsent row is never deleted, however old
                conn.execute(insert(outbox).values(
                    exchange="x", routing_key="r", message_id=f"m{n}{sent}", correlation_id="c",
                    type="t", body="{}", created_at=at, sent_at=sent, attempts=0))
    assert purge(pg_engine, now) == {"idempotency_keys": 1, "outbox": 1, "inbox": 1}
    with pg_engine.connect() as conn:
        assert conn.execute(select(idempotency_keys.c.key)).scalars().all() == ["k1"]
        assert conn.execute(select(inbox.c.job_id)).scalars().all() == ["j1"]
        assert conn.execute(select(func.count()).select_from(outbox)).scalar_one() == 3
    assert purge(pg_engine, now) == {"idempotency_keys": 0, "outbox": 0, "inbox": 0}
