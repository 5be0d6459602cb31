"""Loading the deployment artefacts (Dockerfile, compose file, Kubernetes manifests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "k8s"
K8S_BASE = K8S / "base"
K8S_OVERLAY = K8S / "overlays" / "production"
SECRETS_EXAMPLE = K8S_OVERLAY / "secrets.env.example"
WORKFLOW = ROOT / "aigen" / "n8n" / "workflow.json"

# Services of the compose file that run the orchestrator image (configured by AIGEN_* settings);
# the n8n services read AIGEN_IMAGE_* through the workflow's $env instead.
ORCHESTRATOR_SERVICES = ("migrate", "orchestrator")
N8N_SERVICES = ("n8n", "n8n-import")


def compose() -> dict[str, Any]:
    """The compose file as the Compose tooling sees it (anchors and ``<<`` merges resolved)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under deploy/k8s (kustomization files excluded)."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def kustomization(folder: Path) -> dict[str, Any]:
    data = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def env_file_keys(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def dockerfile_env(text: str) -> dict[str, str]:
    """Variables set by ``ENV`` instructions (``KEY=VALUE`` form, with line continuations)."""
    joined = re.sub(r"\\\n", " ", text)
    out: dict[str, str] = {}
    for line in joined.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].upper() == "ENV":
            for item in shlex.split(parts[1]):
                key, _, value = item.partition("=")
                out[key] = value
    return out


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def k8s_env_names(doc: dict[str, Any]) -> set[str]:
    """Names set in a ConfigMap's data or a pod template's ``env`` lists."""
    names: set[str] = set()
    if doc.get("kind") == "ConfigMap":
        names |= set((doc.get("data") or {}).keys())
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        names |= {e["name"] for e in container.get("env", [])}
    return names


def workflow_env_names() -> set[str]:
    """``AIGEN_*`` names the shipped n8n workflow reads (through ``$env``, in its Code nodes)."""
    return set(re.findall(r"\b(AIGEN_[A-Z0-9_]+)\b", WORKFLOW.read_text()))
