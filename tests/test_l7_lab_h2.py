"""L7 over HTTP/2 and gRPC in the lab, with real clients inside a pod, over every capture
variant (tests/conftest.py's ``mesh_lab``: iptables, ebpf, ebpf-accel): an HTTP/2 client on
the h2 library (one connection, several streams in flight), curl --http2-prior-knowledge,
nghttp, h2load (hundreds of concurrent streams, so bursts of concurrent upstream dials on
both nodes) and grpcio (unary, server-, client- and bidi streaming, deadlines) through the
agents. The services, routes and policies are those of tests/test_l7_lab.py (its ``l7lab``
fixture, run again for this module) plus the gRPC ones it defines."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from meshlab import mesh
from tests.test_l7_lab import (ALL_PODS, BIG, CLIENT_POD, GRPC_LB_VIPS, GRPC_LOCAL, GRPC_MIRRORED, GRPC_WEB, LB_VIPS,
                               LOCAL, MIRRORED, WEB, l7lab)  # noqa: F401
from tests.test_mesh_l4 import metric_sum
from tests.conftest import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


# An HTTP/2 prior-knowledge client on the h2 library, each response kept per stream. (nghttp
# prints concurrent bodies to stdout as their DATA frames arrive, so two responses can
# interleave there; curl 7.88's --http2-prior-knowledge cannot reuse a connection for a
# second URL against any h2c server, the test app's own included.) Up to H2_STREAMS streams
# in flight: each needs its own HTTP/1.1 upstream connection, so the agent dials several
# upstreams at once, same-node and cross-node (tunnel) alike.
# Prints [[status, body], ...] in request order.
H2_STREAMS = 16
H2_CLIENT = textwrap.dedent("""
    import json, socket, sys
    import h2.config, h2.connection, h2.events
    spec = json.loads(sys.argv[1])
    sock = socket.create_connection((spec["host"], 80), timeout=60)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    extra = [tuple(h.split(": ", 1)) for h in spec["headers"]]
    order, status, body, ended = [], {}, {}, set()
    while len(ended) < spec["n"]:
        while len(order) < spec["n"] and len(order) - len(ended) < min(spec["streams"], conn.remote_settings.max_concurrent_streams):
            sid = conn.get_next_available_stream_id()
            path = "%s?n=%d" % (spec["path"], len(order))
            conn.send_headers(sid, [(":method", "GET"), (":path", path), (":scheme", "http"),
                                    (":authority", spec["host"])] + extra, end_stream=True)
            order.append(sid)
            body[sid] = b""
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)
        if not data:
            sys.exit("connection closed by the proxy after %d of %d responses" % (len(ended), spec["n"]))
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status[ev.stream_id] = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                body[ev.stream_id] += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended.add(ev.stream_id)
            elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                sys.exit("stream or connection reset: %r" % ev)
        sock.sendall(conn.data_to_send())
    print(json.dumps([[status.get(sid), body[sid].decode(errors="replace")] for sid in order]))
""")


def h2_get(lab, vip: str, n: int, *headers: str, path: str = "/", src: str = CLIENT_POD) -> list[str]:
    """n GETs multiplexed on one HTTP/2 prior-knowledge connection; the answering node/pod of each."""
    spec = {"host": vip, "n": n, "headers": list(headers), "path": path, "streams": H2_STREAMS}
    r = lab.run(src, [sys.executable, "-c", H2_CLIENT, json.dumps(spec)], timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    answers = json.loads(r.stdout)
    assert len(answers) == n and all(st == 200 for st, _ in answers), [a for a in answers if a[0] != 200][:3]
    out = [json.loads(b) for _, b in answers]
    assert all(d["protocol"] == "HTTP/1.1" for d in out)  # translated to the HTTP/1.1 upstream
    return [f"{d['node']}/{d['pod']}" for d in out]


GRPC_CLIENT = textwrap.dedent("""
    import json, sys, grpc
    from meshlab.testapp import echo_pb2 as pb, echo_pb2_grpc as rpc
    spec = json.loads(sys.argv[1])
    ch = grpc.insecure_channel(spec["target"])
    stub = rpc.EchoStub(ch)
    md = list(spec.get("metadata", {}).items())
    out = {"unary": [], "keys": []}
    for i in range(spec["n"]):
        extra = [(spec["vary"], "k%d" % (i % spec["keys"]))] if spec.get("vary") else []
        r = stub.Echo(pb.EchoRequest(message="m%d" % i), metadata=md + extra, timeout=20)
        out["unary"].append("%s/%s" % (r.node, r.pod))
        out["keys"].append(extra[0][1] if extra else "")
    if spec.get("streams"):
        out["server_stream"] = [r.count for r in stub.ServerStream(pb.StreamRequest(message="s", count=5), timeout=20)]
        out["client_stream"] = stub.ClientStream(iter([pb.EchoRequest(message="c")] * 7), timeout=20).count
        out["bidi"] = [r.message for r in stub.Bidi(iter([pb.EchoRequest(message="b%d" % i) for i in range(4)]),
                                                    timeout=20)]
        try:
            stub.Echo(pb.EchoRequest(message="slow", delay_ms=3000), timeout=0.5)
            out["deadline"] = "answered"
        except grpc.RpcError as exc:
            out["deadline"] = exc.code().name
    print(json.dumps(out))
