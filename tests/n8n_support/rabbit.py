"""RabbitMQ isolation for n8n runs: a throw-away vhost per run and the contract topology.

Each run gets its own vhost so that concurrent runs (or an orchestrator test on the same
broker) never see each other's jobs, consumers or leftovers; deleting the vhost removes
every queue and exchange the run created in one step.
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass, field
from types import TracebackType

import pika

GENERATION_EXCHANGE = "creativeflow.generation"
JOBS_QUEUE = "n8n.generation.jobs"
JOBS_BINDING = "generation.job.*"
RESULTS_QUEUE = "orchestrator.generation.results"
RESULTS_BINDING = "generation.result.#"
DLX_EXCHANGE = "creativeflow.dlx"
RESULTS_DLQ = "orchestrator.generation.results.dlq"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class RabbitVhost:
    """A vhost created with ``rabbitmqctl`` for one run and deleted afterwards."""

    host: str = "127.0.0.1"
    port: int = 5672
    username: str = "guest"
    password: str = "guest"
    name: str = field(default_factory=lambda: f"aigen-n8n-{uuid.uuid4().hex[:10]}")
    created: bool = False

    def create(self) -> RabbitVhost:
        _rabbitmqctl("add_vhost", self.name)
        self.created = True
        _rabbitmqctl("set_permissions", "-p", self.name, self.username, ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        if self.created:
            _rabbitmqctl("delete_vhost", self.name)
            self.created = False

    def __enter__(self) -> RabbitVhost:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    @property
    def url(self) -> str:
        """AMQP URL for this vhost (as the orchestrator's ``AIGEN_AMQP_URL`` would take it)."""
        vhost = self.name.replace("/", "%2F")
        return f"amqp://{self.username}:{self.password}@{self.host}:{self.port}/{vhost}"

    def connection_parameters(self) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.name,
            credentials=pika.PlainCredentials(self.username, self.password),
            heartbeat=60,
        )

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.connection_parameters())

    def queue_counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of ``queue`` via a passive declare."""
        with self.connect() as conn:
            ok = conn.channel().queue_declare(queue=queue, passive=True)
            return ok.method.message_count, ok.method.consumer_count

    def unacked(self, queue: str) -> int:
        """Messages delivered to a consumer and not yet acknowledged (needs rabbitmqctl)."""
        out = subprocess.run(
            [
                "rabbitmqctl",
                "-q",
                "list_queues",
                "-p",
                self.name,
                "--no-table-headers",
                "name",
                "messages_unacknowledged",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        raise KeyError(queue)


def declare_contract_topology(conn: pika.BlockingConnection) -> None:
    """Declare what the orchestrator declares at start-up (docs/messages.md), idempotently.

    Only for standalone checks: in production the orchestrator owns these declarations, and
    the n8n workflow neither asserts the queue nor declares the exchange.
    """
    ch = conn.channel()
    ch.exchange_declare(GENERATION_EXCHANGE, exchange_type="topic", durable=True)
    ch.exchange_declare(DLX_EXCHANGE, exchange_type="fanout", durable=True)
    ch.queue_declare(JOBS_QUEUE, durable=True)
    ch.queue_bind(JOBS_QUEUE, GENERATION_EXCHANGE, routing_key=JOBS_BINDING)
    ch.queue_declare(
        RESULTS_QUEUE, durable=True, arguments={"x-dead-letter-exchange": DLX_EXCHANGE}
    )
    ch.queue_bind(RESULTS_QUEUE, GENERATION_EXCHANGE, routing_key=RESULTS_BINDING)
    ch.queue_declare(RESULTS_DLQ, durable=True)
    ch.queue_bind(RESULTS_DLQ, DLX_EXCHANGE, routing_key="")
    ch.close()
