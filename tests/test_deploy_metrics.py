"""Prometheus and Grafana files: every metric the dashboard and the alerts query exists in
stead/metrics.py (or is one of the Temporal SDK's), the dashboard uses the provisioned
datasource, and promtool passes the configs and the alert rules' unit tests (and fails a broken
copy).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from unittest.mock import patch

import pytest
import yaml
from temporalio.runtime import PrometheusConfig, TelemetryConfig

import stead.telemetry
from stead.metrics import REGISTRY
from tests.deploy_support import (
    GRAFANA,
    K8S,
    PROMETHEUS,
    Doc,
    kustomization,
    resources,
    run,
    workloads,
)

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
    assert discovery["namespaces"]["names"] == [kustomization(K8S / "base")["namespace"]]
    keep = job["relabel_configs"][0]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert (keep["action"], keep["regex"]) == ("keep", "true")
    for obj, pod in workloads(resources()):
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
