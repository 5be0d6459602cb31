"""A stand-in for Odoo's billing service (docs/api.md, credits) on loopback, with injectable faults.

Idempotent by ``hold_id`` like the real one. It records every state change of every hold so a
test can prove each hold was committed or released exactly once, and counts conflicting calls
(a release after a commit, say) as violations.
"""

from __future__ import annotations

import json
import random
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class BillingStandIn:
    def __init__(self, *, seed: int = 1) -> None:
        self.accounts: dict[str, dict[str, Any]] = {}
        self.holds: dict[str, dict[str, Any]] = {}
        self.transitions: list[tuple[str, str]] = []  # (hold_id, new status)
        self.violations: list[str] = []
        self.calls = 0
        self.down = False  # answer nothing: drop the connection
        self.error_rate = 0.0  # share of calls answered with 500 (after doing nothing)
        self.slow_rate = 0.0  # share of calls answered after ``slow_seconds``
        self.slow_seconds = 0.0
        # Users whose commits are refused for good (a permanent 4xx), and with which status.
        self.refuse_commits_for: set[str] = set()
        self.refusal_status = 422
        self.refused = 0
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> BillingStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def open_account(self, user_id: str, plan: str, available: str) -> None:
        self.accounts[user_id] = {"plan": plan, "available": Decimal(available)}

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for hold in self.holds.values():
            counts[hold["status"]] = counts.get(hold["status"], 0) + 1
        return counts

    # -- request handling ------------------------------------------------------------------
    def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        with self.lock:
            if method == "GET" and len(parts) == 2 and parts[0] == "accounts":
                account = self.accounts.get(parts[1])
                if account is None:
                    return 404, {"error": "unknown account"}
                return 200, {"plan": account["plan"], "available": str(account["available"])}
            if method == "POST" and parts == ["holds"]:
                return self._hold(body)
            if method == "POST" and len(parts) == 3 and parts[0] == "holds":
                return self._settle(parts[1], parts[2])
        return 404, {"error": "no such route"}

    def _hold(self, body: dict[str, Any]) -> tuple[int, Any]:
        hold_id = body["hold_id"]
        if hold_id in self.holds:  # idempotent replay
            return 201, {"hold_id": hold_id}
        account = self.accounts.get(body["user_id"])
        amount = Decimal(body["amount"])
        if account is None or account["available"] < amount:
            return 402, {"error": "insufficient credits"}
        account["available"] -= amount
        self.holds[hold_id] = {"user_id": body["user_id"], "amount": amount, "status": "open"}
        self.transitions.append((hold_id, "open"))
        return 201, {"hold_id": hold_id}

    def _settle(self, hold_id: str, op: str) -> tuple[int, Any]:
        hold = self.holds.get(hold_id)
        if hold is None:
            return 404, {"error": "unknown hold"}
        target = {"commit": "committed", "release": "released"}[op]
        if op == "commit" and hold["user_id"] in self.refuse_commits_for:
            self.refused += 1
            return self.refusal_status, {"error": "commit refused"}
        if hold["status"] == target:
            return 200, {"status": target}  # idempotent replay
        if hold["status"] != "open":
            self.violations.append(f"{op} of {hold['status']} hold {hold_id}")
            return 409, {"error": f"hold is {hold['status']}"}
        hold["status"] = target
        if target == "released":
            self.accounts[hold["user_id"]]["available"] += hold["amount"]
        self.transitions.append((hold_id, target))
        return 200, {"status": target}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def _serve(self, method: str) -> None:
                standin.calls += 1
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if standin.down:
                    self.close_connection = True
                    self.connection.close()
                    return
                if standin.rng.random() < standin.slow_rate:
                    time.sleep(standin.slow_seconds)
                if standin.rng.random() < standin.error_rate:
                    status, payload = 500, {"error": "injected"}
                else:
                    status, payload = standin.handle(method, self.path, body)
                    if standin.rng.random() < standin.error_rate:
                        status, payload = 500, {"error": "injected after doing the work"}
                raw = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up waiting (a slow answer): that is the point

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

        return Handler
