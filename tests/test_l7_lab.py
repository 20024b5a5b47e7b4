"""L7 through the node agents in the lab, with real clients in the pods, for every capture
backend: a 90/10 canary split, header routing, a mirror, the four LB policies and
prefer-same-node, 100 MiB each way with bounded agent memory, WebSocket echo, proxy-made
errors with x-hostmesh-flags, request metrics. Cross-node requests go over the mTLS
tunnel (the lab's agents have certificates), which the metrics show.

The clients are stdlib Python run inside a pod (keep-alive, one connection) or curl; the
WebSocket server is a minimal one started in a pod here (the test app does not speak it).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from meshlab import mesh
from tests.conftest import wait_for
from tests.test_mesh_l4 import metric_sum

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

V1, V2, WEB, MIRRORED, SHADOW = "198.19.0.60", "198.19.0.61", "198.19.0.62", "198.19.0.63", "198.19.0.64"
LB_VIPS = {"ROUND_ROBIN": "198.19.0.65", "LEAST_REQUEST": "198.19.0.66", "RING_HASH": "198.19.0.67",
           "RANDOM": "198.19.0.68"}
LOCAL, EMPTY, WS, BIG = "198.19.0.69", "198.19.0.70", "198.19.0.71", "198.19.0.72"
H2WEB = "198.19.0.83"  # appProtocol http2 over the test app's HTTP port (HTTP/1.1 and h2c)
SHADOW_PORT, WS_PORT, SHADOW_GRPC_PORT = 8081, 8082, 9091
CLIENT_POD = "node1/pod-1"
ALL_PODS = {"node1/pod-1", "node1/pod-2", "node2/pod-1", "node2/pod-2"}

# keep-alive HTTP client: spec JSON in argv[1]; prints [[status, "node/pod", key], ...]
CLIENT = textwrap.dedent("""
    import http.client, json, sys
    spec = json.loads(sys.argv[1])
    out, conn = [], None
    for i in range(spec["n"]):
        headers = dict(spec.get("headers", {}))
        key = ""
        if spec.get("vary"):
            key = "k%d" % (i % spec["keys"])
            headers[spec["vary"]] = key
        for attempt in (0, 1):
            if conn is None:
                conn = http.client.HTTPConnection(spec["host"], 80, timeout=20)
            try:
                conn.request("GET", spec.get("path", "/"), headers=headers)
                r = conn.getresponse()
                body = r.read()
                break
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                conn = None
                if attempt:
                    raise
        try:
            d = json.loads(body)
            where = "%s/%s" % (d["node"], d["pod"])
        except ValueError:
            where = ""
        out.append([r.status, where, key])
        if r.getheader("connection", "").lower() == "close":
            conn.close()
            conn = None
    print(json.dumps(out))
""")

# a minimal WebSocket echo server (RFC 6455: handshake, masked client frames, text echo)
WS_SERVER = textwrap.dedent("""
    import asyncio, base64, hashlib, sys
    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    async def serve(reader, writer):
        head = await reader.readuntil(b"\\r\\n\\r\\n")
        key = [l.split(b":", 1)[1].strip() for l in head.split(b"\\r\\n") if l.lower().startswith(b"sec-websocket-key:")][0]
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\\r\\nupgrade: websocket\\r\\nconnection: Upgrade\\r\\n"
                     b"sec-websocket-accept: " + accept + b"\\r\\n\\r\\n")
        while True:
            try:
                b0, b1 = await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                break
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await reader.readexactly(2), "big")
            mask = await reader.readexactly(4)
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
            if b0 & 0x0F == 8:
                writer.write(b"\\x88\\x00")
                break
            writer.write(bytes([0x81, len(data)]) + data)
            await writer.drain()
        writer.close()
    async def main():
        server = await asyncio.start_server(serve, "0.0.0.0", int(sys.argv[1]))
        open(sys.argv[2], "w").close()
        await server.serve_forever()
    asyncio.run(main())
""")

WS_CLIENT = textwrap.dedent("""
    import base64, hashlib, json, os, socket, sys
    s = socket.create_connection((sys.argv[1], 80), timeout=10)
    key = base64.b64encode(os.urandom(16))
    s.sendall(b"GET /chat HTTP/1.1\\r\\nhost: ws\\r\\nupgrade: websocket\\r\\nconnection: Upgrade\\r\\n"
              b"sec-websocket-version: 13\\r\\nsec-websocket-key: " + key + b"\\r\\n\\r\\n")
    buf = b""
    while b"\\r\\n\\r\\n" not in buf:
        buf += s.recv(4096)
    head, rest = buf.split(b"\\r\\n\\r\\n", 1)
    want = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    echoes = []
    for msg in (b"hello", b"mesh" * 20, b"bye"):
        mask = os.urandom(4)
        s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(msg)))
        while len(rest) < 2 or len(rest) < 2 + rest[1]:
            rest += s.recv(4096)
        n = rest[1]
        echoes.append(rest[2:2 + n].decode())
        rest = rest[2 + n:]
    print(json.dumps({"status": head.split(b"\\r\\n")[0].decode(), "accept_ok": want in head, "echoes": echoes}))
