"""Install and run a real n8n (pinned) headless for tests, with the shipped workflow active.

Everything follows shared/n8n.md: the pinned version and npm overrides, ``--ignore-scripts``,
the legacy expression engine, PostgreSQL as the database, and import -> activate -> start.
The 1.7 GB install lives outside the repo (``$AIGEN_N8N_HOME`` or
``~/.cache/aigen-orchestrator/n8n``) and is reused; each run gets its own PostgreSQL role and
database and its own user folder, so runs never share state and leave nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pika

N8N_VERSION = "1.123.81"
PACKAGE_JSON: dict[str, Any] = {
    "name": "n8n-peer",
    "private": True,
    "dependencies": {"n8n": N8N_VERSION},
    "overrides": {
        "xlsx": "0.18.5",
        "@langchain/core": "1.1.8",
        "@langchain/langgraph-checkpoint": "1.0.1",
    },
}
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW_PATH = REPO_ROOT / "aigen" / "n8n" / "workflow.json"
CREDENTIALS_TEMPLATE_PATH = REPO_ROOT / "aigen" / "n8n" / "credentials.template.json"
JOBS_QUEUE = "n8n.generation.jobs"


class N8nUnavailable(RuntimeError):
    """n8n is neither installed nor installable here (no node/npm)."""


class N8nStatus(StrEnum):
    INSTALLED = "installed"
    CAN_INSTALL = "can_install"
    UNAVAILABLE = "unavailable"


def n8n_home() -> Path:
    """Install folder: ``$AIGEN_N8N_HOME`` or ``~/.cache/aigen-orchestrator/n8n``."""
    env = os.environ.get("AIGEN_N8N_HOME")
    return Path(env) if env else Path.home() / ".cache" / "aigen-orchestrator" / "n8n"


def n8n_bin(home: Path | None = None) -> Path:
    return (home or n8n_home()) / "node_modules" / ".bin" / "n8n"


def _installed_version(home: Path) -> str | None:
    try:
        meta = json.loads((home / "node_modules" / "n8n" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = meta.get("version")
    return version if isinstance(version, str) else None


def n8n_available(home: Path | None = None) -> N8nStatus:
    """Whether the pinned n8n is installed, could be installed (node + npm), or neither."""
    home = home or n8n_home()
    if n8n_bin(home).exists() and _installed_version(home) == N8N_VERSION:
        return N8nStatus.INSTALLED
    if shutil.which("node") and shutil.which("npm"):
        return N8nStatus.CAN_INSTALL
    return N8nStatus.UNAVAILABLE


def ensure_installed(home: Path | None = None, timeout_s: float = 1200) -> Path:
    """Install the pinned n8n once (about 2 minutes, 1.7 GB) and return the ``n8n`` binary.

    A file lock keeps two concurrent test processes from running npm in the same folder.
    """
    home = home or n8n_home()
    if n8n_available(home) is N8nStatus.INSTALLED:
        return n8n_bin(home)
    if n8n_available(home) is N8nStatus.UNAVAILABLE:
        raise N8nUnavailable("node and npm are needed to install n8n")
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if n8n_available(home) is not N8nStatus.INSTALLED:
            (home / "package.json").write_text(json.dumps(PACKAGE_JSON, indent=2) + "\n")
            with open(home / "install.log", "w") as log:
                subprocess.run(
                    ["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"],
                    cwd=home,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=True,
                    timeout=timeout_s,
                )
        if n8n_available(home) is not N8nStatus.INSTALLED:
            raise N8nUnavailable(f"npm install finished but no n8n {N8N_VERSION} in {home}")
    return n8n_bin(home)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _psql(sql: str, host: str, port: int, user: str) -> None:
    subprocess.run(
        [
            "psql",
            "-h",
            host,
            "-p",
            str(port),
            "-U",
            user,
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            sql,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class PostgresDatabase:
    """A role with a password (n8n refuses passwordless) and a database it owns, per run."""

    host: str = "127.0.0.1"
    port: int = 5432
    admin_user: str = "postgres"
    name: str = field(default_factory=lambda: f"aigen_n8n_{secrets.token_hex(5)}")
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    created: bool = False

    def create(self) -> PostgresDatabase:
        _psql(
            f"CREATE ROLE {self.name} LOGIN PASSWORD '{self.password}'",
            self.host,
            self.port,
            self.admin_user,
        )
        self.created = True
        _psql(
            f"CREATE DATABASE {self.name} OWNER {self.name}", self.host, self.port, self.admin_user
        )
        return self

    def drop(self) -> None:
        if not self.created:
            return
        _psql(
            f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)",
            self.host,
            self.port,
            self.admin_user,
        )
        _psql(f"DROP ROLE IF EXISTS {self.name}", self.host, self.port, self.admin_user)
        self.created = False


@dataclass
class AmqpTarget:
    host: str = "127.0.0.1"
    port: int = 5672
    username: str = "guest"
    password: str = "guest"
    vhost: str = "/"


@dataclass
class N8nConfig:
    """What the credential template and the workflow's ``$env`` variables get in a test run."""

    amqp: AmqpTarget
    s3_endpoint: str
    s3_access_key_id: str
    s3_secret_access_key: str
    image_api_base_url: str
    image_api_key: str
    s3_region: str = "us-east-1"
    image_model: str = "aigen-test-model"
    parallel_messages: int | None = None  # None: as shipped in the workflow
    extra_env: dict[str, str] = field(default_factory=dict)


