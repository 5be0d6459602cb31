"""The command line a newcomer meets: flags, --help, one-line configuration errors and a
port clash that fails first and alone. The CLI runs as a real subprocess, as people run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from aigen.settings import Settings, describe_error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGEN_")}
    env.update({"AIGEN_DATA_DIR": str(tmp_path / "data"), **extra})
    return env


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aigen.cli", *args], env=clean_env(
        tmp_path, **env), capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- settings, in process
@pytest.mark.parametrize(("env", "named", "expected"), [
    ({"AIGEN_HTTP_PORT": "abc"}, "AIGEN_HTTP_PORT", "expected a valid integer"),
    ({"AIGEN_HTTP_PORT": "70000"}, "AIGEN_HTTP_PORT", "less than or equal to 65535"),
    ({"AIGEN_AMQP_URL": "amqp://guest:guest@127.0.0.1/"}, "AIGEN_API_KEYS",
     "must be set when AIGEN_AMQP_URL is set"),
    ({"AIGEN_AMQP_URL": "rabbit.internal:5672"}, "AIGEN_AMQP_URL", "amqp://"),
    ({"AIGEN_DATABASE_URL": "mysql://db/aigen"}, "AIGEN_DATABASE_URL", "postgresql://"),
    ({"AIGEN_BILLING_URL": "billing.internal"}, "AIGEN_BILLING_URL", "http:// or https://"),
    ({"AIGEN_PUBLIC_URL": "ftp://x"}, "AIGEN_PUBLIC_URL", "http:// or https://"),
    ({"AIGEN_LOG_LEVEL": "LOUD"}, "AIGEN_LOG_LEVEL", "DEBUG, INFO"),
    ({"AIGEN_API_KEYS": "admin:k"}, "AIGEN_API_KEYS", "role:key"),
])
def test_a_misconfiguration_is_refused_when_settings_load(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str, expected: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    line = describe_error(caught.value)
    assert "\n" not in line
    assert named in line and expected in line


def test_good_settings_load_and_normalise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGEN_AMQP_URL", "amqps://u:p@rabbit.internal/%2F")
    monkeypatch.setenv("AIGEN_API_KEYS", "service:a,support:b")
    monkeypatch.setenv("AIGEN_LOG_LEVEL", "debug")
    monkeypatch.setenv("AIGEN_DATABASE_URL", "postgresql://aigen@db/aigen")
    settings = Settings()
    assert settings.log_level == "DEBUG" and not settings.embedded
    assert settings.resolved_api_keys() == {"a": "service", "b": "support"}


# ---------------------------------------------------------------- the CLI, as a process
@pytest.mark.parametrize(("env", "named"), [
    ({"AIGEN_HTTP_PORT": "abc"}, "AIGEN_HTTP_PORT"),
    ({"AIGEN_AMQP_URL": "amqp://guest:guest@127.0.0.1/"}, "AIGEN_API_KEYS"),
    ({"AIGEN_DATABASE_URL": "mysql://db/aigen"}, "AIGEN_DATABASE_URL"),
])
def test_the_cli_prints_one_line_and_exits_2_on_a_configuration_error(
        tmp_path: Path, env: dict[str, str], named: str) -> None:
    result = run_cli(tmp_path, "serve", **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aigen: configuration error:") and named in lines[0]
    assert result.stdout == ""


def test_serve_help_lists_the_flags_and_main_settings(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "serve", "--help")
    assert result.returncode == 0
    for word in ("--host", "--port", "AIGEN_HTTP_PORT", "AIGEN_DATABASE_URL", "AIGEN_AMQP_URL",
                 "AIGEN_API_KEYS", "AIGEN_DATA_DIR", "AIGEN_DEMO_DELAY_S"):
        assert word in result.stdout


def test_a_bad_port_flag_is_refused_by_the_parser(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "serve", "--port", "0")
    assert result.returncode == 2 and "expected a port number from 1 to 65535" in result.stderr


@pytest.fixture
def serve_proc(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_port_flag_overrides_the_environment(
        tmp_path: Path, serve_proc: list[subprocess.Popen[str]]) -> None:
    port, env_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aigen.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=clean_env(tmp_path, AIGEN_HTTP_PORT=str(env_port)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    serve_proc.append(proc)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "aigen serve --port did not come up"
            time.sleep(0.2)
    assert response.json() == {"status": "ok"}
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{env_port}/health/live", timeout=1)


def test_a_taken_port_fails_first_with_one_line_and_a_hint(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(tmp_path, "serve", "--port", str(port))
    assert result.returncode == 1
    assert "Listening on" not in result.stdout and "startup complete" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "address already in use" in lines[0]
    assert "--port" in lines[0] and "AIGEN_HTTP_PORT" in lines[0]
    assert not (tmp_path / "data" / "aigen.db").exists(), "nothing may start before the bind"


def test_an_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://aigen:s3cret@127.0.0.1:{free_port()}/aigen"  # nothing listens there
    result = run_cli(tmp_path, "serve", "--port", str(free_port()), AIGEN_DATABASE_URL=url)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot open the database" in lines[0] and "AIGEN_DATABASE_URL" in lines[0]
    assert "s3cret" not in result.stderr + result.stdout
