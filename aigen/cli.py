"""``aigen`` command line: serve, migrate, and print the n8n workflow for operators."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from importlib import resources
from typing import Any

from pydantic import ValidationError

from aigen.settings import DEV_API_KEYS, Settings, describe_error

log = logging.getLogger("aigen")

SETTINGS_HELP = """\
main settings (environment variables; the flags above override the first two):
  AIGEN_HTTP_HOST / AIGEN_HTTP_PORT   where the API listens (127.0.0.1 / 8000)
  AIGEN_DATABASE_URL   sqlite:///… or postgresql://… (default: SQLite in AIGEN_DATA_DIR)
  AIGEN_AMQP_URL       RabbitMQ URL; unset: embedded in-process broker and demo worker
  AIGEN_API_KEYS       role:key pairs (service, support); required with AIGEN_AMQP_URL
  AIGEN_DATA_DIR       SQLite file and demo assets (.aigen)
  AIGEN_DEMO_WORKER    run the built-in n8n stand-in (default: on when embedded)
  AIGEN_DEMO_DELAY_S   how long the demo worker "works" on each job (0.5)
  AIGEN_BILLING_URL    external billing service; unset: the built-in ledger
  AIGEN_LOG_LEVEL / AIGEN_LOG_JSON    DEBUG…ERROR (INFO) / JSON log lines (false)
The README's configuration table lists every setting."""


class StartupError(Exception):
    """A problem the operator fixes outside the code; printed as one line."""


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind before anything else starts, so a taken port fails first and alone."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        other = port + 1 if port < 65535 else 8001
        hint = (f"another process has it: stop it, or pick another port with "
                f"`aigen serve --port {other}` or AIGEN_HTTP_PORT={other}"
                if exc.errno == errno.EADDRINUSE else
                "check --host / AIGEN_HTTP_HOST and --port / AIGEN_HTTP_PORT")
        raise StartupError(f"cannot listen on {host}:{port}: {reason} ({hint})") from None
    return sock


@contextlib.contextmanager
def database_errors(settings: Settings) -> Iterator[None]:
    """An unreachable or refusing database at start-up is one line, not a traceback."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except OperationalError as exc:
        url = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise StartupError(f"cannot open the database {url} (AIGEN_DATABASE_URL): "
                           f"{reason}") from None


def serve(settings: Settings) -> int:
    import uvicorn

    from aigen.bootstrap import build
    from saga.input_policy import MAX_HEADER_BYTES, MAX_TARGET_BYTES

    # uvicorn drains on SIGTERM and then re-raises it; with the default action that would kill
    # the process before `runtime.stop()` lets the relay finish its batch. Exit normally instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    sock = listen_socket(settings.http_host, settings.http_port)
    try:
        with database_errors(settings):
            runtime = build(settings)
    except StartupError:
        sock.close()
        raise
    if settings.embedded:
        print("aigen-orchestrator (embedded mode: SQLite at "
              f"{settings.resolved_database_url}, in-process broker"
              f"{', demo worker' if settings.run_demo_worker else ''})", flush=True)
        if not settings.api_keys:
            print("Development API keys (set AIGEN_API_KEYS to replace them):", flush=True)
            for pair in DEV_API_KEYS.split(","):
                role, _, key = pair.partition(":")
                print(f"  {role:8} {key}", flush=True)
    runtime.start()
    # Everything built so far (modules, the app, SQLAlchemy's and pydantic's structures, about
    # 10^5 objects) lives as long as the process: move it out of the collector's sight. Each
    # full collection otherwise walks all of it again, and the load's garbage triggers one
    # every few thousand requests (measured: a fifth of the API's CPU per request).
    # Garbage made before this point is collected first, so nothing collectable is frozen.
    gc.collect()
    gc.freeze()
    base = f"http://{settings.http_host}:{settings.http_port}"
    print(f"Listening on {base}  (API docs: {base}/docs)", flush=True)
    print(f"Support console: {base}/console/  (sign in with the support API key)", flush=True)
    config = uvicorn.Config(runtime.app, host=settings.http_host, port=settings.http_port,
                            log_level=settings.log_level.lower(), access_log=False,
                            log_config=None,  # uvicorn logs through our structlog handler
                            timeout_graceful_shutdown=5,
                            timeout_keep_alive=settings.http_keepalive_s,
                            # Header and request-line limits: the edge middleware answers
                            # 431/414 exactly (api.app). uvicorn keeps its httptools parser,
                            # which has no buffer limit of its own: h11 costs about 15-25%
                            # more CPU per request here (measured, see docs/input-rules.md).
                            # Only if uvicorn falls back to h11 does this bound its buffer.
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES + MAX_TARGET_BYTES)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    finally:
        runtime.stop()
        sock.close()
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {value!r}")
    return number


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="aigen", description="CreativeFlow's AI generation orchestrator: serve, migrate, "
        "and print the n8n workflow for operators. `aigen serve --help` lists the settings.")
    sub = main_parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser(
        "serve", help="run the API, result consumer, outbox relay and sweeper",
        description="Run the API, result consumer, outbox relay and deadline sweeper.\n"
                    "Without AIGEN_AMQP_URL it runs the embedded default: SQLite, an\n"
                    "in-process broker and the demo worker.",
        epilog=SETTINGS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_parser.add_argument("--host", help="interface to listen on (AIGEN_HTTP_HOST, "
                              "default 127.0.0.1)")
    serve_parser.add_argument("--port", type=port, help="port to listen on (AIGEN_HTTP_PORT, "
                              "default 8000)")
    sub.add_parser("migrate", help="bring the database schema up to date",
                   epilog=SETTINGS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    n8n = sub.add_parser("n8n-workflow", help="print the n8n workflow or credential template")
    n8n.add_argument("--credentials", action="store_true",
                     help="print the credential template instead of the workflow")
    return main_parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    if args.command == "n8n-workflow":
        name = "credentials.template.json" if args.credentials else "workflow.json"
        sys.stdout.write(resources.files("aigen").joinpath("n8n", name).read_text())
        return 0

    overrides: dict[str, Any] = {}
    if getattr(args, "host", None):
        overrides["http_host"] = args.host
    if getattr(args, "port", None):
        overrides["http_port"] = args.port
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"aigen: configuration error: {describe_error(exc)}", file=sys.stderr)
        return 2
    from aigen.logging import configure

    configure(settings.log_level, settings.log_json)
    try:
        if args.command == "migrate":
            from persistence.db import migrate

            with database_errors(settings):
                migrate(settings.resolved_database_url)
            print("schema is up to date")
            return 0
        return serve(settings)
    except StartupError as exc:
        print(f"aigen: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
