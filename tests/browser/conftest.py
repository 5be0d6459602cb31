"""Browser tests: the console in real Chromium (Debian's package), driven by Playwright.

The service runs on the embedded default (SQLite, in-process broker, demo worker) under a real
uvicorn server on a free port, exactly as ``aigen serve`` runs it. Screenshots of every page
land in ``AIGEN_SCREENSHOT_DIR`` (default: a temporary folder, printed at the end).
Locally the tests skip when Chromium or Playwright is missing; under ``CI=true`` they fail.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from aigen.bootstrap import build
from aigen.settings import Settings
from tests.conftest import unavailable

CHROMIUM = os.environ.get("AIGEN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SERVICE_KEY = "dev-service-key"
SUPPORT_KEY = "dev-support-key"


@dataclass
class Server:
    url: str
    api: httpx.Client  # the REST API with the service key

    def support_get(self, path: str) -> httpx.Response:
        return self.api.get(path, headers={"Authorization": f"Bearer {SUPPORT_KEY}"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import uvicorn

    port = _free_port()
    data_dir = tmp_path_factory.mktemp("console-embedded")
    settings = Settings(data_dir=data_dir, http_port=port, demo_delay_s=0.05, amqp_url=None,
                        database_url="", api_keys=None, billing_url=None)
    runtime = build(settings)
    runtime.start()
    config = uvicorn.Config(runtime.app, host="127.0.0.1", port=port, log_level="warning",
                            access_log=False)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="console-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {SERVICE_KEY}"},
                       timeout=10)
    try:
        yield Server(url, api)
    finally:
        api.close()
        uv.should_exit = True
        thread.join(timeout=10)
        runtime.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    path = Path(os.environ.get("AIGEN_SCREENSHOT_DIR")
                or tempfile.mkdtemp(prefix="aigen-console-screens-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    yield tab
    context.close()


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                  is_mobile=True, has_touch=True)
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    yield tab
    context.close()
