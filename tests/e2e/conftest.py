"""Fixtures for the end-to-end tier: the orchestrator against a REAL n8n (docs/n8n.md).

One n8n stack per session (own RabbitMQ vhost, moto S3, the image-model stand-in, n8n
1.123.81 running the shipped ``aigen/n8n/workflow.json``). The orchestrator declares its
topology in that vhost before n8n activates the workflow, exactly as in production. Each test
then starts its own in-process orchestrator runtime (so a case can shorten deadlines) on the
session's PostgreSQL database, which ``pg_engine`` empties before every test.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pika.exceptions
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from aigen.bootstrap import build
from messaging.rabbitmq import RabbitBroker
from standins.n8n import wait_for
from tests.conftest import unavailable
from tests.integration.rabbit_fixtures import Running, ledger_report, settings_for
from tests.n8n_support import (
    N8N_VERSION,
    N8nStack,
    N8nStatus,
    N8nUnavailable,
    RabbitVhost,
    ensure_installed,
    n8n_available,
)
from tests.n8n_support.rabbit import JOBS_QUEUE, RESULTS_QUEUE
from tests.n8n_support.runner import n8n_home

log = logging.getLogger("tests.e2e")
log.setLevel(logging.INFO)


def _orchestrator_declares(vhost: RabbitVhost) -> None:
    """The orchestrator's own start-up declaration (docs/messages.md), before n8n activates."""
    RabbitBroker(vhost.url).declare()


def _install_n8n() -> None:
    """Install the pinned n8n into the cache folder (outside the repo) when it is missing."""
    status = n8n_available()
    if status is N8nStatus.INSTALLED:
        return
    if status is N8nStatus.UNAVAILABLE:
        unavailable(f"n8n {N8N_VERSION} is not installed in {n8n_home()} and cannot be "
                    "installed here (node and npm are needed)")
    print(f"\ninstalling n8n {N8N_VERSION} into {n8n_home()} (about 2 minutes, once)...",
          flush=True)
    t0 = time.monotonic()
    try:
        ensure_installed()
    except (N8nUnavailable, subprocess.SubprocessError, OSError) as exc:
        unavailable(f"n8n {N8N_VERSION} could not be installed into {n8n_home()}: {exc} "
                    f"(npm output: {n8n_home() / 'install.log'})")
    print(f"n8n installed in {time.monotonic() - t0:.0f}s", flush=True)


@pytest.fixture(scope="session")
def n8n_stack() -> Iterator[N8nStack]:
    """vhost (topology declared by the orchestrator) + moto S3 + model stand-in + real n8n."""
    for tool in ("rabbitmqctl", "psql"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed; the real-n8n tests need it")
    _install_n8n()
    stack = N8nStack(declare_topology=_orchestrator_declares)
    t0 = time.monotonic()
    try:
        stack.start()
    except (subprocess.CalledProcessError, pika.exceptions.AMQPConnectionError) as exc:
        # RabbitMQ / PostgreSQL missing is an environment problem (fails under CI=true);
        # n8n itself failing to start is a real failure and propagates.
        unavailable(f"RabbitMQ or PostgreSQL is not usable for the n8n stack: {exc}")
    assert stack.n8n is not None and stack.n8n.proc is not None
    message = (f"n8n {N8N_VERSION} stack up in {time.monotonic() - t0:.1f}s: vhost "
               f"{stack.vhost.name}, n8n :{stack.n8n.port} (pid {stack.n8n.proc.pid}), "
               f"S3 {stack.s3.endpoint}, model {stack.image_api.base_url}")
    print(f"\n{message}", flush=True)
    log.info(message)
    try:
        yield stack
    finally:
        stack.stop()
        print(f"\nn8n stack down; vhost {stack.vhost.name} deleted", flush=True)


def _model_reachable(stack: N8nStack) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{stack.image_api.port}/_admin/stats",
                         timeout=1).is_success
    except httpx.HTTPError:
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the item, so fixtures can tell that a test failed."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def n8n(n8n_stack: N8nStack, request: pytest.FixtureRequest) -> Iterator[N8nStack]:
    """The session's stack with a healthy n8n and a model stand-in without pending faults."""
    stack = n8n_stack
    assert stack.n8n is not None and stack.n8n.proc is not None
    if stack.n8n.proc.poll() is not None:
        pytest.fail(f"n8n exited (code {stack.n8n.proc.returncode}):\n{stack.n8n.log_tail(40)}")
    wait_for(lambda: _model_reachable(stack), 20, 0.2, "the model stand-in to listen")
    stack.image_api.reset()
    yield stack
    stack.image_api.reset()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n--- n8n log tail ({stack.n8n.log_path}) ---\n{stack.n8n.log_tail(40)}",
              flush=True)


@pytest.fixture
def orchestrator(n8n: N8nStack, pg_engine: Engine, pg_url: str
                 ) -> Iterator[Callable[..., Running]]:
    """``orchestrator(**settings)`` starts the real runtime on PostgreSQL and n8n's vhost."""
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> Running:
            values: dict[str, Any] = {"retry_backoff_s": 0.2, "retry_backoff_max_s": 0.5,
                                      **overrides}
            runtime = build(settings_for(pg_url, n8n.vhost.url, **values), run_migrations=False)
            runtime.start()
            stack.callback(runtime.stop)
            client = stack.enter_context(TestClient(runtime.app))
            wait_for(runtime.broker.healthy, 20, 0.1, "the orchestrator's broker connections")
            return Running(runtime, client, pg_engine)

        yield start


def assert_ledger_clean(engine: Engine, vhost: RabbitVhost) -> dict[str, Any]:
    """No open holds, no double settlements, outbox drained, every job and result consumed."""
    wait_for(lambda: ledger_report(engine)["unsent"] == 0, 20, 0.1, "outbox drained")
    wait_for(lambda: vhost.queue_counts(JOBS_QUEUE)[0] == 0, 20, 0.1, "n8n to take every job")
    wait_for(lambda: vhost.queue_counts(RESULTS_QUEUE)[0] == 0, 20, 0.1,
             "the orchestrator to take every result")
    report = ledger_report(engine)
    assert report["open_holds"] == 0, report
    assert report["doubled"] == [], report
    assert report["unsent"] == 0, report
    assert report["journal_sums"] == report["balances"], report
    return report
