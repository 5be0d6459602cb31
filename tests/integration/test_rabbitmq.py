"""End to end through the real RabbitMQ and PostgreSQL, with a scripted n8n (docs/messages.md).

Over 300 lines: each test needs the whole running service, and they share its fixtures; the
file is a list of independent end-to-end scenarios, read one at a time.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from persistence.tables import dead_letters, generations, holds, inbox
from standins.n8n import Collector, Reply, ScriptedN8n, happy, publish_raw, wait_for
from tests.integration.rabbit_fixtures import (
    SERVICE,
    Running,
    cents,
    ledger_report,
    spawn_serve,
)

pytestmark = pytest.mark.integration


def test_happy_path_with_notifications_and_domain_events(running: Running) -> None:
    running.grant("u-1", "10.00")
    with Collector(running.runtime.settings.amqp_url or "") as seen, \
            ScriptedN8n(running.runtime.settings.amqp_url or "",
                        lambda job: [Reply("progress"), Reply(
                            "samples_ready" if job["stage"] == "samples" else "final_ready",
                            delay=0.3)]) as n8n:
        gen = running.start("u-1", "k1")
        running.wait_state(gen["id"], "awaiting_selection")
        r = running.client.post(f"/api/v1/generations/{gen['id']}/selection",
                                json={"sample_id": "s3", "resolution": "high"}, headers=SERVICE)
        assert r.status_code == 202, r.text
        done = running.wait_state(gen["id"], "completed")
        wait_for(lambda: len(seen.events) >= 4, message="four domain events")
        wait_for(lambda: {"samples_ready", "final_ready"}
                 <= {n["type"] for n in seen.notifications}, message="notifications")

    assert done["credits"] == {"held": "0.00", "charged": "2.25", "released": "0.00"}
    assert done["final_asset"]["width"] == 4096
    assert [j["stage"] for j in n8n.jobs] == ["samples", "final"]
    assert n8n.jobs[1]["selected_sample"]["sample_id"] == "s3"
    assert [(e["from_state"], e["to_state"]) for e in seen.events] == [
        ("requested", "processing_samples"), ("processing_samples", "awaiting_selection"),
        ("awaiting_selection", "processing_final"), ("processing_final", "completed")]
    assert seen.events[-1]["credits"]["charged"] == "2.25"
    types = [n["type"] for n in seen.notifications]
    assert types.count("progress") == 2 and types.count("samples_ready") == 1
    assert all(n["user_id"] == "u-1" and n["generation_id"] == gen["id"]
               for n in seen.notifications)
    for props in seen.properties:
        assert props.content_type == "application/json"
        assert props.delivery_mode == 2
        assert props.correlation_id == gen["id"]
        assert props.type in ("GenerationNotification", "GenerationStateChanged")
    bodies = {b["event_id"] for b in seen.notifications + seen.events}
    assert {p.message_id for p in seen.properties} == bodies
    report = ledger_report(running.engine)
    assert report["open_holds"] == 0 and report["doubled"] == [] and report["unsent"] == 0
    assert report["balances"]["u-1"] == (cents("7.75"), 0)


def test_regeneration_holds_and_charges_a_second_round(running: Running) -> None:
    running.grant("u-2", "10.00")
    with ScriptedN8n(running.runtime.settings.amqp_url or "") as n8n:
        gen = running.start("u-2", "k2")
        running.wait_state(gen["id"], "awaiting_selection")
        r = running.client.post(f"/api/v1/generations/{gen['id']}/regenerate",
                                json={"prompt": "autumn sale"}, headers=SERVICE)
        assert r.status_code == 202 and r.json()["credits"]["held"] == "0.25"
        again = running.wait_state(gen["id"], "awaiting_selection")
    assert again["prompt"] == "autumn sale" and again["credits"]["charged"] == "0.50"
    assert [j["prompt"] for j in n8n.jobs] == ["spring sale banner", "autumn sale"]
    assert ledger_report(running.engine)["balances"]["u-2"] == (cents("9.50"), 0)


def test_cancel_while_n8n_works_releases_and_refuses_the_late_result(running: Running) -> None:
    running.grant("u-3", "10.00")
    url = running.runtime.settings.amqp_url or ""
    with Collector(url) as seen, ScriptedN8n(url, lambda job: [Reply("samples_ready",
                                                                    delay=1.0)]):
        gen = running.start("u-3", "k3")
        wait_for(lambda: len(seen.events) >= 1, message="dispatch")
        r = running.client.post(f"/api/v1/generations/{gen['id']}/cancel", headers=SERVICE)
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        wait_for(lambda: any(e["kind"] == "rejected" for e in running.history(gen["id"])),
                 message="the late result to be refused")
        wait_for(lambda: "cancelled" in [n["type"] for n in seen.notifications],
                 message="cancel notification")
    final = running.get(gen["id"])
    assert final["state"] == "cancelled"
    assert final["credits"] == {"held": "0.00", "charged": "0.00", "released": "0.25"}
    rejected = [e for e in running.history(gen["id"]) if e["kind"] == "rejected"]
    assert rejected[0]["detail"]["reason"] == "wrong_state"
    assert seen.events[-1]["to_state"] == "cancelled"
    assert ledger_report(running.engine)["balances"]["u-3"] == (cents("10.00"), 0)


def test_retryable_failure_is_redispatched_then_succeeds(running: Running) -> None:
    running.grant("u-4", "10.00")

    def flaky(job: dict[str, Any]) -> list[Reply]:
        if job["attempt"] == 1:
            return [Reply("failed", retryable=True)]
        return happy(job)

    with ScriptedN8n(running.runtime.settings.amqp_url or "", flaky) as n8n:
        gen = running.start("u-4", "k4")
        done = running.wait_state(gen["id"], "awaiting_selection")
    assert done["attempt"] == 2 and done["credits"]["charged"] == "0.25"
    assert [j["attempt"] for j in n8n.jobs] == [1, 2]
    assert n8n.jobs[0]["job_id"] != n8n.jobs[1]["job_id"]
    with running.engine.connect() as conn:  # the hold survived the retry: one round, one hold
        assert conn.execute(select(func.count()).select_from(holds)).scalar_one() == 1


def test_results_delivered_three_times_and_shuffled_change_nothing(running: Running) -> None:
    """Every result three times with random delays: same states and ledger as a clean run."""
    rng = random.Random(7)
    n = 25

    def noisy(job: dict[str, Any]) -> list[Reply]:
        kind = "samples_ready" if job["stage"] == "samples" else "final_ready"
        return [Reply(kind, delay=rng.random() * 0.3) for _ in range(3)] + [
            Reply("progress", delay=rng.random() * 0.3)]

    url = running.runtime.settings.amqp_url or ""
    with ScriptedN8n(url, noisy) as n8n:
        for i in range(n):
            running.grant(f"u-{i}", "5.00")
        gens = [running.start(f"u-{i}", f"dup-{i}") for i in range(n)]
        for gen in gens:
            running.wait_state(gen["id"], "awaiting_selection")
            r = running.client.post(f"/api/v1/generations/{gen['id']}/selection",
                                    json={"sample_id": "s1"}, headers=SERVICE)
            assert r.status_code == 202
        for gen in gens:
            running.wait_state(gen["id"], "completed")
        wait_for(lambda: n8n.sent >= n * 8, message="all replies sent")
        wait_for(lambda: sum(1 for g in gens for e in running.history(g["id"])
                             if e["kind"] == "rejected") >= n * 4,
                 message="every duplicate to be refused")
    for gen in gens:
        final = running.get(gen["id"])
        assert final["credits"] == {"held": "0.00", "charged": "1.25", "released": "0.00"}
        reasons = [e["detail"]["reason"] for e in running.history(gen["id"])
                   if e["kind"] == "rejected"]
        assert reasons.count("duplicate") + reasons.count("wrong_state") == 4, reasons
    report = ledger_report(running.engine)
    assert report["doubled"] == [] and report["open_holds"] == 0
    assert all(v == (cents("3.75"), 0) for v in report["balances"].values())
    assert report["journal_sums"] == report["balances"]
    with running.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(inbox)).scalar_one() == 2 * n


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe not json", "not_json"),
    (b'{"event_type": "AIGenerationSamplesReady", "generation_id": 5, "job_id": "j"}', "schema"),
    (b'{"event_type": "AIGenerationFailed", "job_id": "j"}', "schema"),
    (b'{"event_type": "Bogus", "generation_id": "g", "job_id": "j"}', "schema"),
    (b"[1, 2, 3]", "schema"),
    (b'{"event_type": "AIGenerationFailed", "generation_id": "g\\u0000", "job_id": "j", '
     b'"error": {"code": "x"}}', "schema"),
    (b'{"event_type": "AIGenerationProgress", "generation_id": "g", "job_id": "j", '
     b'"percent": "40"}', "schema"),
    (json.dumps({"event_type": "AIGenerationProgress", "generation_id": "g", "job_id": "j",
                 "percent": 1, "pad": "x" * 300_000}).encode(), "too_large"),
])
def test_malformed_results_are_dead_lettered_and_change_nothing(
        running: Running, body: bytes, reason: str) -> None:
    running.grant("u-5", "10.00")
    url = running.runtime.settings.amqp_url or ""
    with Collector(url):
        with running.engine.connect() as conn:
            before = conn.execute(select(generations.c.id, generations.c.version)).all()
        publish_raw(url, "generation.result.samples_ready", body)
        # Through creativeflow.dlx and the DLQ into the service's dead-letter store.
        def stored() -> list[Any]:
            with running.engine.connect() as conn:
                return list(conn.execute(select(dead_letters).where(
                    dead_letters.c.reason.not_like("unroutable%"))))
        wait_for(lambda: len(stored()) == 1, message="the dead letter in the store")
        [row] = stored()
        assert bytes(row.body) == body and row.status == "open"
        assert row.reason.startswith(reason)
        assert (row.exchange, row.routing_key) == ("creativeflow.generation",
                                                   "generation.result.samples_ready")
        with running.engine.connect() as conn:
            assert conn.execute(select(generations.c.id, generations.c.version)).all() == before
        # The consumer is still alive: a normal generation goes through.
        with ScriptedN8n(url):
            gen = running.start("u-5", f"after-{reason}")
            running.wait_state(gen["id"], "awaiting_selection")


def test_result_for_unknown_generation_is_acknowledged_and_counted(running: Running) -> None:
    url = running.runtime.settings.amqp_url or ""
    publish_raw(url, "generation.result.failed", json.dumps({
        "event_type": "AIGenerationFailed", "generation_id": "nope", "job_id": "j1",
        "error": {"code": "x", "message": "", "retryable": False}}).encode())

    def counted() -> bool:
        metrics = running.client.get("/metrics").text
        return ('aigen_results_total{event_type="AIGenerationFailed",'
                'outcome="unknown_generation"} 1.0') in metrics
    wait_for(counted, message="the unknown-generation metric")


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def vhost_outage(vhost: str, seconds: float, during: Any = None) -> int:
    """The broker goes away for this test's vhost only: every connection to it is closed
    and none may reconnect for ``seconds`` (``during()`` runs meanwhile). Tests never stop
    the shared RabbitMQ server (``stop_app`` would break every other test run on the
    machine). Returns how many connections were closed."""
    rabbitmqctl("clear_permissions", "-p", vhost, "guest")  # no reconnecting meanwhile
    try:
        answer = rabbitmqctl("close_all_connections", "--vhost", vhost, "--limit", "1000",
                             "aigen test: broker outage")
        closed = int(answer.split()[1])  # "Closed 4 connections"
        started = time.monotonic()
        if during is not None:
            during()
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        return closed
    finally:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def test_broker_outage_mid_run_loses_and_doubles_nothing(running: Running,
                                                         amqp_vhost: str) -> None:
    """Every connection to our vhost dropped, and refused for 3 s, with generations in
    flight (the shared server stays up)."""
    n = 30
    url = running.runtime.settings.amqp_url or ""
    for i in range(n):
        running.grant(f"r-{i}", "5.00")
    with ScriptedN8n(url, lambda job: [Reply(
            "samples_ready" if job["stage"] == "samples" else "final_ready", delay=0.5)]):
        gens = [running.start(f"r-{i}", f"restart-{i}") for i in range(n)]
        closed = vhost_outage(amqp_vhost, 3.0, during=lambda: wait_for(
            lambda: not running.runtime.broker.healthy(), 3, message="the outage noticed"))
        assert closed >= 3  # the service's publisher and consumer, n8n's connection
        for gen in gens:
            running.wait_state(gen["id"], "awaiting_selection", timeout=60)
            assert running.client.post(f"/api/v1/generations/{gen['id']}/selection",
                                       json={"sample_id": "s2"},
                                       headers=SERVICE).status_code == 202
        for gen in gens:
            running.wait_state(gen["id"], "completed", timeout=60)
    wait_for(lambda: running.runtime.broker.healthy(), message="broker healthy again")
    wait_for(lambda: ledger_report(running.engine)["unsent"] == 0, message="outbox drained")
    report = ledger_report(running.engine)
    assert report["doubled"] == [] and report["open_holds"] == 0
    assert all(v == (cents("3.75"), 0) for v in report["balances"].values())


def test_two_service_processes_share_the_work(pg_engine: Any, pg_url: str, amqp_url: str,
                                              tmp_path: Any) -> None:
    import httpx

    env = {"AIGEN_DATABASE_URL": pg_url, "AIGEN_AMQP_URL": amqp_url,
           "AIGEN_SWEEPER_INTERVAL_S": "0.1"}
    procs = [spawn_serve(env, str(tmp_path / f"serve{i}.log")) for i in range(2)]
    try:
        for p in procs:
            p.wait_ready()
        n = 40
        with ScriptedN8n(amqp_url):
            clients = [httpx.Client(base_url=p.base, headers=SERVICE, timeout=10)
                       for p in procs]
            for i in range(n):
                r = clients[i % 2].post(f"/api/v1/accounts/m-{i}/grants",
                                        json={"amount": "5.00", "reason": "t"})
                assert r.status_code == 201
            ids = []
            for i in range(n):
                r = clients[i % 2].post("/api/v1/generations",
                                        headers={"Idempotency-Key": f"multi-{i}"},
                                        json={"user_id": f"m-{i}", "prompt": "p",
                                              "format": "tiktok"})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])

            def state(i: int, gid: str) -> str:
                return str(clients[(i + 1) % 2].get(f"/api/v1/generations/{gid}").json()["state"])
            for i, gid in enumerate(ids):
                wait_for(lambda i=i, gid=gid: state(i, gid) == "awaiting_selection", 30)
                assert clients[(i + 1) % 2].post(f"/api/v1/generations/{gid}/selection",
                                                 json={"sample_id": "s1"}).status_code == 202
            for i, gid in enumerate(ids):
                wait_for(lambda i=i, gid=gid: state(i, gid) == "completed", 30)
        wait_for(lambda: ledger_report(pg_engine)["unsent"] == 0, message="outbox drained")
        report = ledger_report(pg_engine)
        assert report["doubled"] == [] and report["open_holds"] == 0
        assert all(v == (cents("3.75"), 0) for v in report["balances"].values())
        with pg_engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(inbox)).scalar_one() == 2 * n
    finally:
        for p in procs:
            p.proc.terminate()
        for p in procs:
            p.proc.wait(timeout=15)




def test_service_starts_without_the_broker_and_reports_not_ready(
        pg_engine: Any, pg_url: str) -> None:
    from fastapi.testclient import TestClient

    from aigen.bootstrap import build
    from tests.integration.rabbit_fixtures import settings_for

    runtime = build(settings_for(pg_url, "amqp://guest:guest@127.0.0.1:1/%2F"),
                    run_migrations=False)
    runtime.start()  # must not raise: the broker may come up later
    try:
        with TestClient(runtime.app) as client:
            r = client.get("/health/ready")
            assert r.status_code == 503
            assert r.json()["checks"] == {"database": True, "broker": False}
            assert client.get("/health/live").status_code == 200
    finally:
        runtime.stop()


def test_database_connections_dropped_mid_run_lose_and_double_nothing(
        running: Running, pg_url: str) -> None:
    """Every server connection of the service killed (what a PostgreSQL restart looks like
    to a client) while generations are in flight: the API answers 503 until the pool has
    reconnected, the consumer hands results back to the broker, and everything completes."""
    from sqlalchemy import create_engine, text

    from persistence.db import normalize_url

    dbname = pg_url.rsplit("/", 1)[1]
    admin = create_engine(normalize_url(pg_url.rsplit("/", 1)[0] + "/postgres"),
                          isolation_level="AUTOCOMMIT")

    def drop_connections() -> None:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": dbname})

    def post(path: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
        for _ in range(100):  # Odoo retries a 503 with the same Idempotency-Key
            r = running.client.post(path, json=body,
                                    headers={**SERVICE, "Idempotency-Key": key})
            if r.status_code != 503:
                assert r.status_code in (201, 202), r.text
                return dict(r.json())
            time.sleep(0.1)
        raise AssertionError(f"{path} kept answering 503")

    n = 20
    url = running.runtime.settings.amqp_url or ""
    for i in range(n):
        post(f"/api/v1/accounts/pg-{i}/grants", f"grant-{i}", {"amount": "5.00", "reason": "t"})
    with ScriptedN8n(url, lambda job: [Reply(
            "samples_ready" if job["stage"] == "samples" else "final_ready", delay=0.2)]):
        gens = []
        for i in range(n):
            gens.append(post("/api/v1/generations", f"pgdrop-{i}",
                             {"user_id": f"pg-{i}", "prompt": "p", "format": "tiktok"}))
            if i % 7 == 3:
                drop_connections()

        def state(gid: str) -> str:
            r = running.client.get(f"/api/v1/generations/{gid}", headers=SERVICE)
            return str(r.json()["state"]) if r.status_code == 200 else "unavailable"

        for gen in gens:
            wait_for(lambda g=gen["id"]: state(g) == "awaiting_selection", 30)
            post(f"/api/v1/generations/{gen['id']}/selection", f"pgsel-{gen['id']}",
                 {"sample_id": "s1"})
        drop_connections()
        for gen in gens:
            wait_for(lambda g=gen["id"]: state(g) == "completed", 30)
    admin.dispose()
    running.engine.dispose()  # the test's own pooled connections were killed too
    wait_for(lambda: ledger_report(running.engine)["unsent"] == 0, message="outbox drained")
    report = ledger_report(running.engine)
    assert report["doubled"] == [] and report["open_holds"] == 0
    assert all(v == (cents("3.75"), 0) for v in report["balances"].values())
    assert report["journal_sums"] == report["balances"]
