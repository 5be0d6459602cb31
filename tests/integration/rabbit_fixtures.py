"""Helpers that run the real service on PostgreSQL + RabbitMQ and check its ledger."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from aigen.bootstrap import Runtime
from aigen.settings import Settings
from persistence.tables import accounts, holds, journal, outbox
from standins.n8n import wait_for

SERVICE = {"Authorization": "Bearer svc-key"}
SUPPORT = {"Authorization": "Bearer sup-key"}
KEYS = "service:svc-key,support:sup-key"


def settings_for(pg_url: str, amqp_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": pg_url, "amqp_url": amqp_url, "api_keys": KEYS,
        "sweeper_interval_s": 0.1, "retry_backoff_s": 0.1, "retry_backoff_max_s": 0.5,
        "demo_worker": False, **overrides,
    }
    return Settings(**values)


@dataclass
class Running:
    runtime: Runtime
    client: TestClient
    engine: Engine

    def grant(self, user: str, amount: str = "100.00", plan: str | None = None) -> None:
        if plan:
            assert self.client.put(f"/api/v1/accounts/{user}", json={"plan": plan},
                                   headers=SERVICE).status_code == 200
        r = self.client.post(f"/api/v1/accounts/{user}/grants",
                             json={"amount": amount, "reason": "test"}, headers=SERVICE)
        assert r.status_code == 201, r.text

    def start(self, user: str, key: str, **body: Any) -> dict[str, Any]:
        r = self.client.post("/api/v1/generations", headers={**SERVICE, "Idempotency-Key": key},
                             json={"user_id": user, "prompt": "spring sale banner",
                                   "format": "instagram_post", **body})
        assert r.status_code == 202, r.text
        return dict(r.json())

    def get(self, gid: str) -> dict[str, Any]:
        return dict(self.client.get(f"/api/v1/generations/{gid}", headers=SERVICE).json())

    def wait_state(self, gid: str, *states: str, timeout: float = 20) -> dict[str, Any]:
        wait_for(lambda: self.get(gid)["state"] in states, timeout,
                 message=f"{gid} to reach {states} (now {self.get(gid)['state']})")
        return self.get(gid)

    def history(self, gid: str) -> list[dict[str, Any]]:
        return list(self.client.get(f"/api/v1/generations/{gid}/history",
                                    headers=SUPPORT).json()["events"])


def ledger_report(engine: Engine) -> dict[str, Any]:
    """Numbers every end-to-end test checks: open holds, double settlements, backlog."""
    with engine.connect() as conn:
        open_holds = conn.execute(select(func.count()).select_from(holds)
                                  .where(holds.c.status == "open")).scalar_one()
        settle_rows = conn.execute(
            select(journal.c.hold_id, func.count()).where(journal.c.kind.in_(("commit", "release")))
            .group_by(journal.c.hold_id)).all()
        doubled = [h for h, n in settle_rows if n > 1]
        balances = {r.user_id: (r.balance_cents, r.held_cents)
                    for r in conn.execute(select(accounts))}
        sums = {r.user_id: (r.b, r.h) for r in conn.execute(
            select(journal.c.user_id, func.sum(journal.c.balance_delta_cents).label("b"),
                   func.sum(journal.c.held_delta_cents).label("h")).group_by(journal.c.user_id))}
        unsent = conn.execute(select(func.count()).select_from(outbox)
                              .where(outbox.c.sent_at.is_(None))).scalar_one()
    return {"open_holds": open_holds, "doubled": doubled, "balances": balances,
            "journal_sums": {u: (int(b), int(h)) for u, (b, h) in sums.items()},
            "unsent": unsent}


def cents(amount: str) -> int:
    return int(Decimal(amount) * 100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServeProcess:
    """``aigen serve`` as a separate OS process, as operators run it."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                with open(self.log_path) as log:
                    raise AssertionError(f"aigen serve exited: {log.read()[-2000:]}")
            try:
                return httpx.get(f"{self.base}/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(ready, timeout, interval=0.2, message="aigen serve to become ready")


def spawn_serve(env_overrides: dict[str, str], log_path: str) -> ServeProcess:
    port = free_port()
    env = {**os.environ, "AIGEN_HTTP_PORT": str(port), "AIGEN_API_KEYS": KEYS,
           "AIGEN_LOG_LEVEL": "WARNING", **env_overrides}
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen([sys.executable, "-m", "aigen.cli", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    return ServeProcess(port, proc, log_path)
