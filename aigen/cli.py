"""``aigen`` command line: serve, migrate, and print the n8n workflow for operators."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from importlib import resources

from aigen.settings import DEV_API_KEYS, Settings

log = logging.getLogger("aigen")


def serve(settings: Settings) -> int:
    import uvicorn

    from aigen.bootstrap import build

    # uvicorn drains on SIGTERM and then re-raises it; with the default action that would kill
    # the process before `runtime.stop()` lets the relay finish its batch. Exit normally instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    runtime = build(settings)
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
    print(f"Listening on http://{settings.http_host}:{settings.http_port}", flush=True)
    try:
        uvicorn.run(runtime.app, host=settings.http_host, port=settings.http_port,
                    log_level=settings.log_level.lower(), access_log=False,
                    timeout_graceful_shutdown=5,
                    timeout_keep_alive=settings.http_keepalive_s)
    finally:
        runtime.stop()
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aigen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the API, result consumer, outbox relay and sweeper")
    sub.add_parser("migrate", help="bring the database schema up to date")
    n8n = sub.add_parser("n8n-workflow", help="print the n8n workflow or credential template")
    n8n.add_argument("--credentials", action="store_true",
                     help="print the credential template instead of the workflow")
    args = parser.parse_args(argv)

    if args.command == "n8n-workflow":
        name = "credentials.template.json" if args.credentials else "workflow.json"
        sys.stdout.write(resources.files("aigen").joinpath("n8n", name).read_text())
        return 0

    settings = Settings()
    from aigen.logging import configure

    configure(settings.log_level, settings.log_json)
    if args.command == "migrate":
        from persistence.db import migrate

        migrate(settings.resolved_database_url)
        print("schema is up to date")
        return 0
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
