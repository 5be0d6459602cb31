"""The built-in demo worker: plays n8n's part in the embedded mode, over the same messages.

It consumes ``AIGenerationJobRequested`` jobs, renders placeholder PNGs (the prompt on a
coloured background, at the requested size) into a local folder the API serves under
``/assets``, and publishes ``AIGenerationProgress`` and ``AIGeneration…Ready`` results exactly
as contract §4 describes. It is a stand-in for a newcomer's first run, not an image model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from messaging.broker import Broker, Delivery, Disposition
from saga.messages import GENERATION_EXCHANGE, JOBS_QUEUE, OutboundMessage
from saga.model import new_id

log = logging.getLogger(__name__)


def render_png(path: Path, width: int, height: int, text: str, seed: str) -> None:
    digest = hashlib.sha256(seed.encode()).digest()
    background = (digest[0], digest[1], digest[2])
    ink = (255, 255, 255) if sum(background) < 384 else (20, 20, 20)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    size = max(12, min(width, height) // 14)
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = ImageFont.load_default()
    lines = textwrap.wrap(text, width=max(8, int(width / (size * 0.6))))[:8]
    draw.multiline_text((width // 16, height // 3), "\n".join(lines), fill=ink, font=font,
                        spacing=size // 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


class DemoWorker:
    def __init__(self, broker: Broker, assets_dir: Path, public_url: str,
                 delay: float = 0.5) -> None:
        self.broker = broker
        self.assets_dir = assets_dir
        self.public_url = public_url.rstrip("/")
        self.delay = delay
        self._stop = threading.Event()

    def start(self) -> None:
        self.broker.consume(JOBS_QUEUE, self.handle)

    def stop(self) -> None:
        self._stop.set()

    def handle(self, delivery: Delivery) -> Disposition:
        try:
            job = json.loads(delivery.body)
        except ValueError:
            log.warning("demo worker dropped a job that is not JSON")
            return Disposition.ACK
        try:
            self._run(job)
        except Exception as exc:  # a demo must never wedge the queue
            log.exception("demo worker failed")
            if isinstance(job, dict) and job.get("generation_id") and job.get("job_id"):
                self._reply(job, "failed", {
                    "event_type": "AIGenerationFailed",
                    "error": {"code": "demo_worker_error", "message": str(exc)[:200],
                              "retryable": False}})
        return Disposition.ACK

    def _run(self, job: dict[str, Any]) -> None:
        self._reply(job, "progress", {"event_type": "AIGenerationProgress", "percent": 10})
        self._stop.wait(self.delay)
        prefix = job["storage"]["prefix"]
        started = time.monotonic()
        if job["stage"] == "samples":
            size = int(job.get("sample_size") or 512)
            samples = []
            for n in range(1, int(job.get("sample_count") or 4) + 1):
                sample_id = f"s{n}"
                key = f"{prefix}{job['job_id']}/{sample_id}.png"
                render_png(self.assets_dir / key, size, size, job["prompt"],
                           f"{job['generation_id']}{n}")
                samples.append({"sample_id": sample_id, "url": f"{self.public_url}/assets/{key}",
                                "width": size, "height": size})
            self._reply(job, "samples_ready", {
                "event_type": "AIGenerationSamplesReady", "samples": samples,
                "model": "demo-placeholder",
                "duration_ms": int((time.monotonic() - started) * 1000)})
        else:
            out = job["output"]
            key = f"{prefix}{job['job_id']}/final.png"
            render_png(self.assets_dir / key, int(out["width"]), int(out["height"]),
                       job["prompt"], job["generation_id"] + (job.get("selected_sample") or {})
                       .get("sample_id", ""))
            self._reply(job, "final_ready", {
                "event_type": "AIGenerationFinalAssetReady",
                "asset": {"url": f"{self.public_url}/assets/{key}", "width": out["width"],
                          "height": out["height"], "format": "png"}})

    def _reply(self, job: dict[str, Any], suffix: str, body: dict[str, Any]) -> None:
        reply = job.get("reply") or {}
        body = {**body, "generation_id": job["generation_id"], "job_id": job["job_id"]}
        event_id = new_id()
        self.broker.publish([OutboundMessage(
            reply.get("exchange", GENERATION_EXCHANGE),
            reply.get("routing_key_prefix", "generation.result.") + suffix,
            event_id, job["generation_id"], body["event_type"], body)])