""")


def grpc_calls(lab, vip: str, n: int, *, src: str = CLIENT_POD, **spec) -> dict:
    repo = str(Path(__file__).resolve().parent.parent)
    r = lab.run(src, [sys.executable, "-c", f"import sys; sys.path.insert(0, {repo!r})\n" + GRPC_CLIENT,
                             json.dumps({"target": f"{vip}:9090", "n": n, **spec})], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


# ------------------------------------------------------------------ HTTP/2
def test_h2_canary_split_and_header_routing(l7lab):
    pods = h2_get(l7lab, WEB, 2000)
    v2 = sum(1 for w in pods if w.endswith("pod-2"))
    assert 0.07 <= v2 / len(pods) <= 0.13, f"{v2} of {len(pods)} went to v2"
    assert set(pods) == ALL_PODS
    assert {w.split("/")[1] for w in h2_get(l7lab, WEB, 50, "x-canary: 1")} == {"pod-2"}
    assert metric_sum(l7lab, "node1", "hostmesh_requests_total", request_protocol="http2") >= 2050


def test_h2_mirror_gets_copies_while_the_client_sees_the_primary(l7lab):
    log = Path(l7lab.names.run_dir, "logs", "shadow.log")
    before = log.read_text().count("/h2-mirror-probe") if log.exists() else 0
    assert set(h2_get(l7lab, MIRRORED, 10, path="/h2-mirror-probe")) == {"node1/pod-1"}
    wait_for(lambda: log.read_text().count("/h2-mirror-probe") - before == 10, timeout=20,
             what="10 mirrored copies of HTTP/2 requests at the shadow app")


def check_policy(policy: str, answers: list[str], keys: list[str]) -> None:
    """What each load-balancing policy must show over pods on both nodes."""
    counts = {p: answers.count(p) for p in ALL_PODS}
    if policy == "ROUND_ROBIN":
        assert counts == {p: len(answers) // 4 for p in ALL_PODS}, counts
    elif policy == "RING_HASH":
        by_key: dict[str, set] = {}
        for key, where in zip(keys, answers):
            by_key.setdefault(key, set()).add(where)
        assert all(len(p) == 1 for p in by_key.values()), by_key  # sticky per key
        assert len({next(iter(p)) for p in by_key.values()}) >= 2  # keys spread over pods
    else:  # LEAST_REQUEST, RANDOM: every pod serves a share
        assert all(c >= len(answers) // 16 for c in counts.values()), counts


@pytest.mark.parametrize("policy", sorted(LB_VIPS))
def test_h2_load_balancing_policies(l7lab, policy):
    if policy == "RING_HASH":  # one connection per key: the client's headers are per invocation
        keys = [f"k{i}" for i in range(10) for _ in range(4)]
        answers = [w for i in range(10) for w in h2_get(l7lab, LB_VIPS[policy], 4, f"x-user: k{i}")]
    else:
        keys, answers = [], h2_get(l7lab, LB_VIPS[policy], 200 if policy != "ROUND_ROBIN" else 40)
    check_policy(policy, answers, keys)


def test_h2_prefer_same_node(l7lab):
    for src, node in (("node1/pod-2", "node1"), ("node2/pod-2", "node2")):
        answers = h2_get(l7lab, LOCAL, 20, src=src)
        assert {w.split("/")[0] for w in answers} == {node} and len(set(answers)) == 2


# ------------------------------------------------------------------ curl, nghttp, h2load
def request_counts(lab, by: str, node: str = "node1", **labels: str) -> dict[str, float]:
    """HTTP/2 requests the agent on `node` reported as the source of, summed by label `by`
    (one scrape); tests take before/after differences, so other tests' requests do not count."""
    text = mesh.admin_get(lab, node, "/stats/prometheus").stdout
    want = {"reporter": "source", "request_protocol": "http2", **labels}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("hostmesh_requests_total{") or not all(f'{k}="{v}"' in line for k, v in want.items()):
            continue
        key = re.search(f'{by}="([^"]*)"', line)
        if key:
            counts[key.group(1)] = counts.get(key.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def counted_since(lab, before: dict[str, float], n: int, by: str, **labels: str) -> dict[str, float]:
    """Wait until `n` more requests are counted than in `before` (a request is counted once its
    response is done, which can trail the client's view); the difference per label value."""
    delta: dict[str, float] = {}

    def done() -> bool:
        delta.clear()
        delta.update({k: v - before.get(k, 0.0) for k, v in request_counts(lab, by, **labels).items()
                      if v > before.get(k, 0.0)})
        return sum(delta.values()) >= n
    wait_for(done, timeout=30, what=f"{n} more HTTP/2 requests in node1's request metrics")
    assert sum(delta.values()) == n, delta
    return dict(delta)


def lb_service(policy: str) -> str:
    """The metric name (destination_service) of test_l7_lab's Service for an LB policy."""
    return "lb-" + policy.lower().replace("_", "-") + ".default.svc.cluster.local"


def curl_h2(lab, url: str, *headers: str, src: str = CLIENT_POD) -> tuple[str, dict]:
    """One GET with curl --http2-prior-knowledge (one URL per invocation: curl 7.88 cannot reuse
    a prior-knowledge connection); the HTTP version curl saw and the test app's JSON answer."""
    argv = ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "60", "-w", r"\n%{http_version} %{http_code}"]
    for h in headers:
        argv += ["-H", h]
    r = lab.run(src, argv + [url], timeout=90)
    assert r.returncode == 0, r.stderr
    body, _, tail = r.stdout.rpartition("\n")
    version, code = tail.split()
    assert code == "200", r.stdout[-2000:]
    return version, json.loads(body)


