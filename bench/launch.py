"""How the benchmark starts ``aigen serve``, optionally counting its SQL.

The service is started as ``<python> -c <snippet>`` with the checkout as working directory, so
the same code runs the service of this checkout or of any other one (a ``git worktree`` of an
older commit with its own venv): the snippet needs nothing from ``bench``.

With ``count_sql`` the snippet registers SQLAlchemy engine events (statements by verb,
``executemany`` calls, begin/commit/rollback) before the service starts, and writes the counts
as JSON to ``AIGEN_BENCH_SQLCOUNT_FILE`` whenever the process receives SIGUSR1. The counting
costs a little CPU, so it is off unless asked for; the CPU figures of a counting run are not
the ones to quote.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

_COUNT_SQL = r"""
import collections, json, os, signal, threading
from sqlalchemy import event
from sqlalchemy.engine import Engine

_counts = collections.Counter()
_lock = threading.Lock()

def _bump(*keys):
    with _lock:
        for k in keys:
            _counts[k] += 1

@event.listens_for(Engine, "before_cursor_execute")
def _on_statement(conn, cursor, statement, parameters, context, executemany):
    verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
    shape = " ".join(statement.split())[:140]
    _bump("statements", "verb:" + verb, "sql:" + shape,
          *(("executemany",) if executemany else ()))

@event.listens_for(Engine, "begin")
def _on_begin(conn):
    _bump("begin")

@event.listens_for(Engine, "commit")
def _on_commit(conn):
    _bump("commit")

@event.listens_for(Engine, "rollback")
def _on_rollback(conn):
    _bump("rollback")

def _dump(signum, frame):
    path = os.environ["AIGEN_BENCH_SQLCOUNT_FILE"]
    with _lock:
        data = dict(_counts)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)

signal.signal(signal.SIGUSR1, _dump)
"""

_SERVE = r"""
import runpy, sys
sys.argv = ["aigen", "serve"]
runpy.run_module("aigen.cli", run_name="__main__")
"""


def serve_command(python: str, count_sql: bool) -> list[str]:
    return [python, "-c", (_COUNT_SQL if count_sql else "") + _SERVE]


def read_sql_counts(pid: int, path: Path, timeout: float = 5.0) -> dict[str, int]:
    """Ask the service (SIGUSR1) for its current counts and read them."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime_ns != before:
            data: dict[str, Any] = json.loads(path.read_text())
            return {k: int(v) for k, v in data.items()}
        time.sleep(0.05)
    raise RuntimeError(f"service {pid} did not write its SQL counts to {path}")
