"""Every AIGEN_* variable an artefact sets is one the service (or the n8n workflow) reads.

pydantic-settings ignores unknown variables (``extra="ignore"``), so a misspelled
``AIGEN_`` name in a deployment would be silently dropped and the default used instead.
"""

from __future__ import annotations

import pytest

from aigen.settings import Settings
from tests.deploy import artefacts as a

KNOWN = {f"AIGEN_{name.upper()}" for name in Settings.model_fields}


def unknown(names: set[str], known: set[str]) -> list[str]:
    return sorted(n for n in names if n.startswith("AIGEN_") and n not in known)


def orchestrator_names() -> dict[str, set[str]]:
    """Where each artefact sets variables for the orchestrator process."""
    sources = {"Dockerfile": set(a.dockerfile_env(a.DOCKERFILE.read_text()))}
    services = a.compose()["services"]
    for name in a.ORCHESTRATOR_SERVICES:
        sources[f"docker-compose.yml:{name}"] = set(a.compose_env(services[name]))
    for path, doc in a.manifests():
        sources[str(path.relative_to(a.ROOT))] = a.k8s_env_names(doc)
    sources[str(a.SECRETS_EXAMPLE.relative_to(a.ROOT))] = set(a.env_file_keys(a.SECRETS_EXAMPLE))
    return sources


@pytest.mark.parametrize("source", sorted(orchestrator_names()))
def test_orchestrator_variables_are_settings_fields(source: str) -> None:
    names = orchestrator_names()[source]
    assert unknown(names, KNOWN) == [], f"{source} sets variables Settings does not know"


def test_every_source_sets_some_aigen_variable() -> None:
    # Guards the collectors themselves: a parser that found nothing would pass vacuously.
    empty = {s for s, names in orchestrator_names().items()
             if not any(n.startswith("AIGEN_") for n in names)}
    assert empty <= {"deploy/k8s/base/namespace.yaml", "deploy/k8s/base/serviceaccount.yaml",
                     "deploy/k8s/base/service.yaml", "deploy/k8s/base/pdb.yaml",
                     "deploy/k8s/base/hpa.yaml", "deploy/k8s/base/networkpolicy.yaml",
                     "deploy/k8s/base/deployment.yaml"}
    assert "AIGEN_DATABASE_URL" in orchestrator_names()["docker-compose.yml:orchestrator"]
    assert "AIGEN_HTTP_HOST" in orchestrator_names()["Dockerfile"]


def test_secrets_carry_what_a_brokered_deployment_requires() -> None:
    # Without these three the service refuses to start (or falls back to SQLite).
    required = {"AIGEN_DATABASE_URL", "AIGEN_AMQP_URL", "AIGEN_API_KEYS"}
    assert required <= set(a.env_file_keys(a.SECRETS_EXAMPLE))
    env = a.compose_env(a.compose()["services"]["orchestrator"])
    assert required <= set(env)


@pytest.mark.parametrize("service", a.N8N_SERVICES)
def test_n8n_variables_are_read_by_the_workflow(service: str) -> None:
    names = set(a.compose_env(a.compose()["services"][service]))
    workflow = a.workflow_env_names()
    assert workflow, "found no AIGEN_* name in the shipped workflow"
    assert unknown(names, workflow) == []
    assert workflow <= names  # all four model settings are configurable from .env


def test_a_misspelled_variable_is_reported() -> None:
    dockerfile = "FROM x\nENV AIGEN_HTTP_HOST=0.0.0.0 \\\n    AIGEN_DATABSE_URL=postgresql://x\n"
    assert unknown(set(a.dockerfile_env(dockerfile)), KNOWN) == ["AIGEN_DATABSE_URL"]
    deployment = {"kind": "Deployment", "spec": {"template": {"spec": {"containers": [
        {"env": [{"name": "AIGEN_LOG_JSON", "value": "true"},
                 {"name": "AIGEN_AMQP_ULR", "value": "x"}]}]}}}}
    assert unknown(a.k8s_env_names(deployment), KNOWN) == ["AIGEN_AMQP_ULR"]
