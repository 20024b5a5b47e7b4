"""A real Prometheus scrapes the lab's agents: the request rate, error ratio and p99 a test
client generated come back from PromQL, over the hostmesh_* series and over the istio_*
ones the recording rules (observability/prometheus/recording-rules.yaml) make of them.

Prometheus (Debian's ``prometheus`` package) runs in the lab's control-plane namespace
(198.18.0.2) on a free port, with a generated scrape config (every second) naming each
agent's health endpoint (``admin.healthAddress`` on the node's fabric address, port 15020);
queries go over HTTP from that namespace too. Nothing leaves the lab. node1's agent runs the
proxy in its own process, node2's with two worker processes (merged metrics), so both
expositions are checked for ``*_created`` series.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from meshlab import mesh, naming
from meshlab.lab import CONTROLPLANE
from tests.conftest import require_root, unique_lab_name, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "observability" / "prometheus" / "recording-rules.yaml"
DASHBOARD = ROOT / "observability" / "grafana" / "hostmesh-dashboard.json"
CLIENT_POD = "node1/pod-1"
SERVICE = f"{mesh.DEFAULT_SERVICE_NAME}.default.svc.cluster.local"
HEALTH_PORT = 15020
WORKERS = {"node1": 1, "node2": 2}
N, RATE = 200, 20.0  # requests, per second: 10 s of load
SEL = f'reporter="source",destination_service="{SERVICE}"'

# paced requests on one keep-alive connection: every 5th answered 503, every 20th (offset
# 1) delayed 300 ms; prints the wall-clock start and end and [status, seconds] per request
CLIENT = textwrap.dedent("""
    import http.client, json, sys, time
    spec = json.loads(sys.argv[1])
    conn = http.client.HTTPConnection(spec["host"], 80, timeout=10)
    rows, t0 = [], time.time()
    for i in range(spec["n"]):
        wait = t0 + i / spec["rate"] - time.time()
        if wait > 0:
            time.sleep(wait)
        path = "/?status=503" if i % 5 == 0 else "/?delay=0.3" if i % 20 == 1 else "/"
        t = time.monotonic()
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        rows.append([r.status, time.monotonic() - t])
    print(json.dumps({"start": t0, "end": time.time(), "rows": rows}))
