"""schemathesis against the served OpenAPI document, on both deployments: every check, the
examples, coverage, fuzzing and stateful phases, 0 failures.

A real ``aigen serve`` process is the target (the same uvicorn, middleware and error paths a
client meets). The exceptions to "all checks" are the rules no JSON Schema can state, listed
with their reasons in ``tests/integration/schemathesis.toml``. Bounded: ``MAX_EXAMPLES`` per
operation and phase keeps each mode at about a minute on a 2-core machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.rabbit_fixtures import ServeProcess, spawn_serve

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).with_name("schemathesis.toml")
MAX_EXAMPLES = 50
SUMMARY = re.compile(r"(\d+) generated, (\d+) passed")


def run_schemathesis(serve: ServeProcess, tmp_path: Path) -> str:
    serve.wait_ready()
    st = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [str(st), "--config-file", str(CONFIG), "run", f"{serve.base}/openapi.json",
         "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
         "--max-examples", str(MAX_EXAMPLES), "--seed", "20261201", "--no-color",
         "--report", "junit", "--report-dir", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=600, check=False,
        cwd=tmp_path)  # its example cache (.schemathesis/) stays out of the worktree
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    summary = SUMMARY.search(output)
    assert summary is not None, output[-3000:]
    generated, passed = map(int, summary.groups())
    assert generated == passed and generated > 500, output[-3000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅\s+{phase}", output), (phase, output[-3000:])
    print(f"schemathesis: {generated} cases, all passed")  # shown with -s / in the CI log
    return output


def _stop(serve: ServeProcess) -> None:
    serve.proc.terminate()
    try:
        serve.proc.wait(15)
    except subprocess.TimeoutExpired:
        serve.proc.kill()


def test_schemathesis_embedded_mode(tmp_path: Path) -> None:
    serve = spawn_serve({"AIGEN_DATA_DIR": str(tmp_path / "data"), "AIGEN_AMQP_URL": "",
                         "AIGEN_DATABASE_URL": "", "AIGEN_DEMO_DELAY_S": "0"},
                        str(tmp_path / "serve.log"))
    try:
        run_schemathesis(serve, tmp_path)
    finally:
        _stop(serve)


def test_schemathesis_postgresql_and_rabbitmq(tmp_path: Path, pg_engine: object, pg_url: str,
                                              amqp_url: str) -> None:
    serve = spawn_serve({"AIGEN_DATABASE_URL": pg_url, "AIGEN_AMQP_URL": amqp_url,
                         "AIGEN_DATA_DIR": str(tmp_path / "data"), "AIGEN_DEMO_WORKER": "true",
                         "AIGEN_DEMO_DELAY_S": "0"},
                        str(tmp_path / "serve.log"))
    try:
        run_schemathesis(serve, tmp_path)
    finally:
        _stop(serve)
