"""Throughput benchmark: complete generations through real PostgreSQL and RabbitMQ.

Each run starts ``--processes`` ``aigen serve`` processes on a fresh database and vhost, an
instant scripted n8n stand-in (its own process), optionally preloads ``--preload N``
completed generations, and drives ``--generations`` complete generations (start → samples →
selection → final) at ``--concurrency`` in flight from ``--clients`` asyncio load-generating
processes that react to the Notification Service's messages. Everything is on 127.0.0.1, the
load is bounded (``--generations``) and the run gives up after ``--timeout`` seconds.

For every run it prints:

* complete generations per second;
* API latency p50/p95/p99 per endpoint, client side (exact) and server side (interpolated
  from the service's ``aigen_http_request_seconds`` histogram, delta over the run);
* result-to-notification latency p50/p99 (the stand-in publishes a result → the user's
  notification arrives);
* **CPU ms per complete generation of each process separately**: every ``aigen serve``
  process, the PostgreSQL backends serving the bench database (the rest of the server is
  shared with the machine and printed apart, as is the CPU of backends that exited during the
  run, any database's), RabbitMQ (``beam.smp``, shared), the stand-in and the load
  generators — user + system time (the kernel part shown too), delta over the measured window;
* PostgreSQL commits, rows written, new connections, active and idle-in-transaction time,
  scans and buffers per complete generation (``pg_stat_database`` / ``pg_stat_user_tables`` of
  the bench database) and, with ``--count-sql``, the statements and transactions the service
  issued per generation and their shapes (SQLAlchemy engine events);
* peak and final RSS of each service process, and with ``--rss-every S`` the RSS over time.

Run the service of another checkout (a ``git worktree`` of an older commit with its own
``.venv``) with ``--checkout PATH``; compare two side by side, alternating runs, with
``--compare PATH_A PATH_B --runs 2``. ``--profile FILE`` records the first service process
with py-spy during the measured window (see ``bench/profile_summary.py``).

Needs the ``bench`` extra (``.venv/bin/pip install -e '.[test,bench]'``: psutil, py-spy).
Run: ``.venv/bin/python -m bench.throughput --generations 1000 --concurrency 32 --processes 1``
(or ``./dev bench …``). This is a measurement, not a test: it asserts nothing about speed.
One script that runs top to bottom (processes, load, report), hence its length.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pika
import psutil
from sqlalchemy import create_engine, text

from bench.backends import DEFAULT_AMQP_HOST, DEFAULT_PG, scratch_backends, wait_ready
from bench.launch import read_sql_counts, serve_command
from bench.procstats import (
    REFERENCE_ITERATIONS,
    Group,
    Sampler,
    by_name,
    peak_rss_mb,
    postgres_split,
    postmaster_reaped_cpu,
    rss_mb,
    tree,
)
from persistence.db import normalize_url
from saga.pricing import PriceBook

KEYS = "service:bench-svc,support:bench-sup"
HEADERS = {"Authorization": "Bearer bench-svc"}
HERE = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def standin_process(url: str, published: Any, ready: Any, stop: Any) -> None:
    """An instant n8n: answers every job at once and reports when it published."""
    from standins.n8n import Reply, result_body

    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)

    def on_job(ch: Any, method: Any, _p: Any, body: bytes) -> None:
        job = json.loads(body)
        kind = "samples_ready" if job["stage"] == "samples" else "final_ready"
        suffix, out = result_body(job, Reply(kind))
        ch.basic_publish(job["reply"]["exchange"], job["reply"]["routing_key_prefix"] + suffix,
                         out, props)
        published.put((job["generation_id"], job["stage"], time.time()))
        ch.basic_ack(method.delivery_tag)

    while not stop.is_set():
        try:
            conn = pika.BlockingConnection(pika.URLParameters(url))
            ch = conn.channel()
            ch.basic_qos(prefetch_count=500)
            ch.basic_consume("n8n.generation.jobs", on_job)
            ready.set()
            while not stop.is_set():
                conn.process_data_events(time_limit=0.2)
            conn.close()
        except pika.exceptions.AMQPError as exc:
            # The shared broker was restarted under us: the jobs queue is durable, so
            # reconnect and go on; the run's figures will show the hiccup.
            print(f"n8n stand-in: broker connection lost ({exc!r}); reconnecting",
                  file=sys.stderr)
            time.sleep(1)


class Notifications(threading.Thread):
    """Consumes the notification exchange and wakes the waiting generation coroutines."""

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.loop = loop
        self.waiters: dict[tuple[str, str], asyncio.Future[float]] = {}
        self.early: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.stop_flag = threading.Event()

    def wait(self, gid: str, kind: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = self.loop.create_future()
        with self.lock:
            if (gid, kind) in self.early:
                fut.set_result(self.early.pop((gid, kind)))
            else:
                self.waiters[(gid, kind)] = fut
        return fut

    def run(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        for kind in ("samples_ready", "final_ready", "failed", "timed_out"):
            ch.queue_bind(q, "creativeflow.notifications", f"notification.generation.{kind}")
        # Odoo's side: every domain event and every other notification is consumed too.
        rest = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(rest, "creativeflow.events", "generation.*")
        ch.queue_bind(rest, "creativeflow.notifications", "notification.generation.progress")
        ch.basic_consume(rest, lambda ch, m, _p, _b: ch.basic_ack(m.delivery_tag))
        ch.basic_qos(prefetch_count=1000)

        def on(ch: Any, method: Any, _p: Any, body: bytes) -> None:
            at = time.time()
            msg = json.loads(body)
            key = (msg["generation_id"], msg["type"])
            with self.lock:
                fut = self.waiters.pop(key, None)
                if fut is None:
                    self.early[key] = at
            if fut is not None:
                self.loop.call_soon_threadsafe(_resolve, fut, at)
            ch.basic_ack(method.delivery_tag)

        ch.basic_consume(q, on)
        self.ready.set()
        while not self.stop_flag.is_set():
            conn.process_data_events(time_limit=0.2)
        conn.close()


def _resolve(fut: asyncio.Future[float], at: float) -> None:
    if not fut.done():
        fut.set_result(at)


async def drive(args: argparse.Namespace, bases: list[str], notes: Notifications,
                mine: range) -> tuple[dict[str, list[float]], dict[str, dict[str, float]],
                                      float, int]:
    latencies: dict[str, list[float]] = defaultdict(list)
    received: dict[str, dict[str, float]] = defaultdict(dict)
    concurrency = max(1, args.concurrency // args.clients)
    limits = httpx.Limits(max_connections=concurrency * 2,
                          max_keepalive_connections=concurrency * 2)
    clients = [httpx.AsyncClient(base_url=b, headers=HEADERS, timeout=60, limits=limits)
               for b in bases]
    failures = 0
    lost = 0  # no notification within --wait seconds
    todo = iter(mine)

    async def timed(name: str, client: httpx.AsyncClient, method: str, url: str,
                    **kw: Any) -> httpx.Response:
        start = time.perf_counter()
        for attempt in range(3):
            try:
                response = await client.request(method, url, **kw)
                break
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # A keep-alive connection the server closed as we reused it; the request
                # carries an Idempotency-Key (or is a GET), so sending it again is safe.
                if attempt == 2:
                    raise
        latencies[name].append(time.perf_counter() - start)
        return response

    async def one(i: int) -> None:
        nonlocal failures, lost
        client = clients[i % len(clients)]
        r = await timed("POST /generations", client, "POST", "/api/v1/generations",
                        headers={"Idempotency-Key": f"bench-{i}"},
                        json={"user_id": f"b-{i % args.users}", "prompt": "bench banner",
                              "format": "instagram_post", "sample_count": 4})
        if r.status_code != 202:
            failures += 1
            return
        gid = r.json()["id"]
        try:
            received[gid]["samples"] = await asyncio.wait_for(notes.wait(gid, "samples_ready"),
                                                              args.wait)
        except TimeoutError:
            lost += 1
            return
        r = await timed("POST /generations/{id}/selection", client, "POST",
                        f"/api/v1/generations/{gid}/selection",
                        headers={"Idempotency-Key": f"bench-select-{i}"},
                        json={"sample_id": "s1", "resolution": "high"})
        if r.status_code != 202:
            failures += 1
            return
        try:
            received[gid]["final"] = await asyncio.wait_for(notes.wait(gid, "final_ready"),
                                                            args.wait)
        except TimeoutError:
            lost += 1
            return
        if args.read_back:
            await timed("GET /generations/{id}", client, "GET", f"/api/v1/generations/{gid}")

    async def worker() -> None:
        # A fixed number of in-flight generations, not one coroutine per generation: a long
        # run (100k) keeps the load generator's own memory flat.
        for i in todo:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    for c in clients:
        await c.aclose()
    return latencies, received, elapsed, failures + lost


def client_process(args: argparse.Namespace, bases: list[str], amqp: str, index: int,
                   out: Any, ready: Any, go: Any) -> None:
    """One load-generating process: its own event loop and notification consumer."""
    loop = asyncio.new_event_loop()
    notes = Notifications(amqp, loop)
    notes.start()
    notes.ready.wait(20)
    ready.put(index)
    go.wait()
    mine = range(index, args.generations, args.clients)
    result = loop.run_until_complete(drive(args, bases, notes, mine))
    notes.stop_flag.set()
    out.put((dict(result[0]), dict(result[1]), result[3]))


class Published(threading.Thread):
    """Drains the stand-in's (generation, stage, published at) reports while the run goes."""

    def __init__(self, source: Any) -> None:
        super().__init__(daemon=True)
        self.source = source
        self.at: dict[tuple[str, str], float] = {}
        self.finals: list[float] = []  # perf_counter of each final published: progress
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                gid, stage, at = self.source.get(timeout=0.2)
            except queue.Empty:
                continue
            self.at[(gid, stage)] = at
            if stage != "samples":
                self.finals.append(time.perf_counter())


