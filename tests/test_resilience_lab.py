"""Resilience through the node agents in the lab: retries, per-try timeouts, outlier ejection,
the request breaker, local rate limits and fault injection, each configured by objects in
the lab's config directory and checked with real clients in a pod (the test app's
``fail``/``pod``/``status``/``delay`` knobs; grpcio for the gRPC status codes).

Every Service selects the four test-app pods on both nodes, so requests cross the mTLS
tunnel as well. The behaviour does not depend on the capture backend (the drivers run
after capture), so one iptables lab serves the module; tests/test_l7_lab.py runs L7 over
every backend.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meshlab import mesh
from tests.conftest import require_root, unique_lab_name, wait_for
from tests.test_mesh_l4 import metric_sum

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

CLIENT_POD = "node1/pod-1"
RETRY, OUTLIER, BREAKER, LIMITED, FAULTY, DELAYED, PERTRY = (f"198.19.1.{i}" for i in range(10, 17))
GRPC_FAULTY, GRPC_LIMITED = "198.19.1.20", "198.19.1.21"
CHECKED = "198.19.1.22"
BUDGET, CONN_LIMITED, TCP_CHECKED = "198.19.1.23", "198.19.1.24", "198.19.1.25"

# requests in threads from one pod: spec JSON in argv[1]; prints [[status, flags, seconds], ...]
CLIENT = textwrap.dedent("""
    import http.client, json, sys, threading, time
    spec = json.loads(sys.argv[1])
    out, lock = [], threading.Lock()
    def worker(n):
        conn = None
        for _ in range(n):
            if spec.get("until") and time.monotonic() > spec["until"] + t0:
                break
            if conn is None:
                conn = http.client.HTTPConnection(spec["host"], 80, timeout=30)
            t = time.monotonic()
            try:
                conn.request(spec.get("method", "GET"), spec.get("path", "/"), body=spec.get("body"))
                r = conn.getresponse()
                r.read()
                row = [r.status, r.getheader("x-hostmesh-flags") or "", time.monotonic() - t,
                       r.getheader("x-testapp-pod") or ""]
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                row = [0, type(exc).__name__, time.monotonic() - t]
                conn.close()
                conn = None
            if spec.get("fresh") and conn is not None:  # a new connection per request
                conn.close()
                conn = None
            with lock:
                out.append(row)
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(spec["n"],)) for _ in range(spec.get("threads", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"rows": out, "elapsed": time.monotonic() - t0}))
""")

GRPC_CLIENT = textwrap.dedent("""
    import json, sys, grpc
    from meshlab.testapp import echo_pb2 as pb, echo_pb2_grpc as rpc
    spec = json.loads(sys.argv[1])
    stub = rpc.EchoStub(grpc.insecure_channel(spec["target"]))
    out = []
    for i in range(spec["n"]):
        try:
            stub.Echo(pb.EchoRequest(message="m"), timeout=20)
            out.append("OK")
        except grpc.RpcError as exc:
            out.append(exc.code().name)
    print(json.dumps(out))