""")


# ------------------------------------------------------------------ helpers
def svc(name: str, vip: str, selector: dict, target: int = 8080, app_protocol: str | None = None) -> dict:
    port = {"name": "http", "port": 80, "targetPort": target}
    if app_protocol:
        port["appProtocol"] = app_protocol
    return mesh.service_document(name, vip, selector, [port])


def http_route(name: str, parent: str, rules: list) -> dict:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}], "rules": rules}}


def traffic_policy(name: str, lb: dict) -> dict:
    return {"apiVersion": "hostmesh.io/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"targetRef": {"kind": "Service", "name": name}, "loadBalancer": lb}}


GRPC_V1, GRPC_V2, GRPC_WEB = "198.19.0.73", "198.19.0.74", "198.19.0.75"
GRPC_LB_VIPS = {"ROUND_ROBIN": "198.19.0.76", "LEAST_REQUEST": "198.19.0.77", "RING_HASH": "198.19.0.78",
                "RANDOM": "198.19.0.79"}
GRPC_LOCAL, GRPC_MIRRORED, GRPC_SHADOW = "198.19.0.80", "198.19.0.81", "198.19.0.82"


def grpc_documents() -> list[dict]:
    """gRPC services (appProtocol grpc on 9090), a GRPCRoute 90/10 + header canary, a RR policy."""
    def grpc_svc(name, vip, selector):
        return mesh.service_document(name, vip, selector, [{"name": "grpc", "port": 9090, "targetPort": 9090,
                                                            "appProtocol": "grpc"}])
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
             "metadata": {"name": "grpc-web", "namespace": "default"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "grpc-web", "port": 9090}],
                      "rules": [{"matches": [{"headers": [{"name": "x-canary", "value": "1"}]}],
                                 "backendRefs": [{"name": "grpc-v2", "port": 9090}]},
                                {"backendRefs": [{"name": "grpc-v1", "port": 9090, "weight": 90},
                                                 {"name": "grpc-v2", "port": 9090, "weight": 10}]}]}}
    mirror = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
              "metadata": {"name": "grpc-mirrored", "namespace": "default"},
              "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "grpc-mirrored", "port": 9090}],
                       "rules": [{"filters": [{"type": "RequestMirror", "requestMirror": {
                                      "backendRef": {"name": "grpc-shadow", "port": 9090}}}],
                                  "backendRefs": [{"name": "grpc-mirrored", "port": 9090}]}]}}
    shadow = mesh.service_document("grpc-shadow", GRPC_SHADOW, {"node": "node2", "pod": "pod-2"}, [
        {"name": "grpc", "port": 9090, "targetPort": SHADOW_GRPC_PORT, "appProtocol": "grpc"}])
    docs = [grpc_svc("grpc-mirrored", GRPC_MIRRORED, {"node": "node1", "pod": "pod-1"}), shadow, mirror,
            grpc_svc("grpc-v1", GRPC_V1, {"app": "testapp", "pod": "pod-1"}),
            grpc_svc("grpc-v2", GRPC_V2, {"app": "testapp", "pod": "pod-2"}),
            grpc_svc("grpc-web", GRPC_WEB, {"app": "testapp"}), route,
            grpc_svc("grpc-local", GRPC_LOCAL, {"app": "testapp"}),
            traffic_policy("grpc-local", {"type": "ROUND_ROBIN", "preferSameNode": True})]
    for policy, vip in GRPC_LB_VIPS.items():
        name = "grpc-" + policy.lower().replace("_", "-")
        lb = {"type": policy, **({"ringHash": {"header": "x-user"}} if policy == "RING_HASH" else {})}
        docs += [grpc_svc(name, vip, {"app": "testapp"}), traffic_policy(name, lb)]
    return docs


def ready_file(lab, name: str) -> str:
    return f"{lab.names.run_dir}/{name}.ready"


def requests(lab, host: str, n: int, *, src: str = CLIENT_POD, **spec) -> list:
    r = lab.run(src, [sys.executable, "-c", CLIENT, json.dumps({"host": host, "n": n, **spec})], timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def l7lab(mesh_lab):
    """The L7 services, routes and policies, a logging shadow app and a WebSocket server."""
    lab = mesh_lab
    shadow_log = Path(lab.names.run_dir, "logs", "shadow.log")
    shadow_log.unlink(missing_ok=True)
    lab.spawn(lab.target("node2/pod-2"), [sys.executable, "-m", "meshlab.testapp", "--pod", "shadow", "--node", "node2",
                                         "--http-port", str(SHADOW_PORT), "--grpc-port", str(SHADOW_GRPC_PORT), "--log-requests",
                                         "--ready-file", ready_file(lab, "shadow")], "shadow")
    lab.spawn(lab.target("node2/pod-1"), [sys.executable, "-c", WS_SERVER, str(WS_PORT), ready_file(lab, "ws")], "ws")
    docs = [
        svc("v1", V1, {"app": "testapp", "pod": "pod-1"}),
        svc("v2", V2, {"app": "testapp", "pod": "pod-2"}),
        svc("web", WEB, {"app": "testapp"}),  # no appProtocol: L7 because a route is attached
        http_route("web", "web", [
            {"matches": [{"headers": [{"name": "x-canary", "value": "1"}]}], "backendRefs": [{"name": "v2", "port": 80}]},
            {"backendRefs": [{"name": "v1", "port": 80, "weight": 90}, {"name": "v2", "port": 80, "weight": 10}]}]),
        svc("mirrored", MIRRORED, {"node": "node1", "pod": "pod-1"}, app_protocol="http"),
        svc("shadow", SHADOW, {"node": "node2", "pod": "pod-2"}, target=SHADOW_PORT),
        http_route("mirrored", "mirrored", [{
            "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}}],
            "backendRefs": [{"name": "mirrored", "port": 80}]}]),
        svc("local", LOCAL, {"app": "testapp"}),
        traffic_policy("local", {"type": "ROUND_ROBIN", "preferSameNode": True}),
        svc("empty", EMPTY, {"app": "nothing"}, app_protocol="http"),
        svc("ws", WS, {"node": "node2", "pod": "pod-1"}, target=WS_PORT, app_protocol="http"),
        svc("big", BIG, {"node": "node2", "pod": "pod-1"}, app_protocol="http"),
        svc("h2web", H2WEB, {"app": "testapp"}, app_protocol="http2"),
        traffic_policy("h2web", {"type": "ROUND_ROBIN"}),
    ]
    docs += grpc_documents()
    for policy, vip in LB_VIPS.items():
        name = "lb-" + policy.lower().replace("_", "-")
        lb = {"type": policy}
        if policy == "RING_HASH":
            lb["ringHash"] = {"header": "x-user"}
        docs += [svc(name, vip, {"app": "testapp"}), traffic_policy(name, lb)]
    mesh.write_config(lab, "l7.yaml", docs)

    def in_force(node: str) -> bool:
        routes = json.loads(mesh.admin_get(lab, node, "/routes").stdout or "[]")
        web = [r for r in routes if r.get("service") == "web.default.svc.cluster.local"]
        return len(routes) >= 14 and bool(web) and web[0]["producer"] is not None
    wait_for(lambda: all(in_force(n) for n in ("node1", "node2")) and os.path.exists(ready_file(lab, "shadow"))
             and os.path.exists(ready_file(lab, "ws")), timeout=30, what="L7 config on both agents and the test servers")
    yield lab
    (Path(mesh.cp_config_dir(lab)) / "l7.yaml").unlink(missing_ok=True)


# ------------------------------------------------------------------ routing
def test_canary_split_90_10_over_2000_requests(l7lab):
    out = requests(l7lab, WEB, 2000)
    assert {s for s, _, _ in out} == {200}
    pods = [w for _, w, _ in out]
    v2 = sum(1 for w in pods if w.endswith("pod-2"))
    assert 0.07 <= v2 / len(pods) <= 0.13, f"{v2} of {len(pods)} went to v2"
    assert {w for w in pods} == ALL_PODS  # both versions, on both nodes (the tunnel carries node2's)


def test_header_match_sends_only_matching_requests_to_v2(l7lab):
    canary = requests(l7lab, WEB, 100, headers={"x-canary": "1"})
    assert {(s, w.split("/")[1]) for s, w, _ in canary} == {(200, "pod-2")}
    other = requests(l7lab, WEB, 100, headers={"x-canary": "0"})
    assert sum(1 for _, w, _ in other if w.endswith("pod-1")) >= 70  # the 90/10 rule, not the header rule


def test_mirror_gets_copies_while_the_client_sees_the_primary(l7lab):
    log = Path(l7lab.names.run_dir, "logs", "shadow.log")
    before = log.read_text().count("/mirror-probe") if log.exists() else 0
    out = requests(l7lab, MIRRORED, 20, path="/mirror-probe")
    assert {(s, w) for s, w, _ in out} == {(200, "node1/pod-1")}
    wait_for(lambda: log.read_text().count("/mirror-probe") - before == 20, timeout=20,
             what="20 mirrored copies at the shadow app")


# ------------------------------------------------------------------ load balancing
def test_round_robin_cycles_through_every_pod(l7lab):
    out = requests(l7lab, LB_VIPS["ROUND_ROBIN"], 40)
    counts = {p: sum(1 for _, w, _ in out if w == p) for p in ALL_PODS}
    assert counts == {p: 10 for p in ALL_PODS}


@pytest.mark.parametrize("policy", ["LEAST_REQUEST", "RANDOM"])
def test_least_request_and_random_spread_over_pods_on_both_nodes(l7lab, policy):
    out = requests(l7lab, LB_VIPS[policy], 200)
    counts = {p: sum(1 for _, w, _ in out if w == p) for p in ALL_PODS}
    assert all(15 <= c <= 100 for c in counts.values()), counts


def test_ring_hash_on_a_header_is_sticky_per_key(l7lab):
    out = requests(l7lab, LB_VIPS["RING_HASH"], 200, vary="x-user", keys=20)
    by_key: dict[str, set] = {}
    for _, where, key in out:
        by_key.setdefault(key, set()).add(where)
    assert all(len(p) == 1 for p in by_key.values()), by_key
    assert len({next(iter(p)) for p in by_key.values()}) >= 2  # keys spread over pods


def test_prefer_same_node_keeps_requests_on_the_clients_node(l7lab):
    for src, node in (("node1/pod-2", "node1"), ("node2/pod-2", "node2")):
        out = requests(l7lab, LOCAL, 20, src=src)
        assert {w.split("/")[0] for _, w, _ in out} == {node}
        assert len({w for _, w, _ in out}) == 2  # round robin among that node's pods


# ------------------------------------------------------------------ streaming, upgrade, errors
def test_100_mib_each_way_streams_with_bounded_agent_memory(l7lab):
    lab = l7lab
    (pid,) = mesh.agent_pids(lab, "node1")
    before = rss_kib(pid)
    r = lab.run(CLIENT_POD, ["curl", "-sS", "--max-time", "120", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                             f"http://{BIG}/?size=100MiB"], timeout=150)
    assert r.returncode == 0 and r.stdout == f"200 {100 * 1024 * 1024}", (r.stdout, r.stderr)
    upload = Path(lab.names.run_dir, "upload.bin")
    with open(upload, "wb") as f:
        f.truncate(100 * 1024 * 1024)
    try:
        r = lab.run(CLIENT_POD, ["curl", "-sS", "--max-time", "120", "-X", "POST", "-T", str(upload),
                                 "-H", "expect:", f"http://{BIG}/upload"], timeout=150)
    finally:
        upload.unlink()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["body_bytes"] == 100 * 1024 * 1024
    grown = rss_kib(pid) - before
    assert grown < 8 * 1024, f"agent RSS grew by {grown} KiB streaming 100 MiB each way"
    # both went through the L7 driver (request metrics), to node2 over the tunnel
    assert metric_sum(lab, "node1", "hostmesh_requests_total", destination_service="big.default.svc.cluster.local",
                      response_code="200") >= 2
    assert metric_sum(lab, "node1", "hostmesh_response_bytes_sum",
                      destination_service="big.default.svc.cluster.local") >= 100 * 1024 * 1024


def test_websocket_echo_through_the_agents(l7lab):
    r = l7lab.run(CLIENT_POD, [sys.executable, "-c", WS_CLIENT, WS], timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["status"].startswith("HTTP/1.1 101") and got["accept_ok"]
    assert got["echoes"] == ["hello", "mesh" * 20, "bye"]


def test_http1_clients_of_an_http2_port_are_translated_to_http2_on_both_nodes(l7lab):
    lab = l7lab
    urls = [f"http://{H2WEB}/h1-to-h2?i={i}" for i in range(8)]
    for src in ("node1/pod-1", "node2/pod-2"):
        # one curl, one keep-alive HTTP/1.1 connection, eight requests round-robin over the four pods
        r = lab.run(src, ["curl", "-sS", "--http1.1", "--max-time", "30", "-w", "\n%{http_version} %{num_connects}\n",
                          *urls], timeout=60)
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stdout.splitlines() if ln]
        answers = [json.loads(ln) for ln in lines if ln.startswith("{")]
        metas = [ln for ln in lines if not ln.startswith("{")]
        assert len(answers) == 8 and set(metas) <= {"1.1 1", "1.1 0"}  # HTTP/1.1, one connection
        assert {a["protocol"] for a in answers} == {"HTTP/2"}  # every pod saw HTTP/2 from its agent's proxy
        assert {"%s/%s" % (a["node"], a["pod"]) for a in answers} == ALL_PODS  # same node and over the tunnel
        assert {a["path"] for a in answers} == {"/h1-to-h2"}
    for node in ("node1", "node2"):
        assert metric_sum(lab, node, "hostmesh_requests_total", request_protocol="http", response_code="200",
                          reporter="source", destination_service="h2web.default.svc.cluster.local") >= 8
    # node1's cross-node requests went through the tunnel, with the principals
    assert metric_sum(lab, "node1", "hostmesh_requests_total", destination_service="h2web.default.svc.cluster.local",
                      destination_workload="node2-pod-1", connection_security_policy="mutual_tls") > 0


def test_no_endpoints_is_a_proxy_made_503_uh(l7lab):
    r = l7lab.run(CLIENT_POD, ["curl", "-sS", "-i", "--max-time", "5", f"http://{EMPTY}/"])
    assert r.returncode == 0, r.stderr
    head = r.stdout.split("\r\n\r\n", 1)[0].lower()
    assert head.startswith("http/1.1 503") and "x-hostmesh-flags: uh" in head


# ------------------------------------------------------------------ telemetry, admin
def principal(lab, node: str) -> str:
    """The SPIFFE ID the node's agent holds a certificate for (every lab pod runs as one
    service account, so there is exactly one; admin /certs)."""
    (ident,) = {c["identity"] for c in json.loads(mesh.admin_get(lab, node, "/certs").stdout)}
    return ident


def test_request_metrics_and_the_tunnel_under_l7(l7lab):
    lab = l7lab
    out = requests(lab, LB_VIPS["ROUND_ROBIN"], 8, headers={"connection": "close"})
    assert {s for s, _, _ in out} == {200}
    assert metric_sum(lab, "node1", "hostmesh_requests_total", request_protocol="http", response_code="200",
                      reporter="source", destination_workload="node2-pod-1") > 0
    assert metric_sum(lab, "node1", "hostmesh_requests_total", request_protocol="http", response_code="503",
                      response_flags="UH") > 0
    # requests that crossed to node2 went through the tunnel: principals and mutual_tls; those
    # that stayed on node1 are plaintext
    assert metric_sum(lab, "node1", "hostmesh_requests_total", reporter="source", destination_workload="node2-pod-1",
                      connection_security_policy="mutual_tls", source_principal=principal(lab, "node1"),
                      destination_principal=principal(lab, "node2")) > 0
    assert metric_sum(lab, "node1", "hostmesh_requests_total", reporter="source", destination_workload="node2-pod-1",
                      connection_security_policy="none") == 0
    assert metric_sum(lab, "node1", "hostmesh_requests_total", reporter="source", destination_workload="node1-pod-2",
                      connection_security_policy="none", source_principal="unknown") > 0
    # node1's upstream HTTP connections to node2 are tunnel streams; node2 saw only mTLS from node1
    assert metric_sum(lab, "node1", "hostmesh_agent_tunnel_streams_total", direction="outbound") > 0
    assert metric_sum(lab, "node2", "hostmesh_tcp_connections_opened_total", reporter="destination",
                      connection_security_policy="mutual_tls", source_workload="node1-pod-1") > 0
    assert metric_sum(lab, "node2", "hostmesh_tcp_connections_opened_total", reporter="destination",
                      connection_security_policy="none") == 0
    # the downstream connections (one per request here) are counted as TCP too
    assert metric_sum(lab, "node1", "hostmesh_tcp_connections_closed_total", reporter="source",
                      destination_service="lb-round-robin.default.svc.cluster.local") >= 8
    listeners = {entry["name"]: entry for entry in json.loads(mesh.admin_get(lab, "node1", "/listeners").stdout)}
    assert listeners["tunnel"]["address"].endswith(":15008")


def test_routes_view_shows_the_http_routes_in_force(l7lab):
    routes = json.loads(mesh.admin_get(l7lab, "node1", "/routes").stdout)
    web = next(r for r in routes if r.get("service") == "web.default.svc.cluster.local")
    assert web["l7"] == "detect" and web["producer"]["routes"] == ["default/web"]
    plain = next(r for r in routes if r.get("service") == "v1.default.svc.cluster.local")
    assert plain["l7"] == "tcp"  # no route, policy or appProtocol: relayed as TCP