# -- PostgreSQL and Prometheus counters ------------------------------------------------------

def pg_counters(admin_url: str, db: str) -> dict[str, float]:
    engine = create_engine(normalize_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted,"
                " tup_fetched, tup_returned, blks_hit, blks_read, sessions,"
                " session_time, active_time, idle_in_transaction_time"
                " FROM pg_stat_database WHERE datname = :db"), {"db": db}).mappings().one()
            return {k: float(v) for k, v in row.items()}
    finally:
        engine.dispose()


def autovacuum_on(admin_url: str) -> bool:
    engine = create_engine(normalize_url(admin_url))
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW autovacuum")).scalar()) == "on"
    finally:
        engine.dispose()


def table_counters(db_url: str) -> dict[str, dict[str, float]]:
    engine = create_engine(normalize_url(db_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, seq_scan,"
                " seq_tup_read, coalesce(idx_scan, 0) AS idx_scan,"
                " coalesce(idx_tup_fetch, 0) AS idx_tup_fetch"
                " FROM pg_stat_user_tables")).mappings()
            return {r["relname"]: {k: float(v) for k, v in r.items() if k != "relname"}
                    for r in rows}
    finally:
        engine.dispose()


def histogram(base: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of the POST routes' latency histogram: route -> le -> count."""
    out: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("aigen_http_request_seconds_bucket{") and 'method="POST"' in line:
            route = line.split('route="')[1].split('"')[0]
            le = line.split('le="')[1].split('"')[0]
            out[route][float("inf") if le == "+Inf" else float(le)] += float(line.split()[-1])
    return out


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus-style linear interpolation inside the bucket holding the quantile."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return float("nan")
    rank = q * buckets[edges[-1]]
    prev_edge, prev_count = 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if edge == float("inf"):
                return prev_edge
            span = count - prev_count
            return prev_edge + (edge - prev_edge) * ((rank - prev_count) / span if span else 0)
        prev_edge, prev_count = edge, count
    return edges[-1]


# -- one run -------------------------------------------------------------------------------

def python_of(checkout: Path) -> str:
    py = checkout / ".venv" / "bin" / "python"
    if checkout == HERE and not py.exists():
        return sys.executable
    if not py.exists():
        raise SystemExit(f"{checkout} has no .venv/bin/python: create its venv first "
                         f"(python3 -m venv .venv && .venv/bin/pip install -e .)")
    return str(py)


def run_once(args: argparse.Namespace, checkout: Path, label: str) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    python = python_of(checkout)
    stack = ExitStack()
    db_url, amqp = stack.enter_context(
        scratch_backends("bench", args.pg, args.amqp_host, migrate_schema=False))
    db = db_url.rsplit("/", 1)[1]
    procs: list[subprocess.Popen[bytes]] = []
    stop = mp.Event()
    standin: mp.Process | None = None
    profiler: subprocess.Popen[bytes] | None = None
    sql_files = [Path(f"/tmp/aigen-bench-{tag}-{n}.sql.json") for n in range(args.processes)]
    try:
        base_env = {**os.environ, "AIGEN_DATABASE_URL": db_url, "AIGEN_AMQP_URL": amqp,
                    "AIGEN_API_KEYS": KEYS, "AIGEN_LOG_LEVEL": "WARNING"}
        base_env.pop("PYTHONPATH", None)
        # The checkout's own code creates (and later would upgrade) its schema.
        subprocess.run([python, "-m", "aigen.cli", "migrate"], cwd=checkout, env=base_env,
                       check=True, capture_output=True)
        logs: list[Any] = []

        def launch() -> list[str]:
            procs.clear()
            for log in logs:
                log.close()
            logs.clear()
            urls = []
            for n in range(args.processes):
                port = args.port + n
                env = {**base_env, "AIGEN_HTTP_PORT": str(port),
                       "AIGEN_BENCH_SQLCOUNT_FILE": str(sql_files[n])}
                logs.append(open(f"/tmp/aigen-bench-{tag}-{n}.log", "ab"))  # noqa: SIM115
                procs.append(subprocess.Popen(serve_command(python, args.count_sql),
                                              cwd=checkout, env=env, stdout=logs[-1],
                                              stderr=subprocess.STDOUT))
                urls.append(f"http://127.0.0.1:{port}")
            for url in urls:
                wait_ready(url, 30)
            return urls

        stack.callback(lambda: [log.close() for log in logs])
        bases = launch()

        published: Any = mp.Queue()
        ready = mp.Event()
        standin = mp.Process(target=standin_process, args=(amqp, published, ready, stop),
                             daemon=True)
        standin.start()
        if not ready.wait(20):
            raise RuntimeError("the n8n stand-in did not start")
        drain = Published(published)
        drain.start()

        preloaded: dict[str, int] = {}
        if args.preload:
            from bench.preload import bulk_copy, template_generation

            with httpx.Client(base_url=bases[0], headers=HEADERS, timeout=30) as http:
                template_generation(http, db_url)
            # The bulk copy runs with the service stopped: it drops and rebuilds the
            # indexes, and the measured service then starts like a restarted one would.
            terminate(procs)
            preloaded = bulk_copy(db_url, args.preload)
            bases = launch()
        with httpx.Client(base_url=bases[0], headers=HEADERS) as http:
            for u in range(args.users):
                http.post(f"/api/v1/accounts/b-{u}/grants",
                          json={"amount": "100000.00", "reason": "bench"}).raise_for_status()

        out: Any = mp.Queue()
        client_ready: Any = mp.Queue()
        go = mp.Event()
        clients = [mp.Process(target=client_process,
                              args=(args, bases, amqp, n, out, client_ready, go), daemon=True)
                   for n in range(args.clients)]
        for c in clients:
            c.start()
        for _ in clients:
            client_ready.get(timeout=30)

        groups: dict[str, Group] = {}
        for n, p in enumerate(procs):
            groups[f"service[{n}]"] = Group(functools.partial(tree, p.pid))
        groups["postgres (bench db backends)"] = Group(lambda: postgres_split(db)[0])
        groups["postgres (rest of server, shared)"] = Group(lambda: postgres_split(db)[1])
        groups["rabbitmq (beam.smp, shared)"] = Group(lambda: by_name("beam.smp"))
        standin_pid = standin.pid or 0
        groups["n8n stand-in"] = Group(lambda: tree(standin_pid))
        groups["load generator"] = Group(lambda: [q for c in clients for q in tree(c.pid or 0)])
        groups["bench harness (sampling)"] = Group(lambda: [psutil.Process()])
        idle: dict[str, float] = {}
        if args.idle_seconds:
            # The service with nothing to do: relay, sweeper and consumers polling.
            time.sleep(2)
            idle_groups = {k: g for k, g in groups.items()
                           if k.startswith(("service", "postgres (bench"))}
            for g in idle_groups.values():
                g.start()
            time.sleep(args.idle_seconds)
            for g in idle_groups.values():
                g.sample()
            idle = {k: g.used() / args.idle_seconds * 100 for k, g in idle_groups.items()}
        sampler = Sampler(groups, [p.pid for p in procs], interval=1.0)

        hist_before = [histogram(b) for b in bases]
        sql_before = ([read_sql_counts(p.pid, f) for p, f in zip(procs, sql_files, strict=True)]
                      if args.count_sql else [])
        time.sleep(1.2)  # let the backends flush their statistics before the baseline
        pg_before = pg_counters(args.pg, db)
        autovacuum = autovacuum_on(args.pg)
        tables_before = table_counters(db_url)
        finals_before = len(drain.finals)
        if args.profile:
            profiler = start_profiler(args.profile, procs[0].pid, args.profile_rate)

        reaped_before = postmaster_reaped_cpu()
        sampler.start()
        started = time.perf_counter()
        go.set()
        latencies: dict[str, list[float]] = defaultdict(list)
        received: dict[str, dict[str, float]] = {}
        failures = 0
        deadline = time.monotonic() + args.timeout
        for _ in clients:
            lat, rec, fail = out.get(timeout=max(1.0, deadline - time.monotonic()))
            for name, values in lat.items():
                latencies[name].extend(values)
            received.update(rec)
            failures += fail
        elapsed = time.perf_counter() - started
        cpu_used, sys_used = sampler.finish()
        cpu_used["postgres (exited backends, any db)"] = postmaster_reaped_cpu() - reaped_before
        if profiler is not None:
            stop_profiler(profiler)
            profiler = None

        sql_after = ([read_sql_counts(p.pid, f) for p, f in zip(procs, sql_files, strict=True)]
                     if args.count_sql else [])
        hist_after = [histogram(b) for b in bases]
        time.sleep(1.2)
        pg_after = pg_counters(args.pg, db)
        tables_after = table_counters(db_url)
        time.sleep(0.5)
        drain.halt.set()
        drain.join(5)

        done = sum(1 for g in received.values() if "final" in g)
        result: dict[str, Any] = {
            "label": label, "checkout": str(checkout), "done": done,
            "generations": args.generations, "failures": failures, "elapsed_s": elapsed,
            "throughput": done / elapsed, "preloaded": args.preload,
            "cpu_ms_per_generation": {k: v / max(done, 1) * 1000 for k, v in cpu_used.items()},
        }
        print(f"\n== {label}: {checkout} ==")
        if preloaded:
            print(f"preloaded {args.preload} completed generations "
                  f"({sum(preloaded.values())} rows)")
        print(f"generations: {done} complete of {args.generations} "
              f"({failures} refused or lost), concurrency {args.concurrency}, "
              f"{args.processes} service process(es)")
        print(f"throughput: {done / elapsed:.1f} complete generations/s "
              f"({elapsed:.1f} s wall)")

        result["api_client_ms"] = {}
        for name, values in latencies.items():
            ms = [v * 1000 for v in values]
            pc = {q: percentile(ms, q) for q in (50, 95, 99)}
            result["api_client_ms"][name] = pc
            print(f"API client {name:53} p50 {pc[50]:6.1f} ms  p95 {pc[95]:6.1f} ms  "
                  f"p99 {pc[99]:6.1f} ms  (n={len(ms)})")
        result["api_server_ms"] = {}
        merged: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for before, after in zip(hist_before, hist_after, strict=True):
            for route, buckets in after.items():
                for le, count in buckets.items():
                    merged[route][le] += count - before.get(route, {}).get(le, 0.0)
        for route, buckets in sorted(merged.items()):
            if buckets.get(float("inf"), 0) <= 0:
                continue
            ps = {q: histogram_quantile(buckets, q / 100) * 1000 for q in (50, 95, 99)}
            result["api_server_ms"][route] = ps
            print(f"API server POST {route:48} p50 {ps[50]:6.1f} ms  p95 {ps[95]:6.1f} ms  "
                  f"p99 {ps[99]:6.1f} ms  (histogram, n={buckets[float('inf')]:.0f})")

        r2n = [(received[g][s] - drain.at[(g, s)]) * 1000 for g in received
               for s in ("samples", "final") if s in received[g] and (g, s) in drain.at]
        result["result_to_notification_ms"] = {50: percentile(r2n, 50),
                                               99: percentile(r2n, 99)}
        print(f"result -> notification                  p50 {percentile(r2n, 50):6.1f} ms  "
              f"p99 {percentile(r2n, 99):6.1f} ms  (n={len(r2n)})")

        result["sys_ms_per_generation"] = {k: v / max(done, 1) * 1000
                                           for k, v in sys_used.items()}
        print("CPU ms per complete generation (of which kernel):")
        for k, v in result["cpu_ms_per_generation"].items():
            kernel = result["sys_ms_per_generation"].get(k)
            print(f"  {k:36} {v:7.2f} ms" + (f"  ({kernel:.2f} sys)" if kernel is not None
                                             else ""))
        service_total = sum(v for k, v in result["cpu_ms_per_generation"].items()
                            if k.startswith("service"))
        result["service_cpu_ms"] = service_total
        print(f"  {'service, all processes':36} {service_total:7.2f} ms")
        if sampler.speed:
            speed = sorted(sampler.speed)
            result["reference_ms"] = median = statistics.median(speed)
            print(f"machine speed: a fixed slice of Python ({REFERENCE_ITERATIONS} "
                  f"multiply-adds, timed every second) took median {median:.1f}"
                  f" ms, fastest {speed[0]:.1f}, slowest {speed[-1]:.1f} (n={len(speed)}); a wide "
                  "spread means a busy host, whose CPU figures drift: compare interleaved runs")

        per = max(done, 1)
        pg = {k: (pg_after[k] - pg_before[k]) / per for k in pg_after}
        result["pg_per_generation"] = pg
        print(f"PostgreSQL per generation (bench db, includes the bench's few probes): "
              f"{pg['xact_commit']:.1f} commits, {pg['xact_rollback']:.2f} rollbacks, "
              f"{pg['tup_inserted']:.1f} rows inserted, {pg['tup_updated']:.1f} updated, "
              f"{pg['tup_deleted']:.1f} deleted; {pg['sessions']:.2f} new connections, "
              f"{pg['active_time']:.1f} ms active, {pg['idle_in_transaction_time']:.1f} ms "
              f"idle in transaction")
        writes = []
        for table, t_after in sorted(tables_after.items()):
            t_before = tables_before.get(table, {})
            d = {k: (v - t_before.get(k, 0.0)) / per for k, v in t_after.items()}
            if any(d[k] for k in ("n_tup_ins", "n_tup_upd", "n_tup_del")):
                writes.append(f"{table} +{d['n_tup_ins']:.1f}/~{d['n_tup_upd']:.1f}"
                              f"({d['n_tup_hot_upd']:.1f} HOT)/-{d['n_tup_del']:.1f}")
        print("  rows per generation (+ins/~upd(HOT)/-del): " + ", ".join(writes))
        reads = []
        for table, t_after in sorted(tables_after.items()):
            t_before = tables_before.get(table, {})
            d = {k: (v - t_before.get(k, 0.0)) / per for k, v in t_after.items()}
            if d["seq_scan"] or d["idx_scan"]:
                reads.append(f"{table} {d['seq_scan']:.2f} seq ({d['seq_tup_read']:.0f} rows)"
                             f"/{d['idx_scan']:.1f} idx")
        print("  scans per generation (seq (rows read)/index): " + ", ".join(reads))
        print(f"  buffers per generation: {pg['blks_hit']:.0f} hit, {pg['blks_read']:.1f} read; "
              f"{pg['tup_returned']:.0f} rows/index entries read")
        if not autovacuum:
            print("  NOTE: autovacuum is off on this server: dead rows and index entries pile up "
                  "during the run, so PostgreSQL's cost per generation grows with its length")
        if sql_after:
            total: dict[str, int] = defaultdict(int)
            for before_c, after_c in zip(sql_before, sql_after, strict=True):
                for k, v in after_c.items():
                    total[k] += v - before_c.get(k, 0)
            result["sql_per_generation"] = {k: v / per for k, v in total.items()}
            verbs = ", ".join(f"{k[5:]} {v / per:.1f}" for k, v in sorted(total.items())
                              if k.startswith("verb:"))
            print(f"SQL issued by the service per generation: {total['statements'] / per:.1f} "
                  f"statements ({verbs}; executemany {total['executemany'] / per:.1f}), "
                  f"{total['begin'] / per:.1f} transactions, {total['commit'] / per:.1f} "
                  f"commits, {total['rollback'] / per:.2f} rollbacks")
            shapes = sorted(((v, k[4:]) for k, v in total.items() if k.startswith("sql:")),
                            reverse=True)
            for v, shape in shapes[:args.top_sql]:
                print(f"  {v / per:5.2f}/gen  {shape}")

        if idle:
            result["idle_cpu_percent"] = idle
            print(f"idle for {args.idle_seconds:.0f} s before the load: " + ", ".join(
                f"{k} {v:.2f} % of a core" for k, v in idle.items()))
        result["rss_mb"] = {}
        finals = drain.finals[finals_before:]
        for n, p in enumerate(procs):
            final = rss_mb(p.pid)
            result["rss_mb"][n] = {"peak": peak_rss_mb(p.pid), "final": final}
            print(f"service[{n}] pid {p.pid} RSS peak {peak_rss_mb(p.pid):.0f} MB, "
                  f"final {final:.0f} MB")
        if args.rss_every:
            print("service RSS over time (s, ~generations done, MB per process):")
            next_at = 0.0
            for t, mbs in sampler.rss:
                if t + 1e-9 >= next_at:
                    done_by = sum(1 for f in finals if f - started <= t)
                    print(f"  {t:7.0f} s {done_by:8d}  " + " ".join(f"{m:6.1f}" for m in mbs))
                    next_at = t + args.rss_every
            half = [(t, mbs[0]) for t, mbs in sampler.rss if t >= elapsed / 2]
            if len(half) >= 3:
                slope = statistics.linear_regression([t for t, _ in half],
                                                     [m for _, m in half]).slope
                rate = done / elapsed
                print(f"  second-half RSS trend of service[0]: {slope * 3600:+.1f} MB/hour "
                      f"({slope / rate * 10000 if rate else float('nan'):+.2f} MB per 10k "
                      f"generations)")
        for c in clients:
            c.join(10)
        return result
    finally:
        if profiler is not None:
            stop_profiler(profiler)
        stop.set()
        if standin is not None:
            standin.join(5)
            if standin.is_alive():
                standin.kill()
        terminate(procs)
        for f in sql_files:
            f.unlink(missing_ok=True)
        stack.close()


def terminate(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def start_profiler(path: str, pid: int, rate: int = 100) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    fmt = "speedscope" if path.endswith(".json") else "flamegraph" if path.endswith(
        ".svg") else "raw"
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(rate),
                             "--format", fmt, "-o", path, "--nonblocking", "--threads", "--gil"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attach before the load starts
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def summarize(results: list[dict[str, Any]]) -> None:
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_label[r["label"]].append(r)
    print("\n== summary (median of runs; CPU ms per complete generation) ==")
    print(f"{'checkout':10} {'runs':>4} {'gen/s':>7} {'service':>8} {'pg':>6} {'rabbit':>7} "
          f"{'loadgen':>8} {'POST p95':>9} {'r->n p99':>9} {'speed':>6}")
    for label, rs in by_label.items():
        def med(f: Any, rs: list[dict[str, Any]] = rs) -> float:
            return float(statistics.median(f(r) for r in rs))
        print(f"{label:10} {len(rs):4d} {med(lambda r: r['throughput']):7.1f} "
              f"{med(lambda r: r['service_cpu_ms']):8.2f} "
              f"{med(lambda r: r['cpu_ms_per_generation']['postgres (bench db backends)']):6.2f} "
              f"{med(lambda r: r['cpu_ms_per_generation']['rabbitmq (beam.smp, shared)']):7.2f} "
              f"{med(lambda r: r['cpu_ms_per_generation']['load generator']):8.2f} "
              f"{med(lambda r: r['api_client_ms']['POST /generations'][95]):9.1f} "
              f"{med(lambda r: r['result_to_notification_ms'][99]):9.1f} "
              f"{med(lambda r: r.get('reference_ms', float('nan'))):6.1f}")
    print("speed: median ms of the fixed Python slice during the runs (lower is faster)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1, choices=(1, 2),
                        help="aigen serve processes")
    parser.add_argument("--users", type=int, default=None,
                        help="bench users (default: 200, or enough that none passes the free "
                             "plan's monthly sample rounds)")
    parser.add_argument("--clients", type=int, default=2,
                        help="load-generating processes (one asyncio client is the bottleneck)")
    parser.add_argument("--read-back", action="store_true",
                        help="also GET each generation once it completes")
    parser.add_argument("--preload", type=int, default=0, metavar="N",
                        help="insert N completed generations (with history) before measuring")
    parser.add_argument("--checkout", type=Path, default=HERE, metavar="PATH",
                        help="run the service from this checkout (its .venv/bin/python)")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("PATH_A", "PATH_B"),
                        help="alternate runs of two checkouts (A B A B ...)")
    parser.add_argument("--runs", type=int, default=1, help="runs per checkout")
    parser.add_argument("--count-sql", action="store_true",
                        help="count the service's SQL statements and transactions "
                             "(SQLAlchemy events; costs a little service CPU)")
    parser.add_argument("--profile", metavar="FILE",
                        help="py-spy record service[0] over the measured window "
                             "(.svg flamegraph, .json speedscope, else raw collapsed stacks)")
    parser.add_argument("--top-sql", type=int, default=20,
                        help="with --count-sql, list this many statement shapes")
    parser.add_argument("--profile-rate", type=int, default=100, metavar="HZ",
                        help="py-spy samples per second")
    parser.add_argument("--idle-seconds", type=float, default=0, metavar="S",
                        help="first measure the idle service's CPU for S seconds")
    parser.add_argument("--rss-every", type=float, default=0, metavar="S",
                        help="print the service RSS every S seconds (for long runs)")
    parser.add_argument("--timeout", type=float, default=0,
                        help="give up after this many seconds (default: 120 + N/5)")
    parser.add_argument("--wait", type=float, default=60,
                        help="seconds a generation waits for each notification")
    parser.add_argument("--json", type=Path, help="append each run's figures to this file")
    parser.add_argument("--port", type=int, default=18600)
    parser.add_argument("--pg", default=DEFAULT_PG)
    parser.add_argument("--amqp-host", default=DEFAULT_AMQP_HOST)
    args = parser.parse_args()
    # The bench's users are on the free plan: each may start only so many sample rounds a
    # month, after which every start is refused (a long run would measure refusals).
    rounds = PriceBook().free_monthly_sample_rounds
    if args.users is None:
        args.users = max(200, -(-args.generations // rounds))
    elif args.users * rounds < args.generations:
        parser.error(f"--users {args.users}: the free plan allows {rounds} sample rounds a "
                     f"user a month, so {args.generations} generations need at least "
                     f"{-(-args.generations // rounds)} users")
    if not args.timeout:
        args.timeout = 120 + args.generations / 5

    plan: list[tuple[str, Path]]
    if args.compare:
        a, b = (p.resolve() for p in args.compare)
        plan = list(itertools.chain.from_iterable([("A", a), ("B", b)]
                                                  for _ in range(args.runs)))
    else:
        plan = [("run", args.checkout.resolve())] * args.runs
    results = []
    ok = True
    for label, checkout in plan:
        r = run_once(args, checkout, label)
        results.append(r)
        ok = ok and r["done"] == args.generations
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(r) + "\n")
    if len(results) > 1:
        summarize(results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