def test_curl_http2_prior_knowledge_header_routing_and_default(l7lab):
    before = request_counts(l7lab, "destination_service")
    canary = [curl_h2(l7lab, f"http://{WEB}/curl-canary", "x-canary: 1") for _ in range(10)]
    assert {v for v, _ in canary} == {"2"}  # curl spoke HTTP/2 to the agent...
    assert {d["protocol"] for _, d in canary} == {"HTTP/1.1"}  # ...which spoke HTTP/1.1 to the pod
    assert {d["pod"] for _, d in canary} == {"pod-2"} and {d["node"] for _, d in canary} == {"node1", "node2"}
    assert {d["headers"].get("x-canary") for _, d in canary} == {"1"}
    default = [curl_h2(l7lab, f"http://{WEB}/curl-default") for _ in range(20)]
    assert {v for v, _ in default} == {"2"}
    pods = [f"{d['node']}/{d['pod']}" for _, d in default]
    assert set(pods) <= ALL_PODS and sum(1 for p in pods if p.endswith("pod-1")) >= 10, pods  # the 90/10 rule
    delta = counted_since(l7lab, before, 30, "destination_service")
    assert delta["v2.default.svc.cluster.local"] >= 10  # every canary request, counted by the L7 driver


def nghttp(lab, url: str, *args: str, src: str = CLIENT_POD) -> tuple[int, dict[str, str], str]:
    """One nghttp request (h2c prior knowledge); status and headers from its HAR file, the body
    from stdout (a single stream, so nothing interleaves there)."""
    har = Path(lab.names.run_dir, "nghttp.har")
    har.unlink(missing_ok=True)
    r = lab.run(src, ["nghttp", "--timeout=60", f"--har={har}", *args, url], timeout=90)
    assert r.returncode == 0, (r.stdout[-1000:], r.stderr[-2000:])
    (entry,) = json.loads(har.read_text())["log"]["entries"]
    har.unlink()
    response = entry["response"]
    return response["status"], {h["name"]: h["value"] for h in response["headers"]}, r.stdout


def test_nghttp_get_and_post_through_the_agents(l7lab):
    status, headers, body = nghttp(l7lab, f"http://{WEB}/nghttp-get?q=1", "-H", "x-canary: 1")
    got = json.loads(body)
    assert status == 200 and headers["x-testapp-pod"] == "pod-2" == got["pod"]
    assert (got["method"], got["path"], got["query"], got["protocol"]) == ("GET", "/nghttp-get", "q=1", "HTTP/1.1")
    # a body larger than HTTP/2's initial 64 KiB window, to node2 over the tunnel, echoed back
    payload = "".join(f"hostmesh nghttp line {i:06d}\n" for i in range(8000))
    upload = Path(l7lab.names.run_dir, "nghttp-post.txt")
    upload.write_text(payload)
    try:
        status, headers, body = nghttp(l7lab, f"http://{BIG}/echo", "-d", str(upload))
    finally:
        upload.unlink()
    assert status == 200 and headers["x-testapp-pod"] == "pod-1"
    assert len(body) == len(payload) and body == payload


