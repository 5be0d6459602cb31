"""End-to-end smoke run of the shipped n8n workflow against a real n8n.

``python -m tests.n8n_support.smoke`` (from the repo root) starts the whole stack on loopback,
plays the orchestrator's part of docs/messages.md (publishes AIGenerationJobRequested, reads the
results), checks the happy paths, the failure-to-``retryable`` mapping, malformed jobs, and
then measures the round-trip throughput. Exit code 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika

from .image_api import FaultKind
from .rabbit import GENERATION_EXCHANGE, JOBS_QUEUE, RESULTS_QUEUE
from .runner import N8nStatus, n8n_available
from .s3 import parse_s3_url
from .stack import N8nStack

SAMPLES_KEYS = {"event_type", "generation_id", "job_id", "samples", "model", "duration_ms"}
FINAL_KEYS = {"event_type", "generation_id", "job_id", "asset"}
FAILED_KEYS = {"event_type", "generation_id", "job_id", "error"}
OPTIONAL_RESULT_KEYS = {"event_id"}


@dataclass
class Result:
    routing_key: str
    body: dict[str, Any]
    properties: pika.BasicProperties
    received_at: float


@dataclass
class ResultCollector:
    """Consumes the results queue on its own thread (pika connections are not thread-safe)."""

    params: pika.ConnectionParameters
    queue: str = RESULTS_QUEUE
    results: dict[str, list[Result]] = field(default_factory=dict)
    undecodable: list[bytes] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ResultCollector:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("result consumer did not start")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self, ready: threading.Event) -> None:
        with pika.BlockingConnection(self.params) as conn:
            ch = conn.channel()
            ch.basic_consume(self.queue, self._on_message)
            ready.set()
            while not self._stop.is_set():
                conn.process_data_events(time_limit=0.1)

    def _on_message(self, ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        now = time.monotonic()
        try:
            data = json.loads(body)
            job_id = str(data.get("job_id"))
        except (ValueError, AttributeError):
            with self._cond:
                self.undecodable.append(body)
            ch.basic_ack(method.delivery_tag)
            return
        with self._cond:
            self.results.setdefault(job_id, []).append(Result(method.routing_key, data, props, now))
            self._cond.notify_all()
        ch.basic_ack(method.delivery_tag)

    def wait(self, job_id: str, timeout: float) -> Result:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.results.get(job_id):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no result for job {job_id} within {timeout}s")
                self._cond.wait(left)
            return self.results[job_id][0]

    def wait_all(self, job_ids: list[str], timeout: float) -> dict[str, Result]:
        deadline = time.monotonic() + timeout
        return {j: self.wait(j, max(0.0, deadline - time.monotonic())) for j in job_ids}

    def count(self, job_id: str) -> int:
        with self._cond:
            return len(self.results.get(job_id, []))


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def make_job(stage: str = "samples", deadline_s: float = 120, **overrides: Any) -> dict[str, Any]:
    """A contract-shaped AIGenerationJobRequested (docs/messages.md)."""
    generation_id = str(overrides.pop("generation_id", uuid.uuid4()))
    now = datetime.now(UTC)
    base = f"users/u-42/generations/{generation_id}/"
    job: dict[str, Any] = {
        "event_type": "AIGenerationJobRequested",
        "event_id": str(uuid.uuid4()),
        "occurred_at": iso(now),
        "generation_id": generation_id,
        "job_id": str(uuid.uuid4()),
        "stage": stage,
        "attempt": 1,
        "user_id": "u-42",
        "prompt": "spring sale banner, pastel",
        "negative_prompt": None,
        "style": {"tone": "playful", "industry": "retail", "preset": None},
        "brand": {"colors": ["#FF6B35"], "logo_url": None},
        "input_assets": [],
        "format": {"name": "instagram_post", "width": 1080, "height": 1080},
        "sample_count": 4,
        "sample_size": 512,
        "selected_sample": None,
        "output": None,
        "storage": {"bucket": "creativeflow-assets", "prefix": base + "samples/"},
        "reply": {"exchange": GENERATION_EXCHANGE, "routing_key_prefix": "generation.result."},
        "deadline_at": iso(now + timedelta(seconds=deadline_s)),
    }
    if stage == "final":
        job.update(
            {
                "format": {"name": "twitter_post", "width": 1600, "height": 900},
                "selected_sample": {
                    "sample_id": "s2",
                    "url": f"s3://creativeflow-assets/{base}samples/s2.png",
                },
                "output": {"width": 2048, "height": 1152, "format": "png"},
                "storage": {"bucket": "creativeflow-assets", "prefix": base + "final/"},
            }
        )
    job.update(overrides)
    return job


class Smoke:
    """The checks, each a method; ``run`` records pass/fail and keeps going."""

    def __init__(self, stack: N8nStack, jobs: int, parallel: int | None) -> None:
        self.stack = stack
        self.throughput_jobs = jobs
        self.parallel = parallel
        self.passed: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.figures: dict[str, Any] = {}
        params = stack.vhost.connection_parameters()
        self.collector = ResultCollector(params).start()
        self.pub_conn = pika.BlockingConnection(params)
        self.pub = self.pub_conn.channel()
        self.pub.confirm_delivery()

    def close(self) -> None:
        self.collector.stop()
        self.pub_conn.close()

    # -- plumbing ------------------------------------------------------------------------------
    def publish(self, job: dict[str, Any] | bytes, routing_key: str | None = None) -> None:
        if isinstance(job, bytes):
            body, rk, props = (
                job,
                routing_key or "generation.job.samples",
                pika.BasicProperties(content_type="application/json", delivery_mode=2),
            )
        else:
            body = json.dumps(job).encode()
            rk = routing_key or f"generation.job.{job.get('stage', 'samples')}"
            props = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=str(job.get("event_id")),
                correlation_id=str(job.get("generation_id")),
                type="AIGenerationJobRequested",
            )
        self.pub.basic_publish(GENERATION_EXCHANGE, rk, body, props, mandatory=True)

    def run(self, name: str, check: Callable[[], None]) -> None:
        started = time.monotonic()
        try:
            check()
        except Exception as exc:
            self.failed.append((name, f"{type(exc).__name__}: {exc}"))
            print(f"FAIL {name} ({time.monotonic() - started:.1f}s): {exc}", flush=True)
            if os.environ.get("AIGEN_SMOKE_DEBUG"):
                traceback.print_exc()
        else:
            self.passed.append(name)
            print(f"ok   {name} ({time.monotonic() - started:.1f}s)", flush=True)

    def expect_failed(
        self, job: dict[str, Any], code: str, retryable: bool, timeout: float = 60
    ) -> Result:
        self.publish(job)
        res = self.collector.wait(job["job_id"], timeout)
        assert res.routing_key == "generation.result.failed", res.routing_key
        self.check_envelope(res, FAILED_KEYS, "AIGenerationFailed", job)
        err = res.body["error"]
        assert set(err) == {"code", "message", "retryable"}, err
        assert err["code"] == code, err
        assert err["retryable"] is retryable, err
        assert isinstance(err["message"], str) and err["message"], err
        return res

    @staticmethod
    def check_envelope(res: Result, keys: set[str], event_type: str, job: dict[str, Any]) -> None:
        body = res.body
        assert keys <= set(body) <= keys | OPTIONAL_RESULT_KEYS, sorted(body)
        assert body["event_type"] == event_type, body["event_type"]
        assert body["generation_id"] == job["generation_id"]
        assert body["job_id"] == job["job_id"]
        props = res.properties
        assert props.content_type == "application/json", props.content_type
        assert props.delivery_mode == 2, props.delivery_mode
        assert props.correlation_id == job["generation_id"], props.correlation_id
        assert props.type == event_type, props.type
        if "event_id" in body:
            assert props.message_id == body["event_id"], props.message_id

    def fault(self, kind: FaultKind, count: int = 1, seconds: float = 30) -> None:
        self.stack.image_api.fail_next(count, kind, seconds)

    def assert_queue_drained(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ready, consumers = self.stack.vhost.queue_counts(JOBS_QUEUE)
            unacked = self.stack.vhost.unacked(JOBS_QUEUE)
            if ready == 0 and unacked == 0 and consumers > 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"jobs queue not drained: ready={ready} unacked={unacked} consumers={consumers}"
                )
            time.sleep(0.5)

    # -- checks --------------------------------------------------------------------------------
    def samples_ready(self) -> None:
        job = make_job("samples")
        self.publish(job)
        res = self.collector.wait(job["job_id"], 60)
        assert res.routing_key == "generation.result.samples_ready", res.routing_key
        self.check_envelope(res, SAMPLES_KEYS, "AIGenerationSamplesReady", job)
        body = res.body
        assert body["model"] == self.stack.image_model, body["model"]
        assert isinstance(body["duration_ms"], int) and body["duration_ms"] >= 0
        samples = body["samples"]
        assert len(samples) == 4, samples
        assert len({s["sample_id"] for s in samples}) == 4, samples
        prefix = job["storage"]["prefix"]
        for s in samples:
            assert set(s) == {"sample_id", "url", "width", "height"}, s
            bucket, key = parse_s3_url(s["url"])
            assert bucket == "creativeflow-assets" and key.startswith(prefix), s["url"]
            assert (s["width"], s["height"]) == (512, 512), s
            assert self.stack.s3.png_size(s["url"]) == (512, 512), f"not stored: {s['url']}"
        sent = self.stack.image_api.requests[-1]
        assert sent["n"] == 4 and sent["size"] == "512x512", sent
        assert job["prompt"] in sent["prompt"], sent

    def final_ready(self) -> None:
        job = make_job("final")
        self.publish(job)
        res = self.collector.wait(job["job_id"], 90)
        assert res.routing_key == "generation.result.final_ready", res.routing_key
        self.check_envelope(res, FINAL_KEYS, "AIGenerationFinalAssetReady", job)
        asset = res.body["asset"]
        assert set(asset) == {"url", "width", "height", "format"}, asset
        assert (asset["width"], asset["height"], asset["format"]) == (2048, 1152, "png"), asset
        bucket, key = parse_s3_url(asset["url"])
        assert bucket == "creativeflow-assets", asset
        assert key.startswith(job["storage"]["prefix"]) and key.endswith(".png"), key
        assert self.stack.s3.png_size(asset["url"]) == (2048, 1152), "final not stored"
        sent = self.stack.image_api.requests[-1]
        assert sent["n"] == 1 and sent["size"] == "2048x1152", sent
        assert job["prompt"] in sent["prompt"], sent

    def model_500(self) -> None:
        self.fault("server_error")
        self.expect_failed(make_job(), "model_unavailable", True)

    def model_429(self) -> None:
        self.fault("rate_limit")
        self.expect_failed(make_job(), "model_rate_limited", True)

    def content_policy(self) -> None:
        self.fault("content_policy")
        self.expect_failed(make_job(), "content_policy_violation", False)

    def model_auth(self) -> None:
        api = self.stack.image_api
        key, api.api_key = api.api_key, "rotated-key"
        try:
            self.expect_failed(make_job(), "model_auth_failed", False)
        finally:
            api.api_key = key

    def model_timeout(self) -> None:
        # The call's timeout follows the job's deadline: 6 s away -> ~5 s timeout.
        self.fault("hang", seconds=20)
        started = time.monotonic()
        self.expect_failed(make_job(deadline_s=6), "model_timeout", True, timeout=30)
        assert time.monotonic() - started < 15, "timeout did not follow deadline_at"

    def model_refused(self) -> None:
        self.stack.image_api.refuse_for(3)
        self.expect_failed(make_job(), "model_unavailable", True)
        time.sleep(3.5)  # listener is back

    def model_reset(self) -> None:
        self.fault("reset")
        self.expect_failed(make_job(), "model_unavailable", True)

    def storage_missing_bucket(self) -> None:
        job = make_job(storage={"bucket": "no-such-bucket", "prefix": "users/u-42/x/"})
        self.expect_failed(job, "storage_error", False)

    def storage_down(self) -> None:
        with self.stack.s3.outage():
            self.expect_failed(make_job(), "storage_error", True)

    def deadline_passed(self) -> None:
        calls = self.stack.image_api.calls
        self.expect_failed(make_job(deadline_s=-5), "deadline_passed", False)
        assert self.stack.image_api.calls == calls, "model called for an expired job"

    def malformed_jobs(self) -> None:
        calls = self.stack.image_api.calls
        bad_fields = make_job()
        for name in ("prompt", "sample_size"):
            del bad_fields[name]
        bad_stage = make_job(stage="thumbnail")
        no_identity = make_job()
        del no_identity["generation_id"]
        no_reply = make_job()
        del no_reply["reply"]
        self.publish(b"this is {not json", "generation.job.samples")
        self.publish(b"\xff\xfe\x00 binary garbage", "generation.job.final")
        self.publish(b'["a", "json", "array"]', "generation.job.samples")
        self.publish(no_identity)
        self.publish(no_reply)
        self.expect_failed(bad_fields, "invalid_job", False)
        self.expect_failed(
            bad_stage,
            "invalid_job",
            False,
        )
        # The consumer is not wedged: a good job behind the garbage still goes through.
        good = make_job()
        self.publish(good)
        res = self.collector.wait(good["job_id"], 60)
        assert res.routing_key == "generation.result.samples_ready", res.routing_key
        time.sleep(2)  # a redelivery loop would show up as repeats / model calls
        for job in (bad_fields, bad_stage):
            assert self.collector.count(job["job_id"]) == 1, "duplicate results"
        for job in (no_identity, no_reply):
            assert self.collector.count(job["job_id"]) == 0, "answered an unanswerable job"
        assert self.stack.image_api.calls == calls + 1, "model called for malformed jobs"
        assert not self.collector.undecodable, self.collector.undecodable
        self.assert_queue_drained()

    def throughput(self) -> None:
        n = self.throughput_jobs
        api = self.stack.image_api
        calls = api.calls
        n8n = self.stack.n8n
        assert n8n is not None and n8n.proc is not None
        cpu0, py0 = _proc_cpu_s(n8n.proc.pid), time.process_time()
        jobs = [make_job() for _ in range(n)]
        sent: dict[str, float] = {}
        t0 = time.monotonic()
        for job in jobs:
            sent[job["job_id"]] = time.monotonic()
            self.publish(job)
        results = self.collector.wait_all([j["job_id"] for j in jobs], timeout=60 + n * 5)
        elapsed = max(r.received_at for r in results.values()) - t0
        cpu1, py1 = _proc_cpu_s(n8n.proc.pid), time.process_time()
        bad = [
            r.routing_key
            for r in results.values()
            if r.routing_key != "generation.result.samples_ready"
        ]
        assert not bad, f"{len(bad)} jobs did not succeed: {bad[:3]}"
        latencies = sorted(results[j].received_at - sent[j] for j in sent)
        durations = [r.body["duration_ms"] for r in results.values()]
        self.figures = {
            "jobs": n,
            "images": n * 4,
            "parallel_messages": self.parallel or 8,
            "elapsed_s": round(elapsed, 2),
            "jobs_per_min": round(n / elapsed * 60, 1),
            "images_per_s": round(n * 4 / elapsed, 1),
            "latency_p50_s": round(statistics.median(latencies), 2),
            "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
            "n8n_duration_ms_p50": int(statistics.median(durations)),
            "n8n_cpu_pct_of_one_core": round((cpu1 - cpu0) / elapsed * 100),
            "stand_ins_cpu_pct_of_one_core": round((py1 - py0) / elapsed * 100),
            "n8n_rss_mb": round(n8n.rss_mb or 0),
            "model_calls": api.calls - calls,
            "model_latency_s": api.latency_s,
        }
        for job in jobs[:3]:
            for s in results[job["job_id"]].body["samples"]:
                assert self.stack.s3.exists(s["url"]), s["url"]
        self.assert_queue_drained()


def _proc_cpu_s(pgid: int) -> float:
    """user+system CPU seconds of every process in n8n's process group (n8n runs in its own
    session, so this includes a task runner child when runners are enabled)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=50, help="samples jobs in the burst")
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="override the trigger's parallelMessages (default: as shipped)",
    )
    parser.add_argument(
        "--model-latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="delay the stand-in model adds to each successful call",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for n8n, e.g. N8N_RUNNERS_ENABLED=true",
    )
    args = parser.parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.env)

    status = n8n_available()
    print(f"n8n: {status.value}", flush=True)
    if status is N8nStatus.UNAVAILABLE:
        print("n8n cannot be installed here (no node/npm)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with N8nStack(
        parallel_messages=args.parallel, extra_env=extra_env, model_latency_s=args.model_latency
    ) as stack:
        assert stack.n8n is not None
        print(
            f"stack up in {time.monotonic() - t0:.1f}s: vhost {stack.vhost.name}, "
            f"n8n :{stack.n8n.port}, S3 {stack.s3.endpoint}, "
            f"model {stack.image_api.base_url}",
            flush=True,
        )
        smoke = Smoke(stack, args.jobs, args.parallel)
        try:
            for name, check in [
                ("samples stage -> AIGenerationSamplesReady, 4 PNGs in S3", smoke.samples_ready),
                ("final stage -> AIGenerationFinalAssetReady, PNG in S3", smoke.final_ready),
                ("model 500 -> failed, retryable", smoke.model_500),
                ("model 429 -> failed, retryable", smoke.model_429),
                ("content policy 400 -> failed, not retryable", smoke.content_policy),
                ("model 401 -> failed, not retryable", smoke.model_auth),
                ("model hangs past deadline -> timeout, retryable", smoke.model_timeout),
                ("model connection refused -> failed, retryable", smoke.model_refused),
                ("model connection reset -> failed, retryable", smoke.model_reset),
                ("storage: bucket missing -> failed, not retryable", smoke.storage_missing_bucket),
                ("storage: S3 down -> failed, retryable", smoke.storage_down),
                ("job past its deadline -> failed, no model call", smoke.deadline_passed),
                ("malformed jobs -> failed or dropped, no loop, no stall", smoke.malformed_jobs),
                (f"throughput: {args.jobs} samples jobs", smoke.throughput),
            ]:
                smoke.run(name, check)
        finally:
            smoke.close()
            if smoke.failed:
                print("--- n8n log tail ---\n" + stack.n8n.log_tail(40), flush=True)
    print(f"stack down; vhost {stack.vhost.name} deleted", flush=True)
    if smoke.figures:
        f = smoke.figures
        print(
            f"throughput: {f['jobs']} samples jobs ({f['images']} images of 512x512) in "
            f"{f['elapsed_s']} s = {f['jobs_per_min']} jobs/min, {f['images_per_s']} images/s; "
            f"round trip p50 {f['latency_p50_s']} s, p95 {f['latency_p95_s']} s; "
            f"n8n execution p50 {f['n8n_duration_ms_p50']} ms; parallelMessages "
            f"{f['parallel_messages']}; CPU (% of one core): n8n "
            f"{f['n8n_cpu_pct_of_one_core']}, stand-ins {f['stand_ins_cpu_pct_of_one_core']}; "
            f"n8n RSS {f['n8n_rss_mb']} MB; model calls {f['model_calls']}, "
            f"stand-in model latency {f['model_latency_s']} s"
        )
    print(f"{len(smoke.passed)} passed, {len(smoke.failed)} failed")
    return 0 if not smoke.failed else 1


if __name__ == "__main__":
    sys.exit(main())
