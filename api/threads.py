"""Handing blocking work (database, billing calls) from the event loop to a worker thread.

Every route that blocks calls :func:`blocking`. It runs the function on the event loop's
default executor, which the application's lifespan sets to a
:class:`~concurrent.futures.ThreadPoolExecutor` of ``ApiDeps.worker_threads`` threads (one
database connection each; :func:`install_worker_pool`). That is about half the CPU per hand-off
of AnyIO's ``to_thread`` (Starlette's ``run_in_threadpool``): no sniffio lookup, capacity
limiter or cancel scope, and the work queue is the C ``SimpleQueue`` instead of a
``queue.Queue`` whose ``Condition.notify`` showed as the service's hottest function under load.

The caller's context variables (trace context, log context) go with the call, as they do
with AnyIO. A cancelled caller does not stop the call: it runs to its end (its transaction
commits or rolls back) and the loop's shutdown waits for it, as AnyIO's does.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def install_worker_pool(threads: int) -> ThreadPoolExecutor:
    """Make a pool of ``threads`` the running loop's default executor (from the lifespan)."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="api-worker")
    asyncio.get_running_loop().set_default_executor(pool)
    return pool


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, with the caller's context variables."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(None, call)
