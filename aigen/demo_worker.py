"""The built-in demo worker: plays n8n's part in the embedded mode, over the same messages.

It consumes ``AIGenerationJobRequested`` jobs, renders placeholder PNGs into a local folder
the API serves under ``/assets`` — per sample a background and a disc coloured by the
sample's seed, the prompt, and the sample id in a badge; the final is the chosen sample's
seed rendered at the final's size, so it is that sample, large, and a new round (new
``job_id``, new seeds) looks different — and publishes ``AIGenerationProgress`` and
``AIGeneration…Ready`` results exactly as the message reference (docs/messages.md)
describes. It is a stand-in for a newcomer's first run, not an image model.

The embedded broker keeps its queues in memory, so a stop (Ctrl-C) loses a job the worker
had not answered yet. :func:`redispatch_unanswered` runs at start-up and re-arms the outbox
row of every job a saga is still waiting for; the relay sends it again. A job is idempotent
by ``job_id`` (the saga applies the first result for its current job and counts the rest as
duplicates or stale), so a job that *was* answered costs nothing extra.
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
from sqlalchemy import Engine, select, update

from messaging.broker import Broker, Delivery, Disposition
from persistence.tables import generations, outbox
from saga.messages import GENERATION_EXCHANGE, JOBS_QUEUE, OutboundMessage
from saga.model import new_id

log = logging.getLogger(__name__)


def seed_of(url: str | None) -> str:
    """A sample's seed is its place in storage (``…/<job_id>/<sample_id>.png``): unique per
    round and per sample, and recoverable from the URL the final job carries."""
    if not url:
        return ""
    parts = url.rstrip("/").rsplit("/", 2)
    if len(parts) < 3:
        return url
    return f"{parts[-2]}/{parts[-1].removesuffix('.png')}"


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def render_png(path: Path, width: int, height: int, text: str, seed: str, label: str) -> None:
    """One placeholder image: colours and a disc placed by ``seed``, the prompt, and ``label``
    (the sample id) in a badge. Everything scales with the size, so a final rendered from a
    sample's seed is that sample, large."""
    digest = hashlib.sha256(seed.encode()).digest()
    background = (digest[0], digest[1], digest[2])
    accent = (255 - digest[0], (digest[1] + 128) % 256, digest[3])
    ink = (255, 255, 255) if sum(background) < 384 else (20, 20, 20)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    unit = min(width, height)
    # The disc sits below the prompt's first lines, so the text stays readable.
    cx, cy = width * (0.3 + digest[4] / 640), height * (0.62 + digest[5] / 1600)
    radius = unit * (0.14 + digest[6] / 2560)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=accent)
    size = max(12, unit // 14)
    lines = textwrap.wrap(text, width=max(8, int(width / (size * 0.6))))[:8]
    draw.multiline_text((width // 16, height // 3), "\n".join(lines), fill=ink,
                        font=_font(size), spacing=size // 3)
    badge = max(14, unit // 9)
    pad = badge // 3
    box = draw.textbbox((0, 0), label, font=_font(badge))
    draw.rectangle((0, 0, box[2] + 2 * pad, box[3] + 2 * pad), fill=ink)
    draw.text((pad, pad), label, fill=background, font=_font(badge))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=1)  # a placeholder: speed over size


WAITING_STATES = ("processing_samples", "processing_final")
JOB_TYPE = "AIGenerationJobRequested"


def redispatch_unanswered(engine: Engine) -> int:
    """Mark the sent job of every saga still waiting on it as unsent; returns how many.

    Only for the in-process broker, where an unanswered job does not survive the process.
    """
    rearmed = 0
    with engine.begin() as conn:
        waiting = conn.execute(select(generations.c.id, generations.c.body).where(
            generations.c.state.in_(WAITING_STATES))).all()
        for generation_id, body in waiting:
            job_id = (body or {}).get("job_id")
            if not job_id:
                continue
            sent = conn.execute(select(outbox.c.id, outbox.c.body).where(
                outbox.c.correlation_id == generation_id, outbox.c.type == JOB_TYPE,
                outbox.c.sent_at.is_not(None))).all()
            for row_id, payload in sent:
                if json.loads(payload).get("job_id") == job_id:
                    conn.execute(update(outbox).where(outbox.c.id == row_id).values(
                        sent_at=None))
                    rearmed += 1
    if rearmed:
        log.warning("re-dispatching %d job(s) left unanswered when the service last stopped",
                    rearmed)
    return rearmed


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
        if self._stop.wait(self.delay):
            return  # stopping: left unanswered, re-dispatched at the next start
        prefix = job["storage"]["prefix"]
        started = time.monotonic()
        if job["stage"] == "samples":
            size = int(job.get("sample_size") or 512)
            samples = []
            for n in range(1, int(job.get("sample_count") or 4) + 1):
                sample_id = f"s{n}"
                key = f"{prefix}{job['job_id']}/{sample_id}.png"
                render_png(self.assets_dir / key, size, size, job["prompt"],
                           seed_of(key), sample_id)
                samples.append({"sample_id": sample_id, "url": f"{self.public_url}/assets/{key}",
                                "width": size, "height": size})
            self._reply(job, "samples_ready", {
                "event_type": "AIGenerationSamplesReady", "samples": samples,
                "model": "demo-placeholder",
                "duration_ms": int((time.monotonic() - started) * 1000)})
        else:
            out = job["output"]
            key = f"{prefix}{job['job_id']}/final.png"
            chosen = job.get("selected_sample") or {}
            render_png(self.assets_dir / key, int(out["width"]), int(out["height"]),
                       job["prompt"], seed_of(chosen.get("url")) or job["generation_id"],
                       f"{chosen.get('sample_id') or '?'} final")
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
