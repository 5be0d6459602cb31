"""docker-compose.yml: valid Compose, starts in a working order, keeps its secrets in .env."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
from compose_spec import PyOptions

from tests.conftest import unavailable
from tests.deploy import artefacts as a
from tests.n8n_support.runner import N8N_VERSION

INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}")


def services() -> dict[str, Any]:
    return dict(a.compose()["services"])


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    # compose-spec (Rust compose_spec bindings) parses strictly: unknown keys, wrong types and
    # unknown depends_on conditions raise ValueError.
    parsed = PyOptions(apply_merge=True).from_yaml(a.COMPOSE.read_text())
    parsed.validate()
    assert set(parsed.service_names()) == set(services())


def test_the_validator_rejects_a_broken_file() -> None:
    broken = a.COMPOSE.read_text().replace("healthcheck:", "healthchek:", 1)
    with pytest.raises(ValueError, match="healthchek"):
        PyOptions(apply_merge=True).from_yaml(broken).validate()


def test_depends_on_names_real_services_with_readiness_conditions() -> None:
    svc = services()
    one_shots = {name for name, s in svc.items() if s.get("restart") == "no"}
    assert one_shots == {"migrate", "minio-init", "n8n-import"}
    for name, s in svc.items():
        for dep, cond in (s.get("depends_on") or {}).items():
            assert dep in svc, f"{name} depends on unknown {dep}"
            want = ("service_completed_successfully" if dep in one_shots
                    else "service_healthy")
            assert cond == {"condition": want}, f"{name} -> {dep}"
            assert dep in one_shots or "healthcheck" in svc[dep], f"{dep} has no healthcheck"


def test_the_whole_stack_is_there() -> None:
    svc = services()
    assert svc["orchestrator"]["deploy"]["replicas"] == 2
    assert svc["migrate"]["command"] == ["aigen", "migrate"]
    assert "/health/ready" in " ".join(svc["orchestrator"]["healthcheck"]["test"])
    # n8n at the version the repository tests its workflow with, on its own database.
    for name in a.N8N_SERVICES:
        assert svc[name]["image"] == f"n8nio/n8n:{N8N_VERSION}"
        assert svc[name]["environment"]["DB_POSTGRESDB_DATABASE"] == "n8n"
    importer = svc["n8n-import"]
    script = (a.ROOT / "deploy/compose/n8n-import.sh").read_text()
    for step in ("import:credentials", "import:workflow",
                 "update:workflow --id=AigenGenerateJob --active=true"):
        assert step in script
    assert "./aigen/n8n:/aigen/n8n:ro" in importer["volumes"]
    # The orchestrator declares the topology n8n's trigger needs: n8n comes after it.
    assert svc["n8n"]["depends_on"]["orchestrator"] == {"condition": "service_healthy"}
    assert "mc mb --ignore-existing" in " ".join(svc["minio-init"]["command"])
    assert svc["minio-init"]["environment"]["BUCKET"] == "${STORAGE_BUCKET:-creativeflow-assets}"


def test_rabbitmq_uses_a_real_user_everywhere() -> None:
    svc = services()
    assert svc["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"].startswith("${RABBITMQ_USER")
    url = svc["orchestrator"]["environment"]["AIGEN_AMQP_URL"]
    assert "guest" not in url and url.startswith("amqp://${RABBITMQ_USER")
    assert not [p for p, v in _walk(a.compose()) if "guest" in v]


SECRET_KEY = re.compile(r"PASSWORD|PASS$|SECRET|_KEY$|API_KEYS|ENCRYPTION")


def _walk(node: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in _walk(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in _walk(v, f"{path}[{i}]")]
    return [(path, str(node))]


def test_no_secret_is_written_in_the_compose_file() -> None:
    for path, value in _walk(a.compose()):
        key = path.rsplit(".", 1)[-1]
        if SECRET_KEY.search(key):
            refs = INTERPOLATION.findall(value)
            assert refs and all(mod.startswith(":?") for _, mod in refs), \
                f"{path} = {value!r} must come from .env with ${{VAR:?}}"
        for userinfo in re.findall(r"://([^@/]*)@", INTERPOLATION.sub("${}", value)):
            # user:password in a URL: the password is interpolated, never literal
            _user, sep, password = userinfo.partition(":")
            assert not sep or password == "${}", f"{path}: literal password in {value!r}"


def test_env_example_declares_every_variable_the_compose_file_reads() -> None:
    refs = [ref for _, v in _walk(a.compose()) for ref in INTERPOLATION.findall(v)]
    declared = a.env_file_keys(a.ENV_EXAMPLE)
    assert {name for name, _ in refs} == set(declared)
    required = {name for name, mod in refs if mod.startswith(":?")}
    assert all("CHANGE_ME" in declared[n] for n in required if SECRET_KEY.search(n))
    assert ".env" in (a.ROOT / ".gitignore").read_text().split()


def test_n8n_import_fills_every_placeholder_of_the_shipped_template() -> None:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (n8n needs it too)")
    env = {"RABBITMQ_USER": "aigen", "RABBITMQ_PASSWORD": "rp", "MINIO_ROOT_USER": "mu",
           "MINIO_ROOT_PASSWORD": "mp", "IMAGE_API_KEY": "ik", "PATH": "/usr/bin:/bin"}
    script = str(a.ROOT / "deploy/compose/n8n-credentials.js")
    template = a.ROOT / "aigen/n8n/credentials.template.json"
    out = subprocess.run([str(node), script, str(template)], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "CHANGE_ME" not in out and "example.internal" not in out
    creds = {c["id"]: c for c in json.loads(out)}
    assert set(creds) == {c["id"] for c in json.loads(template.read_text())}
    assert creds["AigenRabbitMQ001"]["data"] | {"username": "aigen", "password": "rp",
                                                 "hostname": "rabbitmq"} == \
        creds["AigenRabbitMQ001"]["data"]
    assert creds["AigenObjStoreS3X"]["data"]["endpoint"] == "http://minio:9000"
    assert creds["AigenImageApiKey"]["data"]["value"] == "Bearer ik"
    missing = subprocess.run([str(node), script, str(template)], env={"PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "RABBITMQ_USER is not set" in missing.stderr
