"""deploy/k8s, checked without a cluster: validated against Kubernetes' JSON schemas
(kubernetes-validate, when installed), rendered with `kubectl kustomize` (when kubectl is
installed), and checked for probes, resources, non-root pods, pinned images, matching
selectors and placeholder secrets. Each external check also runs once on a deliberately broken
input, to show it can fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.deploy_support import (
    DEPLOY,
    K8S,
    K8S_VERSION,
    OVERLAYS,
    ROOT,
    Doc,
    all_manifests,
    find_kubectl,
    is_pinned,
    kustomization,
    load_settings_from,
    needs_kubectl,
    render_overlays,
    resources,
    run,
    workloads,
    yaml_docs,
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return render_overlays()


def test_manifests_match_the_kubernetes_schema(rendered: dict[str, list[Doc]]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    for doc in all_manifests(rendered):
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")


@pytest.mark.parametrize("typo", ["readinesProbe", "replicas"])
def test_schema_check_can_fail(typo: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    deployment = next(d for d in resources() if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    if typo == "readinesProbe":
        container["readinesProbe"] = container.pop("readinessProbe")
    else:
        deployment["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSION, strict=True)


def test_kustomize_check_can_fail(tmp_path: Path) -> None:
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    assert run([kubectl, "kustomize", tmp_path]).returncode != 0


def test_every_workload_is_probed_limited_and_unprivileged(
    rendered: dict[str, list[Doc]],
) -> None:
    for obj, pod in workloads(all_manifests(rendered)):
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
    api = _container(resources(), "stead-api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "startupProbe"):
        assert "/healthz" not in json.dumps(api[probe]), probe


def test_worker_is_probed_on_its_metrics_port() -> None:
    worker = _container(resources(), "stead-worker")
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["metrics"] == 9464
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe


def _pod_labels(docs: list[Doc]) -> list[tuple[dict[str, str], Doc]]:
    return [(obj["spec"]["template"]["metadata"]["labels"], pod) for obj, pod in workloads(docs)]


def test_hpas_and_pdbs_and_services_point_at_real_pods() -> None:
    docs = resources()
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
        k = kustomization(directory)
        files = [*k.get("resources", []), *(p["path"] for p in k.get("patches", []))]
        files += [e for g in k.get("configMapGenerator", []) for e in g.get("envs", [])]
        for ref in files:
            assert (directory / ref).exists(), f"{directory.name}: {ref}"
            assert "secret" not in Path(ref).name, "secrets are created out of band"


def test_each_overlay_points_at_a_temporal_cluster(rendered: dict[str, list[Doc]]) -> None:
    needs_kubectl(rendered)
    assert set(rendered) == {"self-hosted", "cloud-api-key", "mtls"}
    for name, docs in rendered.items():
        maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        for obj, pod in workloads(docs):
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
    needs_kubectl(rendered)
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
    job = yaml_docs(K8S / "overlays/self-hosted/search-attributes-job.yaml")[0]
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
    for secret in (d for d in resources() if d["kind"] == "Secret"):
        assert "data" not in secret, "base64 data hides what is committed; use stringData"
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value, f"{secret['metadata']['name']}.{key}"
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    for path in [*files, ROOT / "docker-compose.yml", ROOT / ".env.example", ROOT / "Dockerfile"]:
        assert not SECRET_SHAPES.search(path.read_text()), path
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.endswith("="), f".env.example must not carry a value: {line}"


def test_kubernetes_config_is_valid_settings(
    rendered: dict[str, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_kubectl(rendered)
    for name, docs in rendered.items():
        (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
        settings = load_settings_from(config["data"], monkeypatch)
        assert settings.env == "production", name
        assert settings.host == "0.0.0.0", name
        assert not settings.temporal_embedded, name
