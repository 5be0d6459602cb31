"""A scripted n8n stand-in that speaks only the contract (§4), over a real RabbitMQ.

It consumes ``n8n.generation.jobs`` and answers each job as a *script* says: samples or a
final asset, a failure (retryable or not), progress, duplicates, garbage, silence (so the
deadline fires) or a late answer. Used by the integration tests, the benchmark and the
fault-injection run. It never reads AMQP properties — only bodies, like n8n.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import pika

JOBS_QUEUE = "n8n.generation.jobs"


@dataclass(frozen=True)
class Reply:
    """One message to publish in answer to a job, ``delay`` seconds after receiving it."""

    kind: str  # samples_ready | final_ready | failed | progress | garbage
    delay: float = 0.0
    retryable: bool = True
    code: str = "model_unavailable"
    raw: bytes | None = None  # for kind == "garbage": the exact body to send


Script = Callable[[dict[str, Any]], list[Reply]]


def happy(job: dict[str, Any]) -> list[Reply]:
    return [Reply("samples_ready" if job["stage"] == "samples" else "final_ready")]


def result_body(job: dict[str, Any], reply: Reply) -> tuple[str, bytes]:
    """(routing key suffix, body) for ``reply`` to ``job``, exactly as docs/messages.md shows."""
    base = {"generation_id": job["generation_id"], "job_id": job["job_id"]}
    prefix = job["storage"]["prefix"]
    bucket = job["storage"]["bucket"]
    if reply.kind == "samples_ready":
        size = job["sample_size"]
        body: dict[str, Any] = {
            "event_type": "AIGenerationSamplesReady", **base,
            "samples": [{"sample_id": f"s{i}", "url": f"s3://{bucket}/{prefix}s{i}.png",
                         "width": size, "height": size}
                        for i in range(1, job["sample_count"] + 1)],
            "model": "stand-in", "duration_ms": 1}
    elif reply.kind == "final_ready":
        out = job["output"]
        body = {"event_type": "AIGenerationFinalAssetReady", **base,
                "asset": {"url": f"s3://{bucket}/{prefix}final.png", "width": out["width"],
                          "height": out["height"], "format": "png"}}
    elif reply.kind == "failed":
        body = {"event_type": "AIGenerationFailed", **base,
                "error": {"code": reply.code, "message": "stand-in failure",
                          "retryable": reply.retryable}}
    elif reply.kind == "progress":
        body = {"event_type": "AIGenerationProgress", **base, "percent": 50}
    elif reply.kind == "garbage":
        return "samples_ready", reply.raw or b"{not json"
    else:
        raise ValueError(reply.kind)
    if "trace" in job:  # like the shipped workflow: the job's trace context goes back
        body["trace"] = job["trace"]
    suffix = {"samples_ready": "samples_ready", "final_ready": "final_ready",
              "failed": "failed", "progress": "progress"}[reply.kind]
    return suffix, json.dumps(body).encode()


class _ConsumerThread:
    """A pika consumer on its own thread that reconnects after a broker restart."""

    name = "consumer"

    def __init__(self, url: str) -> None:
        self.url = url
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(20):
            raise RuntimeError(f"{self.name} could not connect")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._session()
            except Exception:  # the broker restarted: reconnect, as n8n and consumers do
                if self._stop.is_set():
                    return
                time.sleep(0.5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _session(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            self._subscribe(conn, conn.channel())
            self.ready.set()
            while not self._stop.is_set():
                conn.process_data_events(time_limit=0.2)
        finally:
            if conn.is_open:
                conn.close()

    def _subscribe(self, conn: Any, ch: Any) -> None:
        """Declare and ``basic_consume`` on the fresh channel ``ch``."""
        raise NotImplementedError


class ScriptedN8n(_ConsumerThread):
    """Runs on its own thread with its own connection; ``stop()`` to end it."""

    name = "scripted-n8n"

    def __init__(self, url: str, script: Script = happy, *, prefetch: int = 500) -> None:
        super().__init__(url)
        self.script = script
        self.prefetch = prefetch
        self.jobs: list[dict[str, Any]] = []
        self.sent = 0
        self._lock = threading.Lock()

    def _subscribe(self, conn: Any, ch: Any) -> None:
        ch.queue_declare(JOBS_QUEUE, passive=True)  # the orchestrator declares it
        ch.basic_qos(prefetch_count=self.prefetch)
        # Replies are confirmed and the job is acknowledged only once they all are, like
        # n8n acking when its execution finishes: a broker restart in between makes the
        # job come back (and the orchestrator sees duplicates), never lose its answer.
        ch.confirm_delivery()

        def on_job(ch: Any, method: Any, _props: Any, body: bytes) -> None:
            job = json.loads(body)
            with self._lock:
                self.jobs.append(job)
            replies = self.script(job)
            for reply in replies:
                if reply.delay > 0:
                    conn.call_later(reply.delay,
                                    lambda j=job, r=reply: self._publish(ch, j, r))
                else:
                    self._publish(ch, job, reply)
            last = max((r.delay for r in replies), default=0.0)
            if last > 0:
                conn.call_later(last + 0.001,
                                lambda tag=method.delivery_tag: ch.basic_ack(tag))
            else:
                ch.basic_ack(method.delivery_tag)

        ch.basic_consume(JOBS_QUEUE, on_job)

    def _publish(self, ch: Any, job: dict[str, Any], reply: Reply) -> None:
        if not ch.is_open:
            return
        suffix, body = result_body(job, reply)
        reply_to = job["reply"]
        ch.basic_publish(reply_to["exchange"], reply_to["routing_key_prefix"] + suffix, body,
                         pika.BasicProperties(content_type="application/json", delivery_mode=2))
        with self._lock:
            self.sent += 1


class Collector(_ConsumerThread):
    """Consumes what the Notification Service and Odoo would receive, into lists."""

    name = "collector"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.notifications: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.properties: list[Any] = []

    def _subscribe(self, conn: Any, ch: Any) -> None:
        for name in ("test.notifications", "test.events"):
            ch.queue_declare(name, durable=True)
        ch.queue_bind("test.notifications", "creativeflow.notifications", "#")
        ch.queue_bind("test.events", "creativeflow.events", "generation.*")

        def keep(target: list[dict[str, Any]]) -> Callable[..., None]:
            def on(ch: Any, method: Any, props: Any, body: bytes) -> None:
                target.append(json.loads(body))
                self.properties.append(props)
                ch.basic_ack(method.delivery_tag)
            return on

        ch.basic_consume("test.notifications", keep(self.notifications))
        ch.basic_consume("test.events", keep(self.events))
        # The DLQ is the service's own: it drains it into its dead-letter store.


def publish_raw(url: str, routing_key: str, body: bytes) -> None:
    """Publish a result body as a (possibly broken) producer would."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().basic_publish("creativeflow.generation", routing_key, body,
                                     pika.BasicProperties(delivery_mode=2))
    finally:
        conn.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05,
             message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")