def fill_credentials(template: list[dict[str, Any]], cfg: N8nConfig) -> list[dict[str, Any]]:
    """The shipped template with test values, keeping ids/names the workflow refers to."""
    values: dict[str, dict[str, Any]] = {
        "rabbitmq": {
            "hostname": cfg.amqp.host,
            "port": cfg.amqp.port,
            "username": cfg.amqp.username,
            "password": cfg.amqp.password,
            "vhost": cfg.amqp.vhost,
            "ssl": False,
        },
        "s3": {
            "endpoint": cfg.s3_endpoint,
            "region": cfg.s3_region,
            "accessKeyId": cfg.s3_access_key_id,
            "secretAccessKey": cfg.s3_secret_access_key,
            "forcePathStyle": True,
            "ignoreSSLIssues": False,
        },
        "httpHeaderAuth": {"name": "Authorization", "value": f"Bearer {cfg.image_api_key}"},
    }
    filled = []
    for cred in template:
        if cred["type"] not in values:
            raise ValueError(f"no test values for credential type {cred['type']!r}")
        filled.append({**cred, "data": {**cred["data"], **values[cred["type"]]}})
    return filled


def prepare_workflow(workflow: dict[str, Any], cfg: N8nConfig) -> dict[str, Any]:
    """The shipped workflow, with the trigger's prefetch overridden when asked."""
    wf: dict[str, Any] = json.loads(json.dumps(workflow))
    if cfg.parallel_messages is not None:
        for node in wf["nodes"]:
            if node["type"] == "n8n-nodes-base.rabbitmqTrigger":
                node["parameters"]["options"]["parallelMessages"] = cfg.parallel_messages
    return wf


