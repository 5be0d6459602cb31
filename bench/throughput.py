"""Throughput benchmark: complete generations through real PostgreSQL and RabbitMQ.

Starts ``--processes`` ``aigen serve`` processes on a fresh database and vhost, an instant
scripted n8n stand-in (its own process) and drives ``--generations`` complete generations
(start → samples → selection → final) at ``--concurrency`` from an asyncio HTTP client that
reacts to the Notification Service's messages. Prints:

* complete generations per second,
* API latency p50/p95/p99 per endpoint,
* result-to-notification latency p50/p99 (n8n publishes a result → the user's notification
  arrives),
* peak RSS of each service process.

Run: ``./dev bench --generations 2000 --concurrency 64`` (PostgreSQL and RabbitMQ on
127.0.0.1). This is a measurement, not a test: it asserts nothing about speed.
One script that runs top to bottom (processes, load, report), hence its length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from contextlib import ExitStack
from typing import Any

import httpx
import pika

from bench.backends import DEFAULT_AMQP_HOST, DEFAULT_PG, scratch_backends, wait_ready

KEYS = "service:bench-svc,support:bench-sup"
HEADERS = {"Authorization": "Bearer bench-svc"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def standin_process(url: str, published: Any, ready: Any, stop: Any) -> None:
    """An instant n8n: answers every job at once and reports when it published."""
    from standins.n8n import Reply, result_body

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=500)
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)

    def on_job(ch: Any, method: Any, _p: Any, body: bytes) -> None:
        job = json.loads(body)
        kind = "samples_ready" if job["stage"] == "samples" else "final_ready"
        suffix, out = result_body(job, Reply(kind))
        ch.basic_publish(job["reply"]["exchange"], job["reply"]["routing_key_prefix"] + suffix,
                         out, props)
        published.put((job["generation_id"], job["stage"], time.time()))
        ch.basic_ack(method.delivery_tag)

    ch.basic_consume("n8n.generation.jobs", on_job)
    ready.set()
    while not stop.is_set():
        conn.process_data_events(time_limit=0.2)
    conn.close()


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
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2,
                          max_keepalive_connections=concurrency * 2)
    clients = [httpx.AsyncClient(base_url=b, headers=HEADERS, timeout=60, limits=limits)
               for b in bases]
    failures = 0

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
        nonlocal failures
        client = clients[i % len(clients)]
        async with sem:
            r = await timed("POST /generations", client, "POST", "/api/v1/generations",
                            headers={"Idempotency-Key": f"bench-{i}"},
                            json={"user_id": f"b-{i % args.users}", "prompt": "bench banner",
                                  "format": "instagram_post", "sample_count": 4})
            if r.status_code != 202:
                failures += 1
                return
            gid = r.json()["id"]
            received[gid]["samples"] = await asyncio.wait_for(
                notes.wait(gid, "samples_ready"), 120)
            r = await timed("POST /generations/{id}/selection", client, "POST",
                            f"/api/v1/generations/{gid}/selection",
                            headers={"Idempotency-Key": f"bench-select-{i}"},
                            json={"sample_id": "s1", "resolution": "high"})
            if r.status_code != 202:
                failures += 1
                return
            received[gid]["final"] = await asyncio.wait_for(notes.wait(gid, "final_ready"), 120)
            if args.read_back:
                await timed("GET /generations/{id}", client, "GET", f"/api/v1/generations/{gid}")

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in mine))
    elapsed = time.perf_counter() - start
    for c in clients:
        await c.aclose()
    return latencies, received, elapsed, failures


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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by ``pids`` (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError):
            pass
    return total


def pids_of(name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--clients", type=int, default=2,
                        help="load-generating processes (one asyncio client is the bottleneck)")
    parser.add_argument("--read-back", action="store_true",
                        help="also GET each generation once it completes")
    parser.add_argument("--pg", default=DEFAULT_PG)
    parser.add_argument("--amqp-host", default=DEFAULT_AMQP_HOST)
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:6]
    stack = ExitStack()
    db_url, amqp = stack.enter_context(scratch_backends("bench", args.pg, args.amqp_host))
    procs: list[subprocess.Popen[bytes]] = []
    stop = mp.Event()
    standin: mp.Process | None = None
    try:
        bases = []
        for n in range(args.processes):
            port = 18600 + n
            env = {**os.environ, "AIGEN_DATABASE_URL": db_url, "AIGEN_AMQP_URL": amqp,
                   "AIGEN_API_KEYS": KEYS, "AIGEN_HTTP_PORT": str(port),
                   "AIGEN_LOG_LEVEL": "WARNING"}
            log = open(f"/tmp/aigen-bench-{tag}-{n}.log", "wb")  # noqa: SIM115 - child's
            procs.append(subprocess.Popen([sys.executable, "-m", "aigen.cli", "serve"], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
            bases.append(f"http://127.0.0.1:{port}")
        for base in bases:
            wait_ready(base, 20)
        with httpx.Client(base_url=bases[0], headers=HEADERS) as http:
            for u in range(args.users):
                http.post(f"/api/v1/accounts/b-{u}/grants",
                       json={"amount": "100000.00", "reason": "bench"}).raise_for_status()

        published: Any = mp.Queue()
        ready = mp.Event()
        standin = mp.Process(target=standin_process, args=(amqp, published, ready, stop),
                             daemon=True)
        standin.start()
        ready.wait(20)

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
        groups = {"service": [p.pid for p in procs], "postgres": pids_of("postgres"),
                  "rabbitmq": pids_of("beam.smp"), "n8n stand-in": [standin.pid or 0],
                  "bench clients": [c.pid or 0 for c in clients]}
        cpu_before = {k: cpu_seconds(v) for k, v in groups.items()}
        pg_before = {pid: cpu_seconds([pid]) for pid in pids_of("postgres")}
        started = time.perf_counter()
        go.set()
        latencies: dict[str, list[float]] = defaultdict(list)
        received: dict[str, dict[str, float]] = {}
        failures = 0
        for _ in clients:
            lat, rec, fail = out.get(timeout=3600)
            for name, values in lat.items():
                latencies[name].extend(values)
            received.update(rec)
            failures += fail
        elapsed = time.perf_counter() - started
        cpu_used = {k: cpu_seconds(v) - cpu_before[k] for k, v in groups.items()}
        # Backends are forked per connection: count every postgres process, new ones whole.
        cpu_used["postgres"] = sum(cpu_seconds([pid]) - pg_before.get(pid, 0.0)
                                   for pid in pids_of("postgres"))

        pub: dict[tuple[str, str], float] = {}
        while not published.empty():
            gid, stage, at = published.get()
            pub[(gid, stage)] = at
        r2n = [(received[g][s] - pub[(g, s)]) * 1000 for g in received for s in ("samples",
                                                                                 "final")
               if s in received[g] and (g, s) in pub]
        done = sum(1 for g in received.values() if "final" in g)
        print(f"generations: {done} complete of {args.generations} "
              f"({failures} refused), concurrency {args.concurrency}, "
              f"{args.processes} service process(es)")
        print(f"throughput: {done / elapsed:.1f} complete generations/s "
              f"({elapsed:.1f} s wall)")
        for name, values in latencies.items():
            ms = [v * 1000 for v in values]
            print(f"API {name:36} p50 {percentile(ms, 50):6.1f} ms  p95 "
                  f"{percentile(ms, 95):6.1f} ms  p99 {percentile(ms, 99):6.1f} ms  (n={len(ms)})")
        print(f"result -> notification          p50 {percentile(r2n, 50):6.1f} ms  p99 "
              f"{percentile(r2n, 99):6.1f} ms  (n={len(r2n)})")
        for base in bases:
            sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for line in httpx.get(f"{base}/metrics").text.splitlines():
                if line.startswith("aigen_http_request_seconds_") and 'method="POST"' in line:
                    kind = "sum" if "_sum{" in line else "count" if "_count{" in line else None
                    if kind:
                        route = line.split('route="')[1].split('"')[0]
                        sums[route][0 if kind == "sum" else 1] += float(line.split()[-1])
            print(f"server-side mean latency ({base}): " + ", ".join(
                f"{route} {total / max(count, 1) * 1000:.1f} ms"
                for route, (total, count) in sums.items()))
        print("CPU per complete generation: " + ", ".join(
            f"{k} {v / max(done, 1) * 1000:.1f} ms" for k, v in cpu_used.items()))
        for p in procs:
            print(f"service pid {p.pid} peak RSS {peak_rss_mb(p.pid):.0f} MB")
        for c in clients:
            c.join(10)
        return 0 if done == args.generations else 1
    finally:
        stop.set()
        if standin is not None:
            standin.join(5)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        stack.close()


if __name__ == "__main__":
    sys.exit(main())
