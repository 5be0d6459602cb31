"""deploy/k8s: schema-valid manifests with the properties a safe rollout depends on."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy import artefacts as a

# The oldest Kubernetes minor still supported upstream when this was written, and the newest
# schema kubernetes-validate ships: the manifests must hold for both.
K8S_VERSIONS = ("1.31", kubernetes_validate.latest_version())

MANIFESTS = a.manifests()


def by_kind(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in MANIFESTS if doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def pod_spec() -> dict[str, Any]:
    return dict(by_kind("Deployment")["spec"]["template"]["spec"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("index", range(len(MANIFESTS)),
                         ids=[f"{p.name}:{d['kind']}" for p, d in MANIFESTS])
def test_manifest_is_valid_against_the_kubernetes_schema(index: int, version: str) -> None:
    _, doc = MANIFESTS[index]
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_misspelled_field() -> None:
    doc = copy.deepcopy(by_kind("Deployment"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_kustomize_base_lists_every_manifest_and_the_overlay_generates_the_secret() -> None:
    base = a.kustomization(a.K8S_BASE)
    files = {p.name for p, _ in MANIFESTS if p.parent == a.K8S_BASE}
    assert set(base["resources"]) == files
    overlay = a.kustomization(a.K8S_OVERLAY)
    assert overlay["resources"] == ["../../base"]
    [gen] = overlay["secretGenerator"]
    assert gen["name"] == "aigen-orchestrator" and gen["envs"] == ["secrets.env"]
    assert (a.K8S_OVERLAY / ".gitignore").read_text().split() == ["secrets.env"]
    containers = pod_spec()["containers"] + pod_spec()["initContainers"]
    refs = {ref["secretRef"]["name"] for c in containers for ref in c["envFrom"]
            if "secretRef" in ref}
    assert refs == {gen["name"]}


def test_deployment_probes_replicas_and_shutdown() -> None:
    deployment = by_kind("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spec = pod_spec()
    [app] = spec["containers"]
    assert app["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert app["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert app["resources"]["requests"] and app["resources"]["limits"]
    # preStop sleep + the documented drain (README) must fit in the grace period.
    pre_stop = int(app["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pre_stop + 15 <= spec["terminationGracePeriodSeconds"]
    [migrate] = spec["initContainers"]
    assert migrate["command"] == ["aigen", "migrate"]
    assert migrate["image"] == app["image"]


def test_pods_run_non_root_on_a_read_only_root_filesystem() -> None:
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    mounted = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for container in spec["containers"] + spec["initContainers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {m["name"] for m in container["volumeMounts"]} <= mounted
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}


def test_configmap_data_dir_is_on_the_writable_mount() -> None:
    assert by_kind("ConfigMap")["data"]["AIGEN_DATA_DIR"].startswith("/tmp/")


def test_service_pdb_and_hpa_select_the_deployment() -> None:
    labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        doc = by_kind(kind)
        selector = doc["spec"].get("selector") or doc["spec"]["podSelector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind("Deployment")["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    port = by_kind("Service")["spec"]["ports"][0]["targetPort"]
    assert port in {p["name"] for p in pod_spec()["containers"][0]["ports"]}