""")


def labelled_workloads(lab) -> list[dict]:
    """The lab's Workloads with Istio's version label (app=testapp is there already)."""
    docs = mesh.workload_documents(lab)
    for d in docs:
        d["metadata"]["labels"]["version"] = "v1"
    return docs


def start_agent(lab, node: str) -> subprocess.Popen:
    """The lab's agent, plus the read-only health endpoint on the node's fabric address."""
    cfg = mesh.agent_bootstrap(lab, node, "iptables")
    doc = yaml.safe_load(cfg.read_text())
    doc["admin"]["healthAddress"] = f"{naming.node_ip(naming.node_index(node))}:{HEALTH_PORT}"
    doc["workers"] = WORKERS[node]
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return lab.spawn(lab.target(node), [sys.executable, "-m", "hostmesh.cli", "agent", "--config", str(cfg)],
                     f"agent-{node}")


def free_port(lab) -> int:
    r = lab.run(CONTROLPLANE, [sys.executable, "-c", "import socket; s = socket.socket(); "
                               f"s.bind(({naming.CONTROLPLANE_IP!r}, 0)); print(s.getsockname()[1])"])
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def start_prometheus(lab, workdir: Path, port: int) -> subprocess.Popen:
    targets = [f"{naming.node_ip(naming.node_index(n))}:{HEALTH_PORT}" for n in lab.topology()]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "hostmesh-agents", "metrics_path": "/stats/prometheus",
                            "static_configs": [{"targets": targets}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [shutil.which("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={naming.CONTROLPLANE_IP}:{port}",
            "--log.level=warn"]
    return lab.spawn(lab.target(CONTROLPLANE), argv, "prometheus")


class Prom:
    """PromQL over HTTP, from inside the lab's control-plane namespace."""

    def __init__(self, lab, port: int) -> None:
        self.lab, self.url = lab, f"http://{naming.CONTROLPLANE_IP}:{port}"

    def get(self, path: str, **params) -> subprocess.CompletedProcess:
        argv = ["curl", "-sS", "--max-time", "5", "--get"]
        for k, v in params.items():
            argv += ["--data-urlencode", f"{k}={v}"]
        return self.lab.run(CONTROLPLANE, argv + [self.url + path], timeout=10)

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        r = self.get("/api/v1/query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))
        assert r.returncode == 0, r.stderr
        body = json.loads(r.stdout)
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def count(self, expr: str) -> float:
        """An instant sum (0 while no series matches)."""
        result = self.query(f"sum({expr})")
        return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def plab(tmp_path_factory):
    require_root("the Prometheus lab")
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package prometheus: ./quickstart install)")
    from meshlab.lab import Lab
    lab = Lab(unique_lab_name())
    prom_proc = None
    try:
        lab.up(2, 2)
        mesh.write_default_config(lab)
        mesh.write_config(lab, "workloads.yaml", labelled_workloads(lab))
        mesh.start_controlplane(lab)
        for node, proc in {n: start_agent(lab, n) for n in lab.topology()}.items():
            mesh.wait_ready(lab, node, proc)
        port = free_port(lab)
        prom_proc = start_prometheus(lab, tmp_path_factory.mktemp("prometheus"), port)
        prom = Prom(lab, port)
        wait_for(lambda: prom_proc.poll() is None and prom.get("/-/ready").stdout.startswith("Prometheus"),
                 timeout=20, what="Prometheus ready")
        wait_for(lambda: prom.count('up{job="hostmesh-agents"}') == len(WORKERS), timeout=20,
                 what="every agent scraped")
        yield lab, prom
    finally:
        if prom_proc is not None and prom_proc.poll() is None:
            prom_proc.terminate()
            try:
                prom_proc.wait(10)
            except subprocess.TimeoutExpired:
                prom_proc.kill()
        lab.down()


