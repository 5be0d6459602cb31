"""Handing blocking work (database, billing calls) from the event loop to a worker thread.

Every route that blocks calls :func:`blocking`. It runs the function on the pool that the
application's lifespan installs (:func:`install_worker_pool`): at most
``ApiDeps.worker_threads`` threads (one database connection each), started as the load needs
them, and made the loop's default executor so that ``run_in_executor(None, …)`` uses the same
threads and the loop's shutdown waits for them.

A hand-off is an item on a C ``SimpleQueue`` and, when the call returns, one
``call_soon_threadsafe`` that settles a plain asyncio future. ``ThreadPoolExecutor.submit`` +
``asyncio.wrap_future`` did much more per call (a ``concurrent.futures.Future`` with its
``Condition``, a semaphore acquired and released around every item, a lock, chained-future
callbacks): about 10 % of the event loop's CPU under the bench's load. AnyIO's ``to_thread``
(Starlette's ``run_in_threadpool``) costs more still (sniffio lookup, capacity limiter,
cancel scope, a ``queue.Queue`` whose ``Condition.notify`` showed as the hottest function).

The caller's context variables (trace context, log context) go with the call, as they do
with AnyIO. A cancelled caller does not stop the call: it runs to its end (its transaction
commits or rolls back) and the loop's shutdown waits for it, as AnyIO's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


class WorkerPool(ThreadPoolExecutor):
    """A bounded pool of threads; :meth:`call` is the event loop's cheap hand-off.

    A ``ThreadPoolExecutor`` by type only (asyncio's ``set_default_executor`` insists on
    one): it runs its own workers, and its ``submit`` and ``shutdown`` keep the executor
    interface for ``run_in_executor`` and the loop's shutdown.

    A thread is started when an item finds no idle one, up to ``threads`` (as
    ``ThreadPoolExecutor`` does, so a light load keeps few threads and few connections).
    ``idle`` holds one token per thread that has finished an item and waits for the next:
    ``list.append`` and ``list.pop`` are atomic, so the loop and the workers need no lock.
    """

    def __init__(self, threads: int, name: str = "api-worker") -> None:
        super().__init__(max_workers=threads, thread_name_prefix=name)  # validates ``threads``
        self.max_threads = threads
        self.name = name
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._idle: list[None] = []
        self._workers: list[threading.Thread] = []
        self._start_lock = threading.Lock()  # submit() may come from any thread
        self._shutdown = False

    def call(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> asyncio.Future[T]:
        """``fn(*args, **kwargs)`` in a worker, in a copy of the caller's context; the
        result (or exception) settles the returned future on ``loop``."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new calls after shutdown")
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((contextvars.copy_context(), fn, args, kwargs, loop, future))
        self._wake_or_start()
        return future

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """:class:`~concurrent.futures.Executor`'s interface (``loop.run_in_executor``)."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[T] = Future()
        self._queue.put((None, fn, args, kwargs, None, future))
        self._wake_or_start()
        return future

    def _wake_or_start(self) -> None:
        try:
            self._idle.pop()  # an idle worker will take the item
        except IndexError:
            if len(self._workers) < self.max_threads:
                with self._start_lock:
                    if len(self._workers) < self.max_threads:
                        thread = threading.Thread(
                            target=self._work, daemon=True,
                            name=f"{self.name}_{len(self._workers)}")
                        thread.start()
                        self._workers.append(thread)

    def _work(self) -> None:
        get, idle = self._queue.get, self._idle
        while True:
            item = get()
            if item is _STOP:
                self._queue.put(_STOP)  # for the next worker
                return
            context, fn, args, kwargs, loop, future = item
            del item
            if loop is None:  # submit(): a concurrent.futures.Future
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:
                        future.set_exception(exc)
            else:
                try:
                    result = context.run(fn, *args, **kwargs)
                except BaseException as exc:
                    _settle(loop, future, None, exc)
                else:
                    _settle(loop, future, result, None)
            del context, fn, args, kwargs, loop, future
            idle.append(None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no new calls; the queued ones still run (a caller may be waiting for its
        commit); with ``wait``, return once every worker has finished."""
        self._shutdown = True
        self._queue.put(_STOP)
        if wait:
            for thread in list(self._workers):
                thread.join()


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any,
            exc: BaseException | None) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(_set, future, result, exc)


def _set(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():  # the caller went away; the call ran to its end regardless
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


# The pool of each running loop (tests run apps on several loops in one process).
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WorkerPool] = \
    weakref.WeakKeyDictionary()


def install_worker_pool(threads: int) -> WorkerPool:
    """Make a pool of ``threads`` the running loop's default executor (from the lifespan)."""
    loop = asyncio.get_running_loop()
    pool = WorkerPool(threads)
    loop.set_default_executor(pool)
    _pools[loop] = pool
    return pool


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, with the caller's context variables."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:  # no lifespan ran (a bare ASGI call): the loop's own default executor
        call = _in_context(contextvars.copy_context(), fn, args, kwargs)
        return await loop.run_in_executor(None, call)
    return await pool.call(loop, fn, args, kwargs)


def _in_context(context: contextvars.Context, fn: Callable[..., T], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Callable[[], T]:
    return lambda: context.run(fn, *args, **kwargs)