""")


def svc(name: str, vip: str, grpc: bool = False, tcp: bool = False) -> dict:
    port = ({"name": "grpc", "port": 9090, "targetPort": 9090, "appProtocol": "grpc"} if grpc
            else {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "tcp" if tcp else "http"})
    return mesh.service_document(name, vip, {"app": "testapp"}, [port])


def policy(name: str, spec: dict) -> dict:
    return {"apiVersion": "hostmesh.io/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": name, "namespace": "default"},
            "spec": {"targetRef": {"kind": "Service", "name": name}, **spec}}


def fault(name: str, spec: dict) -> dict:
    return {"apiVersion": "hostmesh.io/v1alpha1", "kind": "FaultInjection",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"targetRef": {"kind": "Service", "name": name}, **spec}}


def documents() -> list[dict]:
    return [
        svc("retry", RETRY), policy("retry", {"retries": {"attempts": 10, "retryOn": ["5xx"],
                                                          "backoff": {"baseInterval": "5ms"}}}),
        svc("pertry", PERTRY), policy("pertry", {"timeout": "10s", "retries": {
            "attempts": 3, "perTryTimeout": "300ms", "retryOn": ["5xx"]}}),
        svc("outlier", OUTLIER), policy("outlier", {"outlierDetection": {
            "consecutive5xxErrors": 2, "baseEjectionTime": "3s", "interval": "1s", "maxEjectionPercent": 50}}),
        svc("breaker", BREAKER), policy("breaker", {"connectionPool": {"maxRequests": 2}}),
        svc("limited", LIMITED), policy("limited", {"rateLimit": {"requestsPerUnit": 10, "unit": "second"}}),
        svc("faulty", FAULTY), fault("faulty", {"abort": {"percentage": 30, "httpStatus": 503}}),
        svc("delayed", DELAYED), fault("delayed", {"delay": {"percentage": 100, "fixedDelay": "200ms"}}),
        svc("grpc-faulty", GRPC_FAULTY, grpc=True),
        fault("grpc-faulty", {"abort": {"percentage": 100, "grpcStatus": 14}}),
        svc("grpc-limited", GRPC_LIMITED, grpc=True),
        policy("grpc-limited", {"rateLimit": {"requestsPerUnit": 5, "unit": "minute"}}),
        svc("checked", CHECKED), policy("checked", {"healthCheck": {
            "http": {"path": "/?pod=pod-2&status=503"}, "interval": "500ms", "timeout": "300ms", "jitter": "0s",
            "unhealthyThreshold": 2, "healthyThreshold": 1}}),
        svc("budget", BUDGET), policy("budget", {"retries": {
            "attempts": 10, "retryOn": ["5xx"], "backoff": {"baseInterval": "1ms", "maxInterval": "2ms"},
            "budget": {"percent": 20, "minRetryConcurrency": 0}}}),
        svc("conn-limited", CONN_LIMITED, tcp=True),
        policy("conn-limited", {"connectionRateLimit": {"connectionsPerUnit": 4, "unit": "minute"}}),
        # relayed as TCP, probed over HTTP (the port speaks it underneath): both pod-2s fail
        svc("tcp-checked", TCP_CHECKED, tcp=True), policy("tcp-checked", {"healthCheck": {
            "http": {"path": "/?pod=pod-2&status=503"}, "interval": "500ms", "timeout": "300ms", "jitter": "0s",
            "unhealthyThreshold": 2, "healthyThreshold": 1}}),
    ]


@pytest.fixture(scope="module")
def rlab():
    require_root("the resilience lab")
    from meshlab.lab import Lab
    lab = Lab(unique_lab_name())
    lab.capture = "iptables"
    lab.log_requests = True  # the upstream's own count of requests (upstream_requests)
    try:
        lab.up(2, 2, capture="iptables")
        mesh.write_config(lab, "resilience.yaml", documents())

        def in_force(node: str) -> bool:
            clusters = json.loads(mesh.admin_get(lab, node, "/clusters").stdout or "[]")
            return sum(1 for c in clusters if c["vip"].startswith("198.19.1.")) == 13
        wait_for(lambda: all(in_force(n) for n in ("node1", "node2")), timeout=30, what="the resilience config")
        yield lab
    finally:
        lab.down()


def http(lab, host: str, n: int, **spec) -> dict:
    r = lab.run(CLIENT_POD, [sys.executable, "-c", CLIENT, json.dumps({"host": host, "n": n, **spec})], timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def grpc_codes(lab, vip: str, n: int) -> list[str]:
    repo = str(Path(__file__).resolve().parent.parent)
    r = lab.run(CLIENT_POD, [sys.executable, "-c", f"import sys; sys.path.insert(0, {repo!r})\n" + GRPC_CLIENT,
                             json.dumps({"target": f"{vip}:9090", "n": n})], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def clusters(lab, node: str, name: str) -> dict:
    for c in json.loads(mesh.admin_get(lab, node, "/clusters").stdout):
        if c["service"].startswith(name + "."):
            return c
    raise AssertionError(f"no cluster {name}")


def metric(lab, node: str, name: str, **labels) -> float:
    return metric_sum(lab, node, name, **labels)


def upstream_requests(lab, tag: str) -> int:
    """Requests whose target carries ``tag``, as the test-app pods logged them (every pod)."""
    logs = Path(lab.names.run_dir, "logs").glob("app-*.log")
    return sum(line.count(tag) for f in logs for line in f.read_text(errors="replace").splitlines())


# ------------------------------------------------------------------ retries
def test_retries_turn_a_half_failing_upstream_into_over_99_percent_success(rlab):
    rows = http(rlab, RETRY, 300, path="/?fail=0.5&status=503")["rows"]
    ok = sum(1 for r in rows if r[0] == 200)
    assert ok >= 297, f"{ok} of 300 succeeded"
    assert metric(rlab, "node1", "hostmesh_destination_retries_total", destination_service_name="retry") > 100


def test_a_post_is_not_retried_by_default(rlab):
    rows = http(rlab, RETRY, 100, path="/?fail=0.5&status=503", method="POST", body="x")["rows"]
    failed = sum(1 for r in rows if r[0] == 503)
    assert 25 <= failed <= 75, failed


def test_the_retry_budget_caps_retries_under_a_fully_failing_upstream_counted_at_the_upstream(rlab):
    """20 clients against an upstream that always fails (each try 100 ms), 10 attempts each:
    unbudgeted that is 11 tries per request; the budget (20 % of the requests in flight, no
    minimum) keeps retries to about a fifth of what the pods receive."""
    tag = f"budget-{time.monotonic_ns()}"
    rows = http(rlab, BUDGET, 4, threads=20, path=f"/?{tag}&status=503&delay=0.1")["rows"]
    assert len(rows) == 80 and {r[0] for r in rows} == {503}
    wait_for(lambda: upstream_requests(rlab, tag) >= 80, timeout=5, what="the pods' request logs")
    time.sleep(0.3)
    received = upstream_requests(rlab, tag)
    retries = received - 80
    assert 0 < retries <= 0.3 * received, (received, retries)
    assert metric(rlab, "node1", "hostmesh_destination_retry_overflow_total", destination_service_name="budget") > 0


def test_per_try_timeout_and_retry_recover_a_hanging_endpoint(rlab):
    rows = http(rlab, PERTRY, 20, path="/?pod=pod-2&delay=20")["rows"]
    assert {r[0] for r in rows} == {200}
    assert max(r[2] for r in rows) < 2.5


# ------------------------------------------------------------------ outlier detection
def test_a_5xx_endpoint_is_ejected_then_returns(rlab):
    rows = http(rlab, OUTLIER, 60, path="/?pod=pod-2&status=503")["rows"]
    failed = sum(1 for r in rows if r[0] == 503)
    assert 2 <= failed <= 4, failed  # two consecutive errors per pod-2 endpoint, then no traffic
    assert all(r[0] == 200 for r in rows[-30:])
    c = clusters(rlab, "node1", "outlier")
    ejected = [e for e in c["endpoints"] if e["outlier"]["ejected"]]
    assert len(ejected) == 2 and all(e["workload"].endswith("pod-2") for e in ejected), c
    assert c["resilience"]["outlier"]["ejected"] == 2
    assert metric(rlab, "node1", "hostmesh_destination_ejected_endpoints", destination_service_name="outlier") == 2
    time.sleep(3.5)
    rows = http(rlab, OUTLIER, 8, path="/?pod=pod-2&status=503")["rows"]
    assert any(r[0] == 503 for r in rows)  # back in the rotation after baseEjectionTime


# ------------------------------------------------------------------ breaker, rate limit
def test_the_breaker_answers_503_uo_past_max_requests(rlab):
    rows = http(rlab, BREAKER, 1, threads=6, path="/?delay=1.5")["rows"]
    ok = sum(1 for r in rows if r[0] == 200)
    # never more than maxRequests at once; with worker processes each enforces its share
    # (1 each here), so one gets through when every connection landed on the same worker
    assert 1 <= ok <= 2 and len(rows) == 6, rows
    assert {tuple(r[:2]) for r in rows if r[0] != 200} == {(503, "UO")}


def test_a_10_rps_limit_answers_429_for_the_excess_within_10_percent(rlab):
    # many connections: each worker process enforces its share of the limit (see
    # resilience.py), so the node's rate holds once every worker has a busy connection
    out = http(rlab, LIMITED, 100000, until=4.0, threads=16)
    rows, elapsed = out["rows"], out["elapsed"]
    ok = sum(1 for r in rows if r[0] == 200)
    allowed = 10 + 10 * elapsed  # the burst, then the rate
    assert 0.9 * allowed <= ok <= 1.1 * allowed, (ok, allowed, len(rows))
    assert all(r[1] == "RL" for r in rows if r[0] == 429) and len(rows) - ok > 50


def test_a_connection_rate_limit_resets_tcp_connections_past_it(rlab):
    """A TCP-only Service (appProtocol tcp: relayed, never parsed) limited to 4 connections a
    minute: each worker process holds its share (2 of them: 2 each), so 2 to 4 get through."""
    rows = http(rlab, CONN_LIMITED, 12, fresh=True)["rows"]
    ok = sum(1 for r in rows if r[0] == 200)
    assert 2 <= ok <= 4 and all(r[0] == 0 for r in rows if r[0] != 200), rows
    refused = metric(rlab, "node1", "hostmesh_agent_connections_rejected_total", reason="rate_limited")
    assert refused >= 12 - ok
    assert metric(rlab, "node1", "hostmesh_tcp_connections_opened_total", response_flags="RL",
                  destination_service="conn-limited.default.svc.cluster.local") == refused
    summary = clusters(rlab, "node1", "conn-limited")["resilience"]["connectionRateLimit"]
    assert summary["rateLimited"] == refused and summary["burst"] == 4


# ------------------------------------------------------------------ faults
def test_a_30_percent_abort_lands_within_5_points(rlab):
    rows = http(rlab, FAULTY, 600)["rows"]
    share = sum(1 for r in rows if r[1] == "FI") / len(rows)
    assert 0.25 <= share <= 0.35, share


def test_a_200ms_delay_delays_every_request(rlab):
    rows = http(rlab, DELAYED, 10)["rows"]
    assert {r[0] for r in rows} == {200} and min(r[2] for r in rows) >= 0.2


def test_grpc_gets_the_right_status_codes(rlab):
    assert set(grpc_codes(rlab, GRPC_FAULTY, 3)) == {"UNAVAILABLE"}
    codes = grpc_codes(rlab, GRPC_LIMITED, 8)
    ok = codes.count("OK")  # one connection: its worker's share of the 5 per minute
    assert 1 <= ok <= 5 and codes[:ok] == ["OK"] * ok and set(codes[ok:]) == {"RESOURCE_EXHAUSTED"}, codes


# ------------------------------------------------------------------ active health checks
def test_endpoints_failing_their_health_check_get_no_traffic_on_any_node(rlab):
    """Each node probes its own pods (interval 500 ms, 2 failures): both pod-2s fail and every
    agent learns it through the control plane within interval x threshold plus a push."""
    def failing(node: str) -> set:
        c = clusters(rlab, node, "checked")
        return {e["workload"] for e in c["endpoints"] if e.get("healthCheck") == "failing"}
    wait_for(lambda: all(len(failing(n)) == 2 for n in ("node1", "node2")), timeout=10,
             what="both pod-2 endpoints failing on both agents")
    assert all(w.endswith("pod-2") for w in failing("node1"))
    reported = json.loads(mesh.cp_get(rlab, "/debug/health").stdout)
    # one pod-2 per node, failing for "checked" and "tcp-checked" (below)
    assert sorted(reported) == ["node1", "node2"] and all(len(v) == 2 for v in reported.values()), reported
    rows = http(rlab, CHECKED, 40, path="/?pod=pod-2&status=503")["rows"]
    assert {r[0] for r in rows} == {200}  # pod-2s get nothing
    text = mesh.admin_get(rlab, "node2", "/stats/prometheus").stdout
    assert "\nhostmesh_agent_health_unhealthy_endpoints 2.0" in text


def test_tcp_connections_skip_endpoints_failing_their_health_check(rlab):
    """A TCP-only Service (relayed, never parsed) with a health check: the L4 balancer skips
    the failing pod-2s as the L7 ones do."""
    def failing(node: str) -> set:
        c = clusters(rlab, node, "tcp-checked")
        return {e["workload"] for e in c["endpoints"] if e.get("healthCheck") == "failing"}
    wait_for(lambda: len(failing("node1")) == 2, timeout=10, what="both pod-2 endpoints failing")
    rows = http(rlab, TCP_CHECKED, 24, fresh=True)["rows"]
    pods = {r[3] for r in rows}
    assert {r[0] for r in rows} == {200} and pods == {"pod-1"}, rows  # both nodes' pod-1s
