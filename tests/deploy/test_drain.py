"""``aigen serve`` drains on SIGTERM, as Kubernetes and ``docker compose stop`` send it.

A real ``aigen serve`` process on PostgreSQL + RabbitMQ gets SIGTERM while one HTTP request is
half-sent and while the outbox relay is busy with a stream of new generations. The in-flight
request must still be answered, no outbox row may be marked sent unless the broker really
has its message (the relay's claimed batch is confirmed or left unsent), and the process must
exit, cleanly, within the drain time the README documents.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from sqlalchemy import Engine, select

from messaging.broker import EXCHANGES
from persistence.tables import outbox
from tests.integration.rabbit_fixtures import SERVICE, spawn_serve
from tests.support.standin import wait_for

pytestmark = pytest.mark.integration

DRAIN_S = 15  # README, "Run the full stack": SIGTERM to exit; the k8s grace period allows it
CAPTURE = "test.drain.capture"


def _capture_everything(amqp_url: str) -> None:
    """A queue bound to every topic exchange, so each published message can be accounted for."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.queue_declare(CAPTURE, durable=True)
    for exchange, kind in EXCHANGES:
        ch.queue_bind(CAPTURE, exchange, "#" if kind == "topic" else "")
    conn.close()


def _captured_ids(amqp_url: str) -> set[str]:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ids = set()
    while True:
        method, props, _body = ch.basic_get(CAPTURE, auto_ack=True)
        if method is None:
            break
        ids.add(props.message_id)
    ch.queue_delete(CAPTURE)
    conn.close()
    return ids


def _half_sent_request(port: int, body: bytes) -> tuple[socket.socket, bytes]:
    """Open a POST /generations and send its headers and half its body; return the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DRAIN_S)
    head = (f"POST /api/v1/generations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: {SERVICE['Authorization']}\r\nIdempotency-Key: drain-in-flight\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    half = len(body) // 2
    sock.sendall(head + body[:half])
    return sock, body[half:]


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_answers_in_flight_requests_and_leaves_no_unpublished_row_sent(
        pg_engine: Engine, pg_url: str, amqp_url: str, tmp_path: Any) -> None:
    serve = spawn_serve({"AIGEN_DATABASE_URL": pg_url, "AIGEN_AMQP_URL": amqp_url,
                         "AIGEN_DEMO_WORKER": "false"}, str(tmp_path / "serve.log"))
    try:
        serve.wait_ready()
        _capture_everything(amqp_url)
        client = httpx.Client(base_url=serve.base, headers=SERVICE, timeout=5)
        assert client.post("/api/v1/accounts/drain/grants",
                           json={"amount": "1000.00", "reason": "t"}).status_code == 201

        # Keep the relay busy: generations keep arriving until the listener closes.
        stop_load = threading.Event()
        accepted: list[str] = []

        def load() -> None:
            i = 0
            while not stop_load.is_set():
                try:
                    r = client.post("/api/v1/generations",
                                    headers={"Idempotency-Key": f"drain-load-{i}"},
                                    json={"user_id": "drain", "prompt": "p", "format": "tiktok"})
                except httpx.HTTPError:
                    return  # the server stopped accepting connections
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
                i += 1

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        body = json.dumps({"user_id": "drain", "prompt": "held across SIGTERM",
                           "format": "instagram_post"}).encode()
        sock, rest = _half_sent_request(serve.port, body)
        # The load is running (and the relay with it) and the held request's body is half read.
        wait_for(lambda: len(accepted) >= 10, 30, message="generations accepted before SIGTERM")

        serve.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(1.0)  # shutdown under way: the listener is closed, our request still open
        sock.sendall(rest)
        response = _read_response(sock)
        sock.close()
        rc = serve.proc.wait(timeout=DRAIN_S + 5)
        elapsed = time.monotonic() - signalled
        stop_load.set()
        loader.join(timeout=5)

        assert response.startswith(b"HTTP/1.1 202"), response[:300]
        assert rc == 0, Path(serve.log_path).read_text()[-3000:]
        assert elapsed < DRAIN_S, f"took {elapsed:.1f}s to exit after SIGTERM"

        with pg_engine.connect() as conn:
            rows = conn.execute(select(outbox.c.message_id, outbox.c.sent_at)).all()
        sent = {r.message_id for r in rows if r.sent_at is not None}
        published = _captured_ids(amqp_url)
        assert sent, "the relay published nothing: the test did not exercise it"
        assert sent <= published, f"marked sent but never published: {sent - published}"
        held = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert held["id"] and len(rows) >= len(accepted) + 1
        print(f"drain: exit {elapsed:.2f}s after SIGTERM; {len(accepted)} accepted, "
              f"{len(sent)} rows sent, {len(rows) - len(sent)} left unsent")
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()
