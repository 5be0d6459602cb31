"""OpenAI-compatible images API stand-in on loopback, with fault injection.

``POST /v1/images/generations`` answers like OpenAI's images API with ``b64_json`` PNGs that
Pillow draws at the requested size, so the workflow's decoding, storage and size reporting are
exercised on real image bytes. A test steers it from Python (``fail_next``, ``refuse_for``) or
over HTTP (``/_admin/...``) to make the next calls fail the ways a real model server does.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

from PIL import Image, ImageDraw

FaultKind = Literal["server_error", "rate_limit", "content_policy", "hang", "reset"]
FAULT_KINDS: tuple[str, ...] = ("server_error", "rate_limit", "content_policy", "hang", "reset")
_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


@dataclass
class _Fault:
    kind: FaultKind
    remaining: int
    seconds: float


def render_png(width: int, height: int, seed: str) -> bytes:
    """A real, cheap PNG of the requested size whose colours depend on ``seed``."""
    digest = hashlib.sha256(seed.encode()).digest()
    bg = (digest[0], digest[1], digest[2])
    fg = (255 - digest[0], 255 - digest[1], 255 - digest[2])
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    m = min(width, height)
    draw.ellipse(
        (width // 2 - m // 3, height // 2 - m // 3, width // 2 + m // 3, height // 2 + m // 3),
        fill=fg,
    )
    draw.rectangle((0, 0, width - 1, height - 1), outline=fg, width=max(2, m // 64))
    draw.text((8, 8), seed[:40], fill=fg)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ImageApiStub:
    """Threaded HTTP server; ``base_url`` ends in ``/v1`` like OpenAI's."""

    def __init__(
        self, api_key: str | None = "aigen-test-image-key", port: int = 0, latency_s: float = 0.0
    ) -> None:
        self.api_key = api_key
        self.latency_s = latency_s  # added to every successful generation, like a real model
        self._port = port
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._release = threading.Event()  # set on stop: frees handlers that "hang"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._refuse_timer: threading.Timer | None = None
        self.calls = 0
        self.requests: list[dict[str, Any]] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ImageApiStub:
        self._release.clear()
        self._listen()
        return self

    def _listen(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self._port), _make_handler(self))
        server.daemon_threads = True
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, daemon=True, name="image-api-stub"
        )
        self._thread.start()

    def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def stop(self) -> None:
        self._release.set()
        if self._refuse_timer is not None:
            self._refuse_timer.cancel()
            self._refuse_timer = None
        self._close_listener()

    def __enter__(self) -> ImageApiStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    # -- control -----------------------------------------------------------------------------
    def fail_next(self, count: int, kind: FaultKind, seconds: float = 30.0) -> None:
        """Make the next ``count`` generation calls fail as ``kind``.

        ``hang`` holds the connection ``seconds`` without answering, then drops it; ``reset``
        drops it at once; the others answer with OpenAI-shaped error bodies.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._faults.append(_Fault(kind, count, seconds))

    def refuse_for(self, seconds: float) -> None:
        """Close the listening socket (connection refused) and reopen it after ``seconds``."""
        self._close_listener()
        self._refuse_timer = threading.Timer(seconds, self._reopen)
        self._refuse_timer.daemon = True
        self._refuse_timer.start()

    def _reopen(self) -> None:
        if not self._release.is_set():
            self._listen()

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.calls = 0
            self.requests.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self.calls,
                "pending_faults": [
                    {"kind": f.kind, "remaining": f.remaining} for f in self._faults
                ],
            }

    def _take_fault(self, consume: bool = True) -> _Fault | None:
        """Count a generation call and, when ``consume``, take the next pending fault."""
        with self._lock:
            self.calls += 1
            if not consume:
                return None
            while self._faults:
                fault = self._faults[0]
                if fault.remaining <= 0:
                    self._faults.pop(0)
                    continue
                fault.remaining -= 1
                return fault
            return None

    def _record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(
                {k: body.get(k) for k in ("model", "prompt", "n", "size", "response_format")}
            )


def _error(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _make_handler(stub: ImageApiStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def _send(
            self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw else {}

        def _drop(self) -> None:
            """Close the TCP connection without an HTTP answer (RST where possible)."""
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            self.close_connection = True
            self.connection.close()

        def do_GET(self) -> None:
            if self.path == "/_admin/stats":
                self._send(200, stub.stats())
            else:
                self._send(404, _error("not found", "invalid_request_error", None))

        def do_POST(self) -> None:
            try:
                body = self._body()
            except (ValueError, UnicodeDecodeError):
                self._send(400, _error("body is not JSON", "invalid_request_error", None))
                return
            if self.path == "/v1/images/generations":
                self._generate(body)
            elif self.path == "/_admin/faults":
                stub.fail_next(
                    int(body.get("count", 1)), body["kind"], float(body.get("seconds", 30))
                )
                self._send(200, stub.stats())
            elif self.path == "/_admin/refuse":
                self._send(200, {"refusing_for": float(body.get("seconds", 5))})
                stub.refuse_for(float(body.get("seconds", 5)))
            elif self.path == "/_admin/reset":
                stub.reset()
                self._send(200, stub.stats())
            else:
                self._send(404, _error("not found", "invalid_request_error", None))

        def _generate(self, body: Any) -> None:
            if stub.api_key and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                stub._take_fault(consume=False)
                self._send(
                    401,
                    _error(
                        "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
                    ),
                )
                return
            fault = stub._take_fault()
            if isinstance(body, dict):
                stub._record(body)
            if fault is not None:
                self._fault(fault)
                return
            if not isinstance(body, dict):
                self._send(400, _error("body must be an object", "invalid_request_error", None))
                return
            prompt, n, size = body.get("prompt"), body.get("n", 1), str(body.get("size", ""))
            match = _SIZE.match(size)
            if not isinstance(prompt, str) or not prompt.strip():
                self._send(400, _error("prompt is required", "invalid_request_error", None))
                return
            if not isinstance(n, int) or not 1 <= n <= 10:
                self._send(400, _error("n must be 1..10", "invalid_request_error", None))
                return
            if match is None or not all(64 <= int(v) <= 4096 for v in match.groups()):
                self._send(400, _error(f"invalid size {size!r}", "invalid_request_error", None))
                return
            width, height = int(match.group(1)), int(match.group(2))
            if stub.latency_s > 0:
                stub._release.wait(stub.latency_s)
            data = [
                {
                    "b64_json": base64.b64encode(
                        render_png(width, height, f"{prompt}#{i + 1}")
                    ).decode(),
                    "revised_prompt": prompt,
                }
                for i in range(n)
            ]
            self._send(200, {"created": int(time.time()), "data": data})

        def _fault(self, fault: _Fault) -> None:
            if fault.kind == "server_error":
                self._send(
                    500,
                    _error(
                        "The server had an error while processing your request.",
                        "server_error",
                        None,
                    ),
                )
            elif fault.kind == "rate_limit":
                self._send(
                    429,
                    _error(
                        "Rate limit reached for images per minute.",
                        "requests",
                        "rate_limit_exceeded",
                    ),
                    headers={"Retry-After": "1"},
                )
            elif fault.kind == "content_policy":
                self._send(
                    400,
                    _error(
                        "Your request was rejected as a result of our safety system.",
                        "invalid_request_error",
                        "content_policy_violation",
                    ),
                )
            elif fault.kind == "hang":
                stub._release.wait(fault.seconds)
                self._drop()
            else:
                self._drop()

    return Handler
