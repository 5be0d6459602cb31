"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) of ``aigen serve``.

``python -m bench.throughput --profile /tmp/serve.txt`` records one; then
``python -m bench.profile_summary /tmp/serve.txt`` prints where the CPU went:

* by component, **self** time: the innermost frame that belongs to a known library or to
  the service decides (a C call such as psycopg2's ``execute`` shows as the Python frame
  that made it, e.g. SQLAlchemy's ``do_execute``, so it is split out as "psycopg2");
* by component, **inclusive** time: share of samples with that component anywhere on the
  stack (sums to more than 100 %);
* by thread (the root frame of each stack when recorded with ``--threads``);
* the hottest functions, self and inclusive, as ``file:function``.

py-spy leaves idle threads out by default, so the samples approximate CPU time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# SQLAlchemy frames that are really a psycopg2 C call (py-spy shows no native frames).
_PSYCOPG_CALLS = {"do_execute", "do_executemany", "do_execute_no_params",
                  "_exec_insertmany_context", "do_commit", "do_rollback", "do_begin",
                  "connect"}


def component(file: str, func: str) -> str | None:
    f = file.replace("\\", "/")
    if not f.startswith("/"):
        f = "/" + f  # py-spy shortens site-packages paths to "pkg/module.py"
    if "/psycopg2/" in f:
        return "psycopg2"
    if "/sqlalchemy/" in f:
        if func.rsplit(".", 1)[-1] in _PSYCOPG_CALLS and "/engine/default.py" in f:
            return "psycopg2 (C call from SQLAlchemy)"
        if "/sqlalchemy/sql/" in f:
            return "SQLAlchemy compile/SQL expression"
        if "/sqlalchemy/pool/" in f:
            return "SQLAlchemy pool"
        if "/sqlalchemy/orm/" in f:
            return "SQLAlchemy ORM"
        return "SQLAlchemy engine/execute/result"
    # The tracing hooks, whether tracing is on or off (docs/tracing.md, "Cost").
    if "/opentelemetry/" in f or f.endswith(("/aigen/telemetry.py", "/saga/tracing.py")):
        return "tracing (aigen/telemetry, saga/tracing, opentelemetry)"
    for name, label in (
        ("/pika/", "pika"),
        ("/uvicorn/", "uvicorn"),
        ("/httptools/", "uvicorn"),
        ("/h11/", "uvicorn"),
        ("/fastapi/", "FastAPI"),
        ("/starlette/", "Starlette"),
        ("/anyio/", "anyio (thread hand-offs)"),
        ("/pydantic_core/", "pydantic"),
        ("/pydantic/", "pydantic"),
        ("/prometheus_client/", "prometheus_client"),
        ("/transitions/", "transitions"),
        ("/structlog/", "structlog"),
        ("/json/", "json"),
        ("/logging/", "logging"),
        ("/asyncio/", "asyncio"),
        ("/uvloop/", "asyncio"),
        ("/concurrent/", "threads/queues"),
        ("/threading.py", "threads/queues"),
        ("/queue.py", "threads/queues"),
        ("/selectors.py", "selectors"),
        ("/socket.py", "socket"),
        ("/ssl.py", "socket"),
        ("/uuid.py", "uuid"),
        ("/decimal.py", "decimal"),
        ("/_strptime.py", "datetime"),
        ("/datetime.py", "datetime"),
        ("/typing.py", "typing"),
        ("/copy.py", "copy"),
        ("/enum.py", "enum"),
        ("/dataclasses.py", "dataclasses"),
        ("/hashlib.py", "hashlib"),
        ("/re/", "re"),
    ):
        if name in f:
            return label
    for pkg in ("saga", "api", "messaging", "persistence", "aigen"):
        if f"/{pkg}/" in f and "site-packages" not in f:
            return f"service: {pkg}/"
    return None


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        body, _, count = line.rpartition(" ")
        frames = []
        for raw in body.split(";"):
            m = FRAME.match(raw)
            frames.append((m["file"], m["func"]) if m else ("", raw))
        stacks.append((frames, int(count)))
    return stacks


def short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "lib/python3.12/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def summarize(path: Path, top: int = 25) -> str:
    stacks = parse(path)
    total = sum(c for _, c in stacks) or 1
    self_by: Counter[str] = Counter()
    incl_by: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    for frames, count in stacks:
        if frames and frames[0][1].startswith(("thread", "process")):
            threads[frames[0][1]] += count
            frames = frames[1:]
        # py-spy's raw format lists the outermost frame first.
        leaf = None
        for file, func in reversed(frames):
            leaf = component(file, func)
            if leaf:
                break
        self_by[leaf or "other (stdlib/C)"] += count
        for comp in {component(file, func) for file, func in frames} - {None}:
            incl_by[comp or ""] += count
        if frames:
            file, func = frames[-1]
            self_fn[f"{short(file)}:{func}"] += count
        for name in {f"{short(file)}:{func}" for file, func in frames}:
            incl_fn[name] += count

    def table(title: str, counter: Counter[str], n: int) -> list[str]:
        rows = [f"{title}"]
        rows += [f"  {c / total * 100:5.1f} %  {name}" for name, c in counter.most_common(n)]
        return rows

    out = [f"{path}: {total} samples"]
    out += table("by component, self:", self_by, 30)
    out += table("by component, inclusive:", incl_by, 30)
    if threads:
        out += table("by thread:", threads, 15)
    out += table("hottest functions, self:", self_fn, top)
    service = Counter({k: v for k, v in incl_fn.items()
                       if k.split("/", 1)[0] in ("saga", "api", "messaging", "persistence",
                                                 "aigen")})
    out += table("service functions, inclusive:", service, top)
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarize(args.profile, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
