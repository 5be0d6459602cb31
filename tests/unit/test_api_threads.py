"""``api.threads``: the routes' hand-off to worker threads (the lifespan's bounded pool)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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

    # A loop of its own in a thread of its own: in the whole suite, the browser tests' sync
    # Playwright keeps an event loop running in the main thread, where asyncio.run refuses.
    with ThreadPoolExecutor(1) as runner:
        results = runner.submit(asyncio.run, main()).result()
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


def test_a_cancelled_callers_call_runs_to_its_end_and_the_loops_shutdown_waits() -> None:
    done: list[str] = []
    started = threading.Event()

    def commit() -> str:
        started.set()
        time.sleep(0.2)
        done.append("committed")
        return "ok"

    async def main() -> tuple[bool, list[str]]:
        install_worker_pool(2)
        task = asyncio.ensure_future(blocking(commit))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            cancelled = True
        else:
            cancelled = False
        return cancelled, list(done)  # the call is still running

    with ThreadPoolExecutor(1) as runner:
        cancelled, seen_by_the_caller = runner.submit(asyncio.run, main()).result()
    assert cancelled and seen_by_the_caller == []
    assert done == ["committed"]  # asyncio.run returned only after the call ended


def test_errors_reach_the_caller_and_the_pool_is_bounded() -> None:
    def fail() -> None:
        raise ValueError("refused")

    async def main() -> tuple[str, int]:
        pool = install_worker_pool(2)
        try:
            await blocking(fail)
        except ValueError as exc:
            message = str(exc)
        await asyncio.gather(*(blocking(time.sleep, 0.01) for _ in range(10)))
        return message, len(pool._workers)

    with ThreadPoolExecutor(1) as runner:
        message, threads = runner.submit(asyncio.run, main()).result()
    assert message == "refused" and 1 <= threads <= 2
