"""What the agents expose for dashboards: Istio's label set on the request and TCP series,
no ``*_created`` series, sub-millisecond buckets, the agent internals, and the files under
observability/ (recording rules checked and unit-tested with promtool, the dashboard's
queries naming metrics that exist). tests/test_prometheus_lab.py scrapes a real lab."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.proxy.destinations import Destinations, connection_labels
from nodeagent.proxy.l7.metrics import DURATION_BUCKETS, HTTP_LABEL_NAMES, HttpMetrics, http_labels
from nodeagent.state import Endpoint, NodeSnapshot, Service, ServicePort, Workload
from nodeagent.telemetry import MetricsRegistry, LoopLag, ProxyMetrics
from tests.test_proxy_destinations import ISTIO_TCP_LABELS

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "observability" / "prometheus" / "recording-rules.yaml"
RULES_TEST = ROOT / "observability" / "prometheus" / "recording-rules.test.yaml"
DASHBOARD = ROOT / "observability" / "grafana" / "hostmesh-dashboard.json"
IN_CI = os.environ.get("CI", "").lower() == "true"

# Istio's standard request labels (istio.io/latest/docs/reference/config/metrics)
ISTIO_REQUEST_LABELS = ISTIO_TCP_LABELS | {"response_code", "grpc_response_status"}

NODE = "node-1"
CLIENT = Workload("client-5d8f", "apps", NODE, "198.18.1.5", labels=(("app", "client"), ("version", "v1")))
WEB = Workload("web-a", "shop", NODE, "198.18.1.10", labels=(("app", "web"), ("version", "v2")))
SVC = Service("web", "shop", "198.19.0.10", (ServicePort(80, 8080, name="http"),),
              (Endpoint("198.18.1.10", 8080, NODE, "web-a", "shop"),))
SNAP = NodeSnapshot(NODE, (SVC,), (CLIENT, WEB))


def exposed(registry) -> dict[str, set[str]]:
    """Sample name -> the label names its samples carry, as Prometheus would parse them."""
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def busy_registry() -> MetricsRegistry:
    """An agent-like registry with one TCP connection and one request recorded."""
    registry = MetricsRegistry()
    tcp, http = ProxyMetrics(registry), HttpMetrics(registry)
    labels = connection_labels(SNAP, Destinations(NODE).outbound(SNAP, "198.19.0.10", 80), "198.18.1.5", "source")
    series = tcp.tcp(labels)
    series.opened.inc()
    series.received_bytes.inc(100)
    tcp.rejected("outbound", "connection_limit")
    http.observe(labels._replace(request_protocol="http"), 200, "-", 0.0004, 10, 20)
    return registry


# ------------------------------------------------------------------ labels
def test_request_and_tcp_series_carry_exactly_istios_label_names():
    names = exposed(busy_registry())
    assert set(HTTP_LABEL_NAMES) == ISTIO_REQUEST_LABELS and len(HTTP_LABEL_NAMES) == len(ISTIO_REQUEST_LABELS)
    assert names["hostmesh_requests_total"] == ISTIO_REQUEST_LABELS
    assert names["hostmesh_request_duration_seconds_bucket"] == ISTIO_REQUEST_LABELS | {"le"}
    for metric in ("opened", "closed"):  # closed has no sample yet
        assert names.get(f"hostmesh_tcp_connections_{metric}_total", ISTIO_TCP_LABELS) == ISTIO_TCP_LABELS
    assert names["hostmesh_tcp_received_bytes_total"] == ISTIO_TCP_LABELS


def test_label_values_come_from_the_workloads():
    text = generate_latest(busy_registry()).decode()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("hostmesh_requests_total{")]
    for want in ('source_app="client"', 'source_version="v1"', 'source_canonical_service="client"',
                 'source_canonical_revision="v1"', 'destination_app="web"', 'destination_version="v2"',
                 'destination_service_name="web"', 'destination_service_namespace="shop"',
                 'destination_workload_namespace="shop"', 'source_workload_namespace="apps"',
                 'destination_cluster="Kubernetes"', 'grpc_response_status=""'):
        assert want in line


def test_http_connection_labels_from_the_client_workload():
    labels = http_labels("source", source=CLIENT)
    assert (labels.source_workload, labels.source_workload_namespace, labels.source_app,
            labels.source_canonical_revision, labels.request_protocol) == ("client-5d8f", "apps", "client", "v1", "http")
    by_name = http_labels("source", "client-5d8f", "apps")  # name and namespace only
    assert (by_name.source_canonical_service, by_name.source_app) == ("client-5d8f", "unknown")


def test_grpc_status_is_a_label_of_its_own_series():
    registry = MetricsRegistry()
    http = HttpMetrics(registry)
    labels = http_labels("source")._replace(request_protocol="grpc")
    http.observe(labels, 200, "-", 0.001, 5, 5, grpc_status="14")
    http.observe(labels, 200, "-", 0.001, 5, 5, grpc_status="0")
    text = generate_latest(registry).decode()
    assert text.count('grpc_response_status="14"') == text.count('grpc_response_status="0"') > 0


def test_no_address_or_path_becomes_a_label_value():
    registry = MetricsRegistry()
    tcp = ProxyMetrics(registry)
    from nodeagent.proxy.destinations import Passthrough
    tcp.tcp(connection_labels(SNAP, Passthrough("203.0.113.7", 443), "203.0.113.99", "source")).opened.inc()
    text = generate_latest(registry).decode()
    assert "203.0.113" not in text


# ------------------------------------------------------------------ _created, buckets
def test_no_created_series_on_an_agent_registry():
    registry = busy_registry()
    text = generate_latest(registry).decode()
    assert "hostmesh_tcp_connections_opened_total{" in text and "hostmesh_agent_connections_rejected_total{" in text
    assert "_created" not in text


def test_the_agents_registry_has_no_created_series_and_the_internals(tmp_path):
    from nodeagent.agent import Agent
    from tests.test_handoff import agent_boot, free_ports

    agent = Agent(agent_boot(tmp_path, free_ports(3)))
    agent.metrics.config_errors.inc()  # an unlabelled counter: _created from its first sample
    agent.state.apply(NodeSnapshot(node="n1", version="v7"))
    text = generate_latest(agent.registry).decode()
    assert "_created" not in text
    for name in ("hostmesh_agent_event_loop_lag_seconds", "hostmesh_agent_capture_installed",
                 "hostmesh_agent_config_stale_seconds", "hostmesh_agent_snapshot_applied_timestamp_seconds",
                 "hostmesh_agent_capture_verified", "hostmesh_agent_ready"):
        assert f"\n{name} " in text, name
    assert 'hostmesh_agent_snapshot_info{version="v7"} 1.0' in text
    applied = float(re.search(r"\nhostmesh_agent_snapshot_applied_timestamp_seconds (\S+)", text).group(1))
    assert abs(applied - time.time()) < 60
    assert "\nhostmesh_agent_config_stale_seconds 0.0" in text  # a snapshot file is never stale


def test_the_control_planes_registry_has_no_created_series(tmp_path):
    from controlplane.process import ControlPlane

    cp = ControlPlane(str(tmp_path), grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0)
    cp.config_errors.inc()
    cp.metrics.pushes.inc()
    text = generate_latest(cp.registry).decode()
    assert "\nhostmesh_controlplane_config_errors_total 1.0" in text
    assert "_created" not in text


def test_duration_buckets_resolve_sub_millisecond_latency():
    below_1ms = [b for b in DURATION_BUCKETS if b < 0.001]
    assert len(below_1ms) >= 3 and min(DURATION_BUCKETS) <= 0.0001
    assert list(DURATION_BUCKETS) == sorted(set(DURATION_BUCKETS))
    registry = MetricsRegistry()
    http = HttpMetrics(registry)
    http.observe(http_labels("source"), 200, "-", 0.0003, 0, 0)  # 300 µs: in the 0.5 ms bucket, not 0.25
    text = generate_latest(registry).decode()
    assert re.search(r'hostmesh_request_duration_seconds_bucket\{[^}]*le="0.00025"[^}]*\} 0\.0', text)
    assert re.search(r'hostmesh_request_duration_seconds_bucket\{[^}]*le="0.0005"[^}]*\} 1\.0', text)


# ------------------------------------------------------------------ event-loop lag
def test_loop_lag_reports_how_late_its_timer_ran():
    registry = MetricsRegistry()
    lag = LoopLag(registry, interval=0.02, window=10.0)

    async def main():
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # a blocking call on the loop
        await asyncio.sleep(0.05)
        task.cancel()
    asyncio.run(main())
    value = float(re.search(r"\nhostmesh_agent_event_loop_lag_seconds (\S+)", generate_latest(registry).decode()).group(1))
    assert 0.15 <= value < 1.0


def test_loop_lag_forgets_a_spike_after_a_window():
    lag = LoopLag(MetricsRegistry(), interval=1.0, window=4.0)  # half-windows of 2 ticks
    lag.observe(0.5)
    assert lag.value() == 0.5
    for _ in range(2):
        lag.observe(0.001)
    assert lag.value() == 0.5  # kept as the previous half-window's worst
    lag.observe(0.001)
    lag.observe(0.001)
    assert lag.value() == 0.001


# ------------------------------------------------------------------ observability/
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        msg = "promtool not installed (Debian package prometheus: ./quickstart install)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def test_recording_rules_pass_promtool_check():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_recording_rules_unit_tests_pass():
    r = subprocess.run([promtool(), "test", "rules", RULES_TEST.name], capture_output=True, text=True, timeout=60,
                       cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_recording_rules_map_every_duration_bucket_to_milliseconds():
    from prometheus_client.utils import floatToGoString
    mapped = {}
    for rule in rules():
        if rule["record"] != "istio_request_duration_milliseconds_bucket":
            continue
        m = re.fullmatch(r'hostmesh_request_duration_seconds_bucket\{le=~?"([^"]+)"\}', rule["expr"])
        assert m, rule
        mapped[m.group(1)] = rule["labels"]["le"]
    for bound in DURATION_BUCKETS:
        exposed_le = floatToGoString(bound)
        (ms,) = [v for pattern, v in mapped.items()
                 if pattern != "+Inf" and re.fullmatch(pattern.replace("\\\\", "\\"), exposed_le)]
        assert float(ms) == pytest.approx(bound * 1000), (bound, ms)
        # Prometheus 3 writes le="1" as "1.0": both forms match
        if exposed_le.endswith(".0"):
            assert any(p != "+Inf" and re.fullmatch(p.replace("\\\\", "\\"), exposed_le[:-2]) for p in mapped)
    assert mapped["+Inf"] == "+Inf" and len(mapped) == len(DURATION_BUCKETS) + 1


def test_recording_rules_cover_istios_standard_metrics():
    recorded = {rule["record"] for rule in rules()}
    assert recorded == {
        "istio_requests_total", "istio_request_duration_milliseconds_bucket",
        "istio_request_duration_milliseconds_sum", "istio_request_duration_milliseconds_count",
        "istio_request_bytes_bucket", "istio_request_bytes_sum", "istio_request_bytes_count",
        "istio_response_bytes_bucket", "istio_response_bytes_sum", "istio_response_bytes_count",
        "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_name_metrics_the_agents_expose():
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    names = {n for e in exprs for n in re.findall(r"\b(hostmesh_[a-z_]+)", e)}
    known = set(exposed(busy_registry())) | {
        "hostmesh_tcp_connections_closed_total", "hostmesh_tcp_sent_bytes_total",
        "hostmesh_agent_connections_terminated_total", "hostmesh_agent_tcp_connections_active",
        "hostmesh_agent_event_loop_lag_seconds", "hostmesh_agent_config_stale_seconds",
        "hostmesh_agent_snapshot_applied_timestamp_seconds", "hostmesh_agent_certificate_expiry_seconds",
        "hostmesh_agent_capture_installed", "hostmesh_agent_capture_verified", "hostmesh_agent_ready",
        "hostmesh_agent_controlplane_connected", "hostmesh_agent_snapshot_info"}
    assert names <= known, names - known
    text = " ".join(exprs)
    for needed in ("hostmesh_requests_total", 'response_code=~"5.."', "histogram_quantile(0.99",
                   "hostmesh_tcp_sent_bytes_total", "hostmesh_agent_event_loop_lag_seconds"):
        assert needed in text
