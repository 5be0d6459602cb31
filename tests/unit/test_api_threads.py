"""``api.threads``: the routes' hand-off to worker threads (the lifespan's bounded pool)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

from fastapi.testclient import TestClient

from api.app import ApiDeps, create_app
from api.threads import blocking, install_worker_pool

TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("trace", default="none")


def test_blocking_runs_on_the_installed_pool_with_the_callers_context() -> None:
    def where(offset: int) -> tuple[str, str, int]:
        time.sleep(0.01)  # long enough for the calls to overlap
        return threading.current_thread().name, TRACE.get(), offset + 1

    async def main() -> list[tuple[str, str, int]]:
        install_worker_pool(3)
        TRACE.set("trace-1")  # the trace context of the request, say
        return list(await asyncio.gather(*(blocking(where, n) for n in range(20))))

    results = asyncio.run(main())
    assert [r[2] for r in results] == list(range(1, 21))
    assert {r[1] for r in results} == {"trace-1"}
    names = {r[0] for r in results}
    assert all(n.startswith("api-worker") for n in names) and 1 <= len(names) <= 3


def test_the_apps_lifespan_installs_the_pool_of_worker_threads() -> None:
    seen: list[str] = []

    class Bus:
        def handle(self, cmd: object, idem: object = None) -> object:
            raise AssertionError("not called")

    def ready() -> bool:
        seen.append(threading.current_thread().name)
        return True

    deps = ApiDeps(bus=Bus(), queries=None,  # type: ignore[arg-type]
                   api_keys={}, readiness={"database": ready}, worker_threads=2)
    with TestClient(create_app(deps)) as client:
        assert client.get("/health/ready").status_code == 200
    assert len(seen) == 1 and seen[0].startswith("api-worker"), seen
