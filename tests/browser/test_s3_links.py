"""The console shows a real n8n's s3:// images in Chromium, through presigned links.

The service runs under uvicorn with links configured against moto's S3 server; the images are
real PNGs put into the bucket, and the saga is driven as a real n8n would drive it.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from api.app import ApiDeps, create_app
from api.asset_links import S3LinkConfig, S3Links
from saga.commands import ApplyResult, Grant, SelectSample, StartGeneration
from tests.browser.conftest import Server, _free_port
from tests.browser.helpers import shoot, sign_in
from tests.conftest import World
from tests.n8n_support.s3 import S3Stub

BUCKET = "creativeflow-assets"
COLOURS = {"s1": (200, 40, 40), "s2": (40, 160, 60), "final": (40, 160, 60)}
SIZES = {"s1": (64, 64), "s2": (64, 64), "final": (96, 96)}
FORMAT = {"name": "instagram_post", "width": 1080, "height": 1080}


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def linked_server(world: World) -> Iterator[tuple[Server, S3Stub]]:
    import httpx
    import uvicorn

    with S3Stub(bucket=BUCKET) as s3:
        links = S3Links(S3LinkConfig(s3.endpoint, s3.region, s3.access_key_id,
                                     s3.secret_access_key, 600, BUCKET))
        app = create_app(ApiDeps(bus=world.bus, queries=world.queries,
                                 api_keys={"dev-service-key": "service",
                                           "dev-support-key": "support"},
                                 asset_links=links))
        port = _free_port()
        uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
        thread = threading.Thread(target=uv.run, name="s3-links-uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as api:
            try:
                yield Server(url, api), s3
            finally:
                uv.should_exit = True
                thread.join(timeout=10)


def completed_with_s3_assets(world: World, s3: S3Stub) -> str:
    world.bus.handle(Grant("u-s3", Decimal("10.00"), "browser test"))
    gid = str(world.bus.handle(StartGeneration(user_id="u-s3", prompt="p", format=FORMAT))["id"])
    (job,) = world.jobs()
    prefix = job["storage"]["prefix"]

    def put(name: str) -> str:
        s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}{name}.png", ContentType="image/png",
                               Body=png(SIZES[name], COLOURS[name]))
        return f"s3://{BUCKET}/{prefix}{name}.png"

    samples = [{"sample_id": s, "url": put(s), "width": 64, "height": 64} for s in ("s1", "s2")]
    world.bus.handle(ApplyResult("AIGenerationSamplesReady", gid, job["job_id"],
                                 samples=samples))
    world.bus.handle(SelectSample(gid, "s2", "standard"))
    (final_job,) = world.jobs()
    asset = {"url": put("final"), "width": 96, "height": 96, "format": "png"}
    world.bus.handle(ApplyResult("AIGenerationFinalAssetReady", gid, final_job["job_id"],
                                 asset=asset))
    return gid


def test_the_console_renders_s3_images_through_presigned_links(
        page: Any, world: World, linked_server: tuple[Server, S3Stub],
        screenshot_dir: Path) -> None:
    server, s3 = linked_server
    gid = completed_with_s3_assets(world, s3)
    sign_in(page, server)
    page.goto(f"{server.url}/console/generations/{gid}")
    page.wait_for_load_state("networkidle")
    images = page.locator("figure img")
    assert images.count() == 3
    rendered = images.evaluate_all(
        "els => els.map(e => [e.alt, e.currentSrc, e.complete, e.naturalWidth])")
    by_alt = {alt: (src, done, width) for alt, src, done, width in rendered}
    assert set(by_alt) == {"Final asset", "Sample s1", "Sample s2"}
    for alt, name in (("Final asset", "final"), ("Sample s1", "s1"), ("Sample s2", "s2")):
        src, done, width = by_alt[alt]
        assert src.startswith(f"{s3.endpoint}/{BUCKET}/") and "X-Amz-Signature=" in src
        assert done and width == SIZES[name][0], f"{alt} did not load from {src}"
    shoot(page, screenshot_dir, "generation-s3-links")