def run_client(lab, n: int, rate: float) -> dict:
    r = lab.run(CLIENT_POD, [sys.executable, "-c", CLIENT, json.dumps(
        {"host": mesh.DEFAULT_SERVICE_VIP, "n": n, "rate": rate})], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def bucket_of(ms: float, bounds: list[float]) -> tuple[float, float]:
    """The (lower, upper] histogram bucket holding ``ms``."""
    lower = 0.0
    for b in bounds:
        if ms <= b:
            return lower, b
        lower = b
    return lower, math.inf


def test_promql_gives_back_the_rate_errors_and_p99_the_client_generated(plab):
    lab, prom = plab
    total = f'istio_requests_total{{{SEL}}}'
    # warm-up: every series exists (and is scraped) before the measured load starts
    run_client(lab, 4, 20.0)
    wait_for(lambda: prom.count(total) >= 4, timeout=15, what="the warm-up requests in Prometheus")
    time.sleep(3)
    before, before_5xx = prom.count(total), prom.count(f'istio_requests_total{{{SEL},response_code="503"}}')

    load = run_client(lab, N, RATE)
    start, end, rows = load["start"], load["end"], load["rows"]
    errors = sum(1 for status, _ in rows if status == 503)
    assert errors == N // 5 and sum(1 for status, _ in rows if status == 200) == N - errors
    wait_for(lambda: prom.count(total) - before >= N, timeout=15, what="the load in istio_requests_total")

    # exact counts, through the recording rules
    assert prom.count(total) - before == N
    assert prom.count(f'istio_requests_total{{{SEL},response_code="503"}}') - before_5xx == errors
    assert prom.count(f'hostmesh_requests_total{{{SEL}}}') == prom.count(total)

    # request rate while the load ran: RATE per second
    at = end - 1.0
    for name in ("hostmesh_requests_total", "istio_requests_total"):
        rate = prom.value(f'sum(rate({name}{{{SEL}}}[6s]))', at)
        assert rate == pytest.approx(RATE, rel=0.25), (name, rate)

    # error ratio over the load
    window = f"[{math.ceil(end - start) + 2}s]"
    at = end + 2.0
    ratio = prom.value(f'sum(rate(istio_requests_total{{{SEL},response_code=~"5.."}}{window}))'
                       f' / sum(rate(istio_requests_total{{{SEL}}}{window}))', at)
    assert ratio == pytest.approx(errors / N, abs=0.05)

    # p99: in the bucket of the client's own p99, in milliseconds and in seconds alike
    latencies = sorted(seconds for _, seconds in rows)
    client_p99_ms = latencies[math.ceil(0.99 * N) - 1] * 1000
    p99_ms = prom.value(f'histogram_quantile(0.99, sum by (le) (rate('
                        f'istio_request_duration_milliseconds_bucket{{{SEL}}}{window})))', at)
    p99_s = prom.value(f'histogram_quantile(0.99, sum by (le) (rate('
                       f'hostmesh_request_duration_seconds_bucket{{{SEL}}}{window})))', at)
    from nodeagent.proxy.l7.metrics import DURATION_BUCKETS
    lower, upper = bucket_of(client_p99_ms, [b * 1000 for b in DURATION_BUCKETS])
    assert 300 <= client_p99_ms < upper and lower <= p99_ms <= upper, (client_p99_ms, p99_ms)
    # (the recorded series are sampled at rule evaluations, not at scrapes: rate() extrapolates
    # them a little differently)
    assert lower <= p99_s * 1000 <= upper and p99_s * 1000 == pytest.approx(p99_ms, rel=0.05)


def test_the_istio_series_carry_istios_labels_from_the_workloads(plab):
    lab, prom = plab
    run_client(lab, 2, 20.0)
    wait_for(lambda: prom.count('istio_requests_total') > 0, timeout=15, what="istio_requests_total")
    series = prom.query(f'istio_requests_total{{{SEL},destination_app="testapp",destination_version="v1",'
                        f'destination_canonical_service="testapp",destination_canonical_revision="v1",'
                        f'destination_service_name="testapp",destination_service_namespace="default",'
                        f'destination_workload_namespace="default",destination_cluster="Kubernetes"}}')
    assert series
    assert prom.query('istio_tcp_connections_opened_total{source_app="testapp",source_version="v1",'
                      'source_workload_namespace="default",source_canonical_service="testapp"}')
    assert prom.query('istio_request_duration_milliseconds_bucket{le="0.5"}')  # sub-millisecond bucket
    # no address as a label value, anywhere
    assert not prom.query('{job="hostmesh-agents",__name__=~"hostmesh_.*",destination_service=~".*198\\\\.1[89].*"}')


def test_every_agent_exposes_its_internals_and_no_created_series(plab):
    lab, prom = plab
    assert not prom.query('{__name__=~".+_created"}')
    for name in ("hostmesh_agent_event_loop_lag_seconds", "hostmesh_agent_config_stale_seconds",
                 "hostmesh_agent_capture_installed", "hostmesh_agent_snapshot_info",
                 "hostmesh_agent_certificate_expiry_seconds"):
        instances = {r["metric"]["instance"] for r in prom.query(name)}
        assert len(instances) == len(WORKERS), name
    assert prom.count("hostmesh_agent_capture_installed") == len(WORKERS)
    assert prom.count("hostmesh_agent_config_stale_seconds") == 0
    assert all(0 <= float(r["value"][1]) < 0.5 for r in prom.query("hostmesh_agent_event_loop_lag_seconds"))
    assert all(float(r["value"][1]) > 3600 for r in prom.query("hostmesh_agent_certificate_expiry_seconds"))


def test_the_dashboards_queries_run(plab):
    lab, prom = plab
    dash = json.loads(DASHBOARD.read_text())
    values = {"$__rate_interval": "5s", "$reporter": "source", "$namespace": ".*", "$service": ".*",
              "$instance": ".*"}
    answered = 0
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for k, v in values.items():
                expr = expr.replace(k, v)
            answered += bool(prom.query(expr))  # a query error fails in Prom.query
    assert answered >= 10
