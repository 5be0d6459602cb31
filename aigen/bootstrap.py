"""The composition root: the only module that wires settings, database, broker and handlers.

It builds things and connects them; it holds no behaviour of its own. Background jobs live in
:mod:`aigen.jobs`, the broker adapters in :mod:`messaging`, the rules in :mod:`saga`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Connection, Engine, text

from aigen import telemetry
from aigen.demo_worker import DemoWorker, redispatch_unanswered
from aigen.jobs.dead_letters import DeadLetterDrain
from aigen.jobs.sweeper import REAP_EVERY_S, Sweeper
from aigen.metrics import PrometheusObserver
from aigen.settings import Settings
from api.app import ApiDeps, create_app
from api.asset_links import S3LinkConfig, S3Links
from messaging.broker import Broker
from messaging.consumer import ResultConsumer
from messaging.inprocess import InProcessBroker
from messaging.rabbitmq import RabbitBroker
from messaging.relay import OutboxRelay
from persistence.db import make_engine, migrate
from persistence.external_billing import (
    ExternalBilling,
    HttpBillingClient,
    reap_pending_holds,
)
from persistence.ledger import SqlLedger
from persistence.outbox_store import SqlOutboxStore
from persistence.uow import SqlUnitOfWork
from saga.messagebus import MessageBus
from saga.messages import RESULTS_QUEUE
from saga.ports import Billing
from saga.queries import Queries


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    bus: MessageBus
    broker: Broker
    relay: OutboxRelay
    consumer: ResultConsumer
    sweeper: Sweeper
    app: FastAPI
    registry: CollectorRegistry
    demo_worker: DemoWorker | None = None
    dead_letters: DeadLetterDrain | None = None

    def start(self) -> None:
        self.broker.start()
        self.broker.consume_batches(RESULTS_QUEUE, self.consumer.handle_batch,
                                    max_batch=self.settings.consumer_batch_size)
        if self.dead_letters:
            self.dead_letters.start()
        if self.demo_worker:
            self.demo_worker.start()
            if isinstance(self.broker, InProcessBroker):  # its queues died with the last run
                redispatch_unanswered(self.engine)
        self.relay.start()
        self.sweeper.start()

    def stop(self) -> None:
        self.sweeper.stop()
        self.relay.stop()
        if self.demo_worker:
            self.demo_worker.stop()
        self.consumer.stop()  # retries still waiting stay unacked: the broker redelivers them
        self.broker.stop()
        self.engine.dispose()
        telemetry.shutdown()  # flushes the last spans (a no-op when tracing is off)


def asset_links(settings: Settings) -> S3Links | None:
    """Presigned download links for s3:// assets, when ``AIGEN_S3_ENDPOINT_URL`` is set."""
    if settings.s3_endpoint_url is None:
        return None
    assert settings.s3_access_key_id and settings.s3_secret_access_key  # checked by Settings
    return S3Links(S3LinkConfig(
        endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key.get_secret_value(),
        ttl_s=settings.s3_presign_ttl_s, bucket=settings.storage_bucket,
        addressing_style=settings.s3_addressing_style))


def build(settings: Settings, *, broker: Broker | None = None, run_migrations: bool = True
          ) -> Runtime:
    telemetry.configure()  # on only when OTEL_* asks for it; a no-op the second time
    db_url = settings.resolved_database_url
    if run_migrations:
        migrate(db_url)
    # One connection for every thread that may hold one at once: the API's worker threads
    # (db_pool_size of them), the result consumer's workers, and the relay, the sweeper and
    # a health/metrics read. A smaller pool opens and closes overflow connections under load.
    engine = make_engine(db_url, pool_size=settings.db_pool_size + settings.consumer_workers + 3)
    telemetry.instrument_sqlalchemy(engine)
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    retry = settings.retry_policy()  # the one retry policy (saga/retry.py)
    if broker is None:
        broker = (InProcessBroker() if settings.embedded else RabbitBroker(
            settings.amqp_url or "", prefetch=settings.consumer_prefetch,
            workers=settings.consumer_workers,
            on_unroutable=lambda exchange, _key: observer.count("unroutable", exchange=exchange),
            retry=retry.limited(cap=min(retry.cap, 10.0))))

    store = SqlOutboxStore(engine)
    relay = OutboxRelay(store, broker, observer, batch_size=settings.relay_batch_size,
                        retry=retry, tracer=telemetry)
    billing_factory: Callable[[Connection], Billing] = SqlLedger
    reap: Callable[[datetime], int] | None = None
    if settings.billing_url:
        # Within a request: a couple of quick tries; the caller's own retry does the rest.
        client = HttpBillingClient(settings.billing_url, timeout=settings.billing_timeout_s,
                                   policy=retry.limited(base=min(retry.base, 0.1), cap=1.0,
                                                        max_attempts=min(retry.max_attempts,
                                                                         2)))
        billing_factory = functools.partial(ExternalBilling, client=client)
        reap = functools.partial(reap_pending_holds, engine, client,
                                 grace=timedelta(seconds=settings.billing_pending_grace_s))

    def uow_factory() -> SqlUnitOfWork:
        return SqlUnitOfWork(engine, billing_factory, after_commit=relay.wake)

    bus = MessageBus(uow_factory, settings.saga_config(), observer=observer, retry=retry,
                     tracer=telemetry)
    # A result waiting for its retry holds a prefetch slot: half the window at most.
    consumer = ResultConsumer(bus, broker, observer, retry, tracer=telemetry,
                              max_deferred=max(1, settings.consumer_prefetch // 2))
    sweeper = Sweeper(bus, engine, settings.sweeper_interval_s, reap, retry,
                      reap_every_s=min(REAP_EVERY_S, settings.billing_pending_grace_s))
    observer.gauge("aigen_outbox_backlog", "Outbox rows not yet confirmed by the broker",
                   store.backlog)
    observer.gauge("aigen_result_retries_waiting",
                   "Results waiting (unacked) for their retry's backoff", consumer.waiting)

    def database_ready() -> bool:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True

    demo_worker = None
    assets_dir: Path | None = None
    if settings.run_demo_worker:
        assets_dir = settings.data_dir / "assets"
        public = settings.public_url or f"http://{settings.http_host}:{settings.http_port}"
        demo_worker = DemoWorker(broker, assets_dir, public, settings.demo_delay_s)
    app = create_app(ApiDeps(
        bus=bus, queries=Queries(uow_factory), api_keys=settings.resolved_api_keys(),
        readiness={"database": database_ready, "broker": broker.healthy},
        registry=registry, assets_dir=assets_dir, worker_threads=settings.db_pool_size,
        input_asset_hosts=settings.input_asset_host_list, public_docs=settings.public_docs,
        metrics_token=settings.metrics_token or None, asset_links=asset_links(settings)))
    telemetry.instrument_fastapi(app)
    return Runtime(settings, engine, bus, broker, relay, consumer, sweeper, app, registry,
                   demo_worker, DeadLetterDrain(bus, broker))