def h2load(lab, url: str, n: int, clients: int, streams: int, src: str = CLIENT_POD) -> dict[str, int]:
    """Run h2load (h2c prior knowledge) in a pod; its request and status-code totals."""
    r = lab.run(src, ["h2load", "-n", str(n), "-c", str(clients), "-m", str(streams), url], timeout=400)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Application protocol: h2c" in r.stdout, r.stdout[-2000:]
    req = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", r.stdout, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", r.stdout, re.M)
    assert req and codes, r.stdout[-2000:]
    keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    return {**dict(zip(keys, map(int, req.groups()))), **dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, codes.groups())))}


def test_h2load_canary_split_over_2000_concurrent_streams(l7lab):
    before = request_counts(l7lab, "destination_service")
    before_wl = request_counts(l7lab, "destination_workload")
    out = h2load(l7lab, f"http://{WEB}/", 2000, 2, 100)
    assert out["succeeded"] == out["2xx"] == 2000 and out["failed"] == out["errored"] == out["timeout"] == 0, out
    by_service = counted_since(l7lab, before, 2000, "destination_service")
    v1, v2 = by_service.get("v1.default.svc.cluster.local", 0), by_service.get("v2.default.svc.cluster.local", 0)
    assert v1 + v2 == 2000, by_service
    assert 0.07 <= v2 / 2000 <= 0.13, f"{v2:.0f} of 2000 went to v2"  # 90/10, +-3 points
    by_workload = counted_since(l7lab, before_wl, 2000, "destination_workload")
    assert set(by_workload) == {p.replace("/", "-") for p in ALL_PODS}, by_workload  # both versions, both nodes


def test_h2load_100_streams_per_connection_round_robin_over_both_nodes(l7lab):
    service = lb_service("ROUND_ROBIN")
    before = request_counts(l7lab, "destination_workload", destination_service=service)
    out = h2load(l7lab, f"http://{LB_VIPS['ROUND_ROBIN']}/", 800, 2, 100)
    assert out["succeeded"] == out["2xx"] == 800 and out["failed"] == out["errored"] == out["timeout"] == 0, out
    delta = counted_since(l7lab, before, 800, "destination_workload", destination_service=service)
    assert delta == {p.replace("/", "-"): 200 for p in ALL_PODS}, delta


# ------------------------------------------------------------------ gRPC
def test_grpc_canary_header_routing_and_all_call_kinds(l7lab):
    out = grpc_calls(l7lab, GRPC_WEB, 400, streams=True)
    v2 = sum(1 for w in out["unary"] if w.endswith("pod-2"))
    assert 0.05 <= v2 / 400 <= 0.15, f"{v2} of 400 calls went to v2"  # 90/10 (wider: fewer calls)
    assert set(out["unary"]) == ALL_PODS
    assert out["server_stream"] == [1, 2, 3, 4, 5]
    assert out["client_stream"] == 7
    assert out["bidi"] == ["b0", "b1", "b2", "b3"]
    assert out["deadline"] == "DEADLINE_EXCEEDED"  # grpc-timeout honoured through both agents
    canary = grpc_calls(l7lab, GRPC_WEB, 30, metadata={"x-canary": "1"})
    assert {w.split("/")[1] for w in canary["unary"]} == {"pod-2"}
    assert metric_sum(l7lab, "node1", "hostmesh_requests_total", request_protocol="grpc") >= 430


@pytest.mark.parametrize("policy", sorted(GRPC_LB_VIPS))
def test_grpc_load_balancing_policies(l7lab, policy):
    n = 40 if policy == "ROUND_ROBIN" else 200
    out = grpc_calls(l7lab, GRPC_LB_VIPS[policy], n, **({"vary": "x-user", "keys": 20} if policy == "RING_HASH" else {}))
    check_policy(policy, out["unary"], out["keys"])


def test_grpc_prefer_same_node(l7lab):
    for src, node in (("node1/pod-2", "node1"), ("node2/pod-2", "node2")):
        answers = grpc_calls(l7lab, GRPC_LOCAL, 20, src=src)["unary"]
        assert {w.split("/")[0] for w in answers} == {node} and len(set(answers)) == 2


def test_grpc_mirror_gets_copies_while_the_client_sees_the_primary(l7lab):
    log = Path(l7lab.names.run_dir, "logs", "shadow.log")
    calls = lambda: log.read_text().count("/hostmesh.testapp.v1.Echo/Echo") if log.exists() else 0  # noqa: E731
    before = calls()
    out = grpc_calls(l7lab, GRPC_MIRRORED, 15)
    assert set(out["unary"]) == {"node1/pod-1"}  # the primary answered every call
    wait_for(lambda: calls() - before == 15, timeout=20, what="15 mirrored gRPC calls at the shadow app")