class N8nRunner:
    """Runs ``n8n start`` with the shipped workflow active; a context manager.

    ``start()`` returns once RabbitMQ shows n8n's consumer on the jobs queue, i.e. once the
    workflow really consumes; ``stop()`` shuts n8n down and drops its database.
    """

    def __init__(
        self,
        cfg: N8nConfig,
        workflow_path: Path = WORKFLOW_PATH,
        credentials_template_path: Path = CREDENTIALS_TEMPLATE_PATH,
        home: Path | None = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        self.cfg = cfg
        self.workflow_path = workflow_path
        self.credentials_template_path = credentials_template_path
        self.home = home or n8n_home()
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.db = PostgresDatabase()
        self.user_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.workflow_id = ""

    # -- public ------------------------------------------------------------------------------
    def start(self) -> N8nRunner:
        binary = ensure_installed(self.home)
        try:
            self._start(binary)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # n8n waits for running executions (and the RabbitMQ trigger for unacked
            # messages) before exiting; give it a bounded grace period, then kill.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.db.drop()
        if self.user_dir is not None:
            shutil.rmtree(self.user_dir, ignore_errors=True)
            self.user_dir = None

    def __enter__(self) -> N8nRunner:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        if self.user_dir is None:
            raise RuntimeError("n8n runner not started")
        return self.user_dir / "n8n.log"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, RuntimeError):
            return ""

    @property
    def rss_mb(self) -> float | None:
        """Resident memory of the n8n process in MB (Linux /proc), for reporting."""
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    # -- internals ---------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        if self.user_dir is None:
            raise RuntimeError("n8n runner not started")
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "DB_", "AIGEN_IMAGE_"))
        }
        base.update(
            {
                "N8N_USER_FOLDER": str(self.user_dir / "home"),
                "N8N_ENCRYPTION_KEY": "aigen-test-" + self.db.password,
                "DB_TYPE": "postgresdb",
                "DB_POSTGRESDB_HOST": self.db.host,
                "DB_POSTGRESDB_PORT": str(self.db.port),
                "DB_POSTGRESDB_USER": self.db.name,
                "DB_POSTGRESDB_PASSWORD": self.db.password,
                "DB_POSTGRESDB_DATABASE": self.db.name,
                "N8N_PORT": str(self.port),
                "N8N_LISTEN_ADDRESS": "127.0.0.1",
                "N8N_RUNNERS_BROKER_PORT": str(free_port()),
                "N8N_DIAGNOSTICS_ENABLED": "false",
                "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
                "N8N_TEMPLATES_ENABLED": "false",
                "N8N_PERSONALIZATION_ENABLED": "false",
                "N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS": "false",
                "N8N_EXPRESSION_ENGINE": "legacy",
                # the workflow's $env configuration (see docs/n8n.md)
                "AIGEN_IMAGE_API_BASE_URL": self.cfg.image_api_base_url,
                "AIGEN_IMAGE_MODEL": self.cfg.image_model,
            }
        )
        base.update(self.cfg.extra_env)
        return base

    def _cli(self, binary: Path, *args: str) -> str:
        """Run one n8n CLI command; its output goes to the run log (never to a pipe reader
        that could close early: n8n spins on a broken pipe)."""
        result = subprocess.run(
            [str(binary), *args],
            env=self.env(),
            cwd=self.user_dir,
            capture_output=True,
            text=True,
            timeout=300,
        )
        with open(self.log_path, "a") as log:
            log.write(f"$ n8n {' '.join(args)}\n{result.stdout}{result.stderr}\n")
        out = result.stdout + result.stderr
        if result.returncode != 0 or "GOT ERROR" in out or "Error importing" in out:
            raise RuntimeError(f"n8n {' '.join(args)} failed:\n{out[-3000:]}")
        return out

    def _start(self, binary: Path) -> None:
        self.user_dir = Path(tempfile.mkdtemp(prefix="aigen-n8n-"))
        (self.user_dir / "home").mkdir()
        self.port = free_port()
        self.db.create()

        template = json.loads(self.credentials_template_path.read_text())
        creds_file = self.user_dir / "credentials.json"
        creds_file.write_text(json.dumps(fill_credentials(template, self.cfg)))
        workflow = prepare_workflow(json.loads(self.workflow_path.read_text()), self.cfg)
        self.workflow_id = workflow["id"]
        wf_file = self.user_dir / "workflow.json"
        wf_file.write_text(json.dumps(workflow))

        self._cli(binary, "import:credentials", f"--input={creds_file}")
        creds_file.unlink()  # test secrets only, but do not leave them lying around
        self._cli(binary, "import:workflow", f"--input={wf_file}")
        self._cli(binary, "update:workflow", f"--id={self.workflow_id}", "--active=true")

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), "start"],
                env=self.env(),
                cwd=self.user_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() ends n8n and its children
            )
        self._wait_until_consuming()

    def _wait_until_consuming(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        amqp = self.cfg.amqp
        params = pika.ConnectionParameters(
            host=amqp.host,
            port=amqp.port,
            virtual_host=amqp.vhost,
            credentials=pika.PlainCredentials(amqp.username, amqp.password),
        )
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"n8n exited during start-up:\n{self.log_tail()}")
            try:
                with pika.BlockingConnection(params) as conn:
                    ok = conn.channel().queue_declare(queue=JOBS_QUEUE, passive=True)
                    if ok.method.consumer_count > 0 and self._healthy():
                        return
            except pika.exceptions.AMQPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"n8n did not start consuming {JOBS_QUEUE} within {self.start_timeout_s}s:\n"
            f"{self.log_tail()}"
        )

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).is_success
        except httpx.HTTPError:
            return False


@contextlib.contextmanager
def running_n8n(cfg: N8nConfig, **kwargs: Any) -> Iterator[N8nRunner]:
    """``with running_n8n(cfg) as n8n:`` - for pytest fixtures."""
    runner = N8nRunner(cfg, **kwargs)
    with runner:
        yield runner
