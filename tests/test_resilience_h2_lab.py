"""Resilience through the node agents in the lab over HTTP/2 and gRPC: the same policies as
tests/test_resilience_lab.py (HTTP/1.1), on Services whose clients speak h2c (curl with
prior knowledge, many streams on one connection) or gRPC (grpcio), and whose upstreams
speak HTTP/2 (appProtocol http2 / grpc).

The test app's knobs: ``fail``/``pod``/``status``/``delay`` in the query for HTTP/2;
for gRPC the request's ``status_code``/``delay_ms`` with the metadata ``x-testapp-pod`` /
``x-testapp-fail`` (applied before any header: a trailers-only answer, the kind a gRPC
retry may replay). Every Service selects the four pods on both nodes (the mTLS tunnel in
between for half of them); one iptables lab serves the module.
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
from tests.test_resilience_lab import clusters, fault, metric, policy

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

CLIENT_POD = "node1/pod-1"
H2_RETRY, H2_PERTRY, H2_OUTLIER, H2_BREAKER, H2_FAULTY, H2_LIMITED = (f"198.19.2.{i}" for i in range(10, 16))
G_RETRY, G_PERTRY, G_OUTLIER, G_BREAKER, G_TIMEOUT = (f"198.19.2.{i}" for i in range(20, 25))
SERVICES = 11
UNAVAILABLE = 14

# gRPC calls from one pod, `threads` at a time: spec JSON in argv[1]; prints [[code, seconds], ...]
GRPC_CLIENT = textwrap.dedent("""
    import json, sys, threading, time, grpc
    from meshlab.testapp import echo_pb2 as pb, echo_pb2_grpc as rpc
    spec = json.loads(sys.argv[1])
    stub = rpc.EchoStub(grpc.insecure_channel(spec["target"]))
    out, lock = [], threading.Lock()
    def worker(n):
        for _ in range(n):
            t = time.monotonic()
            try:
                stub.Echo(pb.EchoRequest(message="m", status_code=spec.get("status", 0),
                                         delay_ms=spec.get("delay_ms", 0)),
                          metadata=[tuple(kv) for kv in spec.get("metadata", [])], timeout=spec.get("timeout", 20))
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                out.append([code, time.monotonic() - t])
    threads = [threading.Thread(target=worker, args=(spec["n"],)) for _ in range(spec.get("threads", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(out))
""")


# GETs on one h2c connection, `parallel` streams at a time: spec JSON in argv[1];
# prints [[status, flags, seconds], ...] (status 0: the stream was reset)
H2_CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    import h2.config, h2.connection, h2.events
    spec = json.loads(sys.argv[1])
    sock = socket.create_connection((spec["host"], 80), timeout=30)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", spec["host"]), (":path", spec["path"])]
    started, answers, out, sent = {}, {}, [], 0
    while len(out) < spec["n"]:
        while sent < spec["n"] and len(started) < spec["parallel"]:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers, end_stream=True)
            started[sid], sent = time.monotonic(), sent + 1
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)
        if not data:
            raise SystemExit("the proxy closed the connection")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                answers[ev.stream_id] = dict((k.decode(), v.decode()) for k, v in ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                h = answers.pop(ev.stream_id, {})
                out.append([int(h.get(":status", 0)), h.get("x-hostmesh-flags", ""),
                            time.monotonic() - started.pop(ev.stream_id)])
    print(json.dumps(out))
""")


def svc(name: str, vip: str, grpc: bool = False) -> dict:
    port = ({"name": "grpc", "port": 9090, "targetPort": 9090, "appProtocol": "grpc"} if grpc
            else {"name": "http2", "port": 80, "targetPort": 8080, "appProtocol": "http2"})
    return mesh.service_document(name, vip, {"app": "testapp"}, [port])


OUTLIER_POLICY = {"outlierDetection": {"consecutive5xxErrors": 2, "baseEjectionTime": "3s", "interval": "1s",
                                       "maxEjectionPercent": 50}}


def documents() -> list[dict]:
    return [
        svc("h2-retry", H2_RETRY), policy("h2-retry", {"retries": {
            "attempts": 10, "retryOn": ["5xx"], "backoff": {"baseInterval": "5ms"}}}),
        svc("h2-pertry", H2_PERTRY), policy("h2-pertry", {"timeout": "10s", "retries": {
            "attempts": 3, "perTryTimeout": "300ms", "retryOn": ["5xx"]}}),
        svc("h2-outlier", H2_OUTLIER), policy("h2-outlier", OUTLIER_POLICY),
        svc("h2-breaker", H2_BREAKER), policy("h2-breaker", {"connectionPool": {"maxRequests": 2}}),
        svc("h2-faulty", H2_FAULTY), fault("h2-faulty", {"abort": {"percentage": 30, "httpStatus": 503}}),
        svc("h2-limited", H2_LIMITED), policy("h2-limited", {"rateLimit": {"requestsPerUnit": 4, "unit": "minute"}}),
        svc("g-retry", G_RETRY, grpc=True), policy("g-retry", {"retries": {
            "attempts": 10, "retryOn": ["unavailable"], "backoff": {"baseInterval": "5ms"}}}),
        svc("g-pertry", G_PERTRY, grpc=True), policy("g-pertry", {"timeout": "10s", "retries": {
            "attempts": 3, "perTryTimeout": "300ms", "retryOn": ["unavailable", "gateway-error"]}}),
        svc("g-outlier", G_OUTLIER, grpc=True), policy("g-outlier", OUTLIER_POLICY),
        svc("g-breaker", G_BREAKER, grpc=True), policy("g-breaker", {"connectionPool": {"maxRequests": 2}}),
        svc("g-timeout", G_TIMEOUT, grpc=True), policy("g-timeout", {"timeout": "300ms"}),
    ]


@pytest.fixture(scope="module")
def hlab():
    require_root("the HTTP/2 and gRPC resilience lab")
    from meshlab.lab import Lab
    lab = Lab(unique_lab_name())
    lab.capture = "iptables"
    lab.log_requests = True
    try:
        lab.up(2, 2, capture="iptables")
        mesh.write_config(lab, "resilience-h2.yaml", documents())

        def in_force(node: str) -> bool:
            clusters = json.loads(mesh.admin_get(lab, node, "/clusters").stdout or "[]")
            return sum(1 for c in clusters if c["vip"].startswith("198.19.2.")) == SERVICES
        wait_for(lambda: all(in_force(n) for n in ("node1", "node2")), timeout=30, what="the resilience config")
        yield lab
    finally:
        lab.down()


def h2(lab, host: str, n: int, query: str = "", parallel: int = 10) -> list[tuple[int, str, float]]:
    """``n`` GETs over one h2c connection (prior knowledge), ``parallel`` streams at a time:
    [(status, x-hostmesh-flags, seconds)] in completion order. (curl 7.88 fails streams
    multiplexed on a prior-knowledge connection before the server's SETTINGS, so the
    client is the h2 package's, as tests/test_l7_http2_proxy.py's.)"""
    spec = {"host": host, "path": "/" + ("?" + query if query else ""), "n": n, "parallel": parallel}
    r = lab.run(CLIENT_POD, [sys.executable, "-c", H2_CLIENT, json.dumps(spec)], timeout=240)
    assert r.returncode == 0, (spec, r.stderr[-3000:])
    rows = [tuple(row) for row in json.loads(r.stdout)]
    assert len(rows) == n, rows
    return rows


def grpc_calls(lab, vip: str, n: int, **spec) -> list[tuple[str, float]]:
    repo = str(Path(__file__).resolve().parent.parent)
    r = lab.run(CLIENT_POD, [sys.executable, "-c", f"import sys; sys.path.insert(0, {repo!r})\n" + GRPC_CLIENT,
                             json.dumps({"target": f"{vip}:9090", "n": n, **spec})], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return [tuple(row) for row in json.loads(r.stdout)]


def assert_ejected_pod_2(lab, name: str) -> None:
    c = clusters(lab, "node1", name)
    ejected = [e for e in c["endpoints"] if e["outlier"]["ejected"]]
    assert len(ejected) == 2 and all(e["workload"].endswith("pod-2") for e in ejected), c
    assert metric(lab, "node1", "hostmesh_destination_ejected_endpoints", destination_service_name=name) == 2


# ------------------------------------------------------------------ HTTP/2
def test_h2_retries_turn_a_half_failing_upstream_into_over_99_percent_success(hlab):
    # 3 streams at a time: the default budget (20 %, at least 3 retries in flight) never binds
    rows = h2(hlab, H2_RETRY, 300, "fail=0.5&status=503", parallel=3)
    ok = sum(1 for r in rows if r[0] == 200)
    assert ok >= 297, f"{ok} of 300 succeeded"
    assert metric(hlab, "node1", "hostmesh_destination_retry_overflow_total", destination_service_name="h2-retry") == 0
    assert metric(hlab, "node1", "hostmesh_destination_retries_total", destination_service_name="h2-retry") > 100


def test_h2_per_try_timeout_and_retry_recover_a_hanging_endpoint(hlab):
    rows = h2(hlab, H2_PERTRY, 20, "pod=pod-2&delay=20", parallel=3)  # within the default budget
    assert {r[0] for r in rows} == {200}, (rows, clusters(hlab, "node1", "h2-pertry"))
    assert max(r[2] for r in rows) < 2.5
    assert metric(hlab, "node1", "hostmesh_destination_retries_total", destination_service_name="h2-pertry",
                  reason="per_try_timeout") > 0


def test_h2_a_5xx_endpoint_is_ejected_then_returns(hlab):
    rows = h2(hlab, H2_OUTLIER, 60, "pod=pod-2&status=503", parallel=1)
    failed = sum(1 for r in rows if r[0] == 503)
    assert 2 <= failed <= 4, failed
    assert all(r[0] == 200 for r in rows[-30:])
    assert_ejected_pod_2(hlab, "h2-outlier")
    time.sleep(3.5)
    assert any(r[0] == 503 for r in h2(hlab, H2_OUTLIER, 8, "pod=pod-2&status=503", parallel=1))


def test_h2_the_breaker_answers_503_uo_past_max_requests_on_one_connection(hlab):
    rows = h2(hlab, H2_BREAKER, 6, "delay=1.5", parallel=6)
    ok = sum(1 for r in rows if r[0] == 200)
    # one connection, so one worker process: its share of maxRequests 2 (1 or 2)
    assert 1 <= ok <= 2, rows
    assert {r[:2] for r in rows if r[0] != 200} == {(503, "UO")}
    assert metric(hlab, "node1", "hostmesh_destination_overflow_total", destination_service_name="h2-breaker") >= 4


def test_h2_a_rate_limit_answers_429_rl_past_the_burst(hlab):
    rows = h2(hlab, H2_LIMITED, 12, parallel=1)
    ok = sum(1 for r in rows if r[0] == 200)
    assert 1 <= ok <= 4 and [r[0] for r in rows[:ok]] == [200] * ok, rows  # its worker's share of 4 a minute
    assert {r[:2] for r in rows[ok:]} == {(429, "RL")}


def test_h2_a_30_percent_abort_lands_within_5_points(hlab):
    rows = h2(hlab, H2_FAULTY, 600, parallel=20)
    share = sum(1 for r in rows if r[1] == "FI") / len(rows)
    assert 0.25 <= share <= 0.35, share
    assert {r[0] for r in rows if r[1] == "FI"} == {503}


# ------------------------------------------------------------------ gRPC
def test_grpc_retries_turn_a_half_unavailable_upstream_into_over_99_percent_success(hlab):
    rows = grpc_calls(hlab, G_RETRY, 200, status=UNAVAILABLE, metadata=[["x-testapp-fail", "0.5"]])
    ok = sum(1 for r in rows if r[0] == "OK")
    assert ok >= 198, f"{ok} of 200 succeeded: {sorted({r[0] for r in rows})}"
    assert metric(hlab, "node1", "hostmesh_destination_retries_total", destination_service_name="g-retry",
                  reason="grpc") > 50


def test_grpc_a_status_not_in_retry_on_is_not_retried(hlab):
    rows = grpc_calls(hlab, G_RETRY, 20, status=13, metadata=[["x-testapp-fail", "0.5"]])  # INTERNAL
    failed = sum(1 for r in rows if r[0] == "INTERNAL")
    assert 2 <= failed <= 18, rows


def test_grpc_per_try_timeout_and_retry_recover_a_hanging_endpoint(hlab):
    rows = grpc_calls(hlab, G_PERTRY, 10, threads=2, delay_ms=20000, metadata=[["x-testapp-pod", "pod-2"]])
    assert {r[0] for r in rows} == {"OK"}, rows
    assert max(r[1] for r in rows) < 2.5


def test_grpc_an_unavailable_endpoint_is_ejected(hlab):
    rows = grpc_calls(hlab, G_OUTLIER, 60, status=UNAVAILABLE, metadata=[["x-testapp-pod", "pod-2"]])
    failed = sum(1 for r in rows if r[0] == "UNAVAILABLE")
    assert 2 <= failed <= 4, failed
    assert all(r[0] == "OK" for r in rows[-30:])
    assert_ejected_pod_2(hlab, "g-outlier")


def test_grpc_the_breaker_answers_unavailable_past_max_requests(hlab):
    rows = grpc_calls(hlab, G_BREAKER, 1, threads=6, delay_ms=1500)
    ok = sum(1 for r in rows if r[0] == "OK")
    assert 1 <= ok <= 2 and {r[0] for r in rows if r[0] != "OK"} == {"UNAVAILABLE"}, rows


def test_grpc_a_route_timeout_answers_deadline_exceeded(hlab):
    rows = grpc_calls(hlab, G_TIMEOUT, 3, delay_ms=5000)
    assert {r[0] for r in rows} == {"DEADLINE_EXCEEDED"} and max(r[1] for r in rows) < 2.0, rows
    rows = grpc_calls(hlab, G_TIMEOUT, 3, delay_ms=5000, timeout=0.1)  # grpc-timeout shortens it
    assert {r[0] for r in rows} == {"DEADLINE_EXCEEDED"} and max(r[1] for r in rows) < 0.25, rows
