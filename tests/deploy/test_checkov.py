"""checkov over the Dockerfile, the Kubernetes manifests, and (for secrets) everything else.

checkov pins dozens of packages that clash with the service's own, so it runs from a tool
venv of its own: ``$AIGEN_TOOLS_VENV`` if set, else ``~/.cache/aigen-orchestrator/checkov-<v>``,
created on first use (pip from PyPI, about a minute) and reused afterwards. Offline runs skip
locally; under ``CI=true`` a missing checkov fails the test. checkov has no Compose policies,
so the compose file gets the secrets scan (plus tests/deploy/test_compose.py).

Every skip must carry its reason in the artefact itself (``checkov.io/skipN`` annotations,
``checkov:skip=ID: reason`` comments); a failed check fails the test.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
from tests.deploy import artefacts as a

CHECKOV = "checkov==3.3.30"


def _tools_venv() -> Path:
    configured = os.environ.get("AIGEN_TOOLS_VENV")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "aigen-orchestrator" / CHECKOV.replace("==", "-")


@pytest.fixture(scope="module")
def checkov() -> Path:
    venv = _tools_venv()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be installing it right now
        return _install(venv)


def _install(venv: Path) -> Path:
    exe, done = venv / "bin" / "checkov", venv / ".installed"
    if done.exists() and done.read_text() == CHECKOV and exe.exists():
        return exe
    shutil.rmtree(venv, ignore_errors=True)  # a half-finished earlier install
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", CHECKOV], check=True,
                       capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        unavailable(f"cannot install {CHECKOV} into {venv}: {str(detail)[-500:]}")
    done.write_text(CHECKOV)
    return exe


def run_checkov(exe: Path, framework: str, *targets: str) -> dict[str, Any]:
    args = [str(exe), "--framework", framework, "--skip-download", "--output", "json",
            "--no-fail-on-crash"]
    for target in targets:
        args += ["--directory" if (a.ROOT / target).is_dir() else "--file", target]
    proc = subprocess.run(args, cwd=a.ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"})
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"checkov gave no JSON (rc {proc.returncode}): "
                             f"{proc.stdout[-1000:]} {proc.stderr[-2000:]}") from None
    assert isinstance(report, dict), report
    if "check_type" not in report:  # nothing found at all: checkov prints only the summary
        report = {"check_type": framework, "summary": report,
                  "results": {"failed_checks": [], "skipped_checks": []}}
    assert report["check_type"] == framework, report
    return report


def failures(report: dict[str, Any]) -> list[str]:
    return [f"{c['check_id']} {c['check_name']} at {c['file_path']}:{c['file_line_range']}"
            for c in report["results"]["failed_checks"]]


# The secrets scan is given files one by one: in directory mode it passes over dotfiles and
# *.example files, which are exactly where a real secret could be pasted by mistake.
ARTEFACT_FILES = tuple(sorted(
    ["Dockerfile", ".dockerignore", "docker-compose.yml", ".env.example"]
    + [str(p.relative_to(a.ROOT)) for p in (a.ROOT / "deploy").rglob("*") if p.is_file()]))
SCANS = {
    "dockerfile": ("Dockerfile",),
    "kubernetes": ("deploy/k8s",),
    "secrets": ARTEFACT_FILES,
}


@pytest.mark.parametrize("framework", sorted(SCANS))
def test_checkov_passes_with_every_skip_explained(checkov: Path, framework: str) -> None:
    report = run_checkov(checkov, framework, *SCANS[framework])
    summary = report["summary"]
    assert summary["parsing_errors"] == 0, summary
    assert failures(report) == []
    for check in report["results"]["skipped_checks"]:
        reason = (check["check_result"].get("suppress_comment") or "").strip()
        assert len(reason) > 20, f"{check['check_id']} skipped without a reason"
    if framework != "secrets":  # the secrets scan passes silently when it finds nothing
        assert summary["passed"] > 20, summary


def test_secrets_scan_catches_a_literal_password(checkov: Path, tmp_path: Path) -> None:
    leaked = a.COMPOSE.read_text().replace(
        "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}", "Xk93jsd8fJ2kLq", 1)
    (tmp_path / "docker-compose.yml").write_text(leaked)
    report = run_checkov(checkov, "secrets", str(tmp_path / "docker-compose.yml"))
    assert failures(report), report["summary"]


def test_checkov_catches_a_root_container(checkov: Path, tmp_path: Path) -> None:
    # The scan is not vacuous: the same Dockerfile without USER fails CKV_DOCKER_3.
    text = a.DOCKERFILE.read_text().replace("USER 10001:10001\n", "")
    (tmp_path / "Dockerfile").write_text(text)
    report = run_checkov(checkov, "dockerfile", str(tmp_path / "Dockerfile"))
    assert any("CKV_DOCKER_3" in f for f in failures(report))
