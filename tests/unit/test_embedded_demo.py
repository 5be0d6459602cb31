"""The embedded default as a newcomer runs it: the demo worker's images, and a stop (Ctrl-C)
while a job is in flight, after which the next start finishes the generation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from aigen.bootstrap import Runtime, build
from aigen.demo_worker import render_png, seed_of
from aigen.settings import Settings
from persistence.tables import outbox

S = {"Authorization": "Bearer dev-service-key"}
START = {"user_id": "u-42", "prompt": "spring sale banner, pastel", "format": "instagram_post"}


def wait_until(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    started: list[Runtime] = []
    yield started
    for runtime in started:
        runtime.stop()


def embedded(tmp_path: Path, runtimes: list[Runtime], delay: float) -> tuple[Runtime, TestClient]:
    runtime = build(Settings(data_dir=tmp_path, demo_delay_s=delay, sweeper_interval_s=0.1))
    runtime.start()
    runtimes.append(runtime)
    return runtime, TestClient(runtime.app)


def state_of(client: TestClient, gen_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/generations/{gen_id}", headers=S)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_a_job_in_flight_survives_a_stop_of_the_embedded_runtime(
        tmp_path: Path, runtimes: list[Runtime]) -> None:
    runtime, client = embedded(tmp_path, runtimes, delay=60)  # the worker holds the job
    client.post("/api/v1/accounts/u-42/grants", headers=S,
                json={"amount": "10.00", "reason": "welcome"}).raise_for_status()
    started = client.post("/api/v1/generations", headers={**S, "Idempotency-Key": "k1"},
                          json=START)
    assert started.status_code == 202
    gen_id = started.json()["id"]

    def job_sent() -> bool:
        with runtime.engine.connect() as conn:
            return bool(conn.execute(select(outbox.c.sent_at).where(
                outbox.c.correlation_id == gen_id,
                outbox.c.type == "AIGenerationJobRequested")).scalar())
    wait_until(job_sent, what="the samples job to be sent")
    runtime.stop()  # Ctrl-C: the in-process queues and the worker's job are gone
    runtimes.remove(runtime)

    _, client = embedded(tmp_path, runtimes, delay=0.05)
    done = wait_until(lambda: (g := state_of(client, gen_id))["state"] == "awaiting_selection"
                      and g, what="the generation to reach awaiting_selection after a restart")
    assert len(done["samples"]) == 4 and done["attempt"] == 1
    assert done["credits"] == {"held": "0.00", "charged": "0.25", "released": "0.00"}
    history = client.get(f"/api/v1/generations/{gen_id}/history",
                         headers={"Authorization": "Bearer dev-support-key"}).json()
    assert not [e for e in history["events"] if e["kind"] == "rejected"]


def pixel(url: str, assets: Path, where: tuple[float, float] = (0.9, 0.1)) -> tuple[int, ...]:
    image = Image.open(assets / url.split("/assets/", 1)[1]).convert("RGB")
    value: tuple[int, ...] = image.getpixel((int(image.width * where[0]),
                                             int(image.height * where[1])))
    return value


def test_the_final_is_the_chosen_sample_and_a_new_round_looks_different(
        tmp_path: Path, runtimes: list[Runtime]) -> None:
    _, client = embedded(tmp_path, runtimes, delay=0.01)
    assets = tmp_path / "assets"
    client.post("/api/v1/accounts/u-42/grants", headers=S,
                json={"amount": "10.00", "reason": "welcome"}).raise_for_status()
    gen_id = client.post("/api/v1/generations", headers={**S, "Idempotency-Key": "k2"},
                         json=START).json()["id"]
    first = wait_until(lambda: (g := state_of(client, gen_id))["state"] == "awaiting_selection"
                       and g, what="samples")
    first_colours = [pixel(s["url"], assets) for s in first["samples"]]
    assert len(set(first_colours)) == 4, "each sample of a round has its own colours"

    client.post(f"/api/v1/generations/{gen_id}/regenerate", headers=S,
                json={"prompt": None}).raise_for_status()
    second = wait_until(lambda: (g := state_of(client, gen_id))["state"] == "awaiting_selection"
                        and g["samples"] != first["samples"] and g, what="second round")
    second_colours = [pixel(s["url"], assets) for s in second["samples"]]
    assert not set(first_colours) & set(second_colours), "a new round must look different"

    client.post(f"/api/v1/generations/{gen_id}/selection", headers=S,
                json={"sample_id": "s2", "resolution": "standard"}).raise_for_status()
    final = wait_until(lambda: (g := state_of(client, gen_id))["state"] == "completed" and g,
                       what="the final")
    asset = final["final_asset"]
    assert (asset["width"], asset["height"]) == (2048, 2048)
    chosen = second["samples"][1]
    for where in ((0.9, 0.1), (0.5, 0.5), (0.2, 0.9)):  # background and disc, scaled
        assert pixel(asset["url"], assets, where) == pixel(chosen["url"], assets, where)


def test_each_image_carries_its_sample_id(tmp_path: Path) -> None:
    """The badge in the top-left corner differs between labels on the same seed."""
    render_png(tmp_path / "a.png", 256, 256, "p", "job/s1", "s1")
    render_png(tmp_path / "b.png", 256, 256, "p", "job/s1", "s4")
    badge = (0, 0, 40, 40)
    a = Image.open(tmp_path / "a.png").convert("RGB").crop(badge).tobytes()
    b = Image.open(tmp_path / "b.png").convert("RGB").crop(badge).tobytes()
    assert a != b


def test_a_sample_seed_is_recovered_from_its_url() -> None:
    key = "users/u/generations/g/samples/job-1/s2.png"
    assert seed_of(key) == "job-1/s2"
    assert seed_of(f"http://127.0.0.1:8000/assets/{key}") == "job-1/s2"
    assert seed_of(None) == ""


def test_ctrl_c_on_aigen_serve_mid_job_then_a_restart_completes_the_round(tmp_path: Path) -> None:
    """The newcomer's case as a process: SIGINT while the demo worker holds the job."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    api = f"http://127.0.0.1:{port}/api/v1"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGEN_")}

    def serve(delay: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"serve-{delay}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "aigen.cli", "serve", "--port", str(port)],
            env={**env, "AIGEN_DATA_DIR": str(tmp_path), "AIGEN_DEMO_DELAY_S": delay},
            stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert proc.poll() is None, "aigen serve exited"
            try:
                return httpx.get(f"{api}/../../health/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait_until(up, timeout=30, what="aigen serve")
        return proc

    first = serve("60")
    try:
        httpx.post(f"{api}/accounts/u-42/grants", headers=S, timeout=5,
                   json={"amount": "10.00", "reason": "welcome"}).raise_for_status()
        gen_id = httpx.post(f"{api}/generations", headers={**S, "Idempotency-Key": "k"},
                            json=START, timeout=5).json()["id"]
        time.sleep(1)  # the job is with the worker, which "works" for a minute
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=20) == 0
    assert "Traceback" not in (tmp_path / "serve-60.log").read_text()
    second = serve("0.05")
    try:
        def ready() -> bool:
            body = httpx.get(f"{api}/generations/{gen_id}", headers=S, timeout=5).json()
            return bool(body["state"] == "awaiting_selection")
        wait_until(ready, timeout=30, what="the round to complete after the restart")
    finally:
        second.terminate()
        second.wait(timeout=20)
