"""Access logs through the node agents in the lab: every request (HTTP/1.1, HTTP/2, gRPC)
and every TCP connection a client pod makes is one JSON line, matched one for one by its
request id (method, path, status, flags); a Telemetry that disables a Service, a route or a
workload takes exactly those out; samplingPercentage 0 logs nothing.

The MeshConfig sends the lines to one file in the lab's run dir: both nodes' agents, and
each agent's worker processes, append to it (O_APPEND, whole lines per write), so the test
also shows that lines of several processes never interleave. Capture does not matter here
(the hooks run after it): one iptables lab serves the module.
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

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

CLIENT, QUIET_CLIENT = "node1/pod-1", "node1/pod-2"
LOGGED, GRPC, QUIET, TCP = "198.19.3.10", "198.19.3.11", "198.19.3.12", "198.19.3.13"
HOST = {LOGGED: "logged.default.svc.cluster.local", GRPC: "grpc-logged.default.svc.cluster.local",
        QUIET: "quiet.default.svc.cluster.local", TCP: "tcp-logged.default.svc.cluster.local"}
API = "hostmesh.io/v1alpha1"

# HTTP/1.1 requests from a pod: spec JSON in argv[1] ({host, requests: [[method, path, id]], fresh});
# prints [[status, flags], ...]
HTTP_CLIENT = textwrap.dedent("""
    import http.client, json, sys
    spec = json.loads(sys.argv[1])
    out, conn = [], None
    for method, path, rid in spec["requests"]:
        if conn is None:
            conn = http.client.HTTPConnection(spec["host"], 80, timeout=30)
        conn.request(method, path, body=b"abc" if method == "POST" else None, headers={"x-request-id": rid})
        r = conn.getresponse()
        r.read()
        out.append([r.status, r.getheader("x-hostmesh-flags") or "-"])
        if spec.get("fresh"):
            conn.close()
            conn = None
    print(json.dumps(out))
""")

GRPC_CLIENT = textwrap.dedent("""
    import json, sys, grpc
    from meshlab.testapp import echo_pb2 as pb, echo_pb2_grpc as rpc
    spec = json.loads(sys.argv[1])
    stub = rpc.EchoStub(grpc.insecure_channel(spec["target"]))
    for rid in spec["ids"]:
        stub.Echo(pb.EchoRequest(message="m"), timeout=20, metadata=(("x-request-id", rid),))
    print("ok")
""")


def svc(name: str, vip: str, app_protocol: str, port: int = 80, target: int = 8080) -> dict:
    return mesh.service_document(name, vip, {"app": "testapp"},
                                 [{"name": "p", "port": port, "targetPort": target, "appProtocol": app_protocol}])


def meshconfig(sampling: float) -> dict:
    return {"apiVersion": API, "kind": "MeshConfig", "metadata": {"name": "default", "namespace": "default"},
            "spec": {"accessLog": {"output": "OUTPUT", "samplingPercentage": sampling}}}


def telemetry(name: str, scope: dict) -> dict:
    return {"apiVersion": API, "kind": "Telemetry", "metadata": {"name": name, "namespace": "default"},
            "spec": {**scope, "accessLogging": {"disabled": True}}}


def documents(output: str, sampling: float = 100) -> list[dict]:
    mc = meshconfig(sampling)
    mc["spec"]["accessLog"]["output"] = output
    def route(name: str, rule: dict) -> dict:
        return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "logged"}],
                         "rules": [{**rule, "backendRefs": [{"name": "logged", "port": 80}]}]}}
    return [mc, svc("logged", LOGGED, "http"), svc("grpc-logged", GRPC, "grpc", 9090, 9090),
            svc("quiet", QUIET, "http"), svc("tcp-logged", TCP, "tcp"),
            route("logged-quiet-path", {"matches": [{"path": {"type": "PathPrefix", "value": "/quiet"}}]}),
            route("logged-rest", {}),
            telemetry("quiet-service", {"targetRef": {"kind": "Service", "name": "quiet"}}),
            telemetry("quiet-route", {"targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                                    "name": "logged-quiet-path"}}),
            telemetry("quiet-client", {"selector": {"matchLabels": {"node": "node1", "pod": "pod-2"}}})]


@pytest.fixture(scope="module")
def alab():
    require_root("the access log lab")
    from meshlab.lab import Lab
    lab = Lab(unique_lab_name())
    try:
        lab.up(2, 2, capture="iptables")
        lab.access_log = Path(lab.names.run_dir, "access.log")
        mesh.write_config(lab, "accesslog.yaml", documents(str(lab.access_log)))

        def in_force(node: str) -> bool:
            clusters = mesh.admin_get(lab, node, "/clusters").stdout
            return all(vip in clusters for vip in (LOGGED, GRPC, QUIET, TCP))
        wait_for(lambda: all(in_force(n) for n in ("node1", "node2")), timeout=30, what="the access log config")
        # a first line proves the writers are on (workers get each snapshot a moment after the agent)

        def warmed_up() -> bool:
            http(lab, CLIENT, LOGGED, [["GET", "/warmup", "warmup"]])
            return lab.access_log.exists() and "warmup" in lab.access_log.read_text()
        wait_for(warmed_up, timeout=30, what="a first access log line")
        yield lab
    finally:
        lab.down()


def http(lab, pod: str, host: str, requests: list, fresh: bool = False) -> list:
    r = lab.run(pod, [sys.executable, "-c", HTTP_CLIENT, json.dumps({"host": host, "requests": requests,
                                                                    "fresh": fresh})], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def lines(lab) -> list[dict]:
    """Every line of the file; each must parse on its own (no torn or interleaved lines)."""
    text = lab.access_log.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def settled(lab, pred, what: str) -> list[dict]:
    """The lines once ``pred(lines)`` holds, and a moment later (nothing more may come)."""
    wait_for(lambda: pred(lines(lab)), timeout=20, what=what)
    time.sleep(0.5)
    return lines(lab)


def by_id(all_lines: list[dict], prefix: str, reporter: str = "source") -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for ln in all_lines:
        rid = ln.get("request_id") or ""
        if rid.startswith(prefix) and ln["reporter"] == reporter:
            out.setdefault(rid, []).append(ln)
    return out


def test_http1_requests_are_one_line_each_matching_method_path_status_and_flags(alab):
    tag = f"h1-{time.monotonic_ns()}-"
    reqs = [["GET", f"/a/{i}?status={200 if i % 3 else 503}", f"{tag}{i}"] for i in range(12)]
    reqs += [["POST", "/post", f"{tag}post"], ["GET", "/?status=404", f"{tag}404"]]
    got = http(alab, CLIENT, LOGGED, reqs)
    seen = by_id(settled(alab, lambda ls: len(by_id(ls, tag)) >= len(reqs), "the HTTP/1.1 lines"), tag)
    assert sorted(seen) == sorted(r[2] for r in reqs)
    for (method, path, rid), (status, flags) in zip(reqs, got):
        (ln,) = seen[rid]
        assert (ln["method"], ln["path"], ln["response_code"], ln["response_flags"]) == (method, path, status, flags)
        assert ln["protocol"] == "HTTP/1.1" and ln["authority"] == LOGGED and ln["node"] == "node1"
        assert ln["source_workload"] == "node1-pod-1" and ln["destination_service"] == HOST[LOGGED]
        assert ln["upstream_host"].endswith(":8080") and ln["route_name"] == "HTTPRoute/default/logged-rest#0"
        assert ln["destination_workload"].startswith("node") and ln["duration"] >= 0
        if ln["destination_workload"].startswith("node2"):
            assert ln["connection_security_policy"] == "mutual_tls" and ln["destination_principal"].startswith(
                "spiffe://cluster.local/ns/default/sa/")
    assert seen[f"{tag}post"][0]["bytes_received"] == 3


def test_http2_and_grpc_requests_are_one_line_each(alab):
    tag = f"h2-{time.monotonic_ns()}-"
    for i in range(4):
        r = alab.run(CLIENT, ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                              "-H", f"x-request-id: {tag}{i}", f"http://{LOGGED}/h2/{i}"], timeout=30)
        assert r.stdout == "200", (r.stdout, r.stderr)
    gtag = f"grpc-{time.monotonic_ns()}-"
    repo = str(Path(__file__).resolve().parent.parent)
    r = alab.run(CLIENT, [sys.executable, "-c", f"import sys; sys.path.insert(0, {repo!r})\n" + GRPC_CLIENT,
                          json.dumps({"target": f"{GRPC}:9090", "ids": [f"{gtag}{i}" for i in range(5)]})],
                 timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    all_lines = settled(alab, lambda ls: len(by_id(ls, tag)) >= 4 and len(by_id(ls, gtag)) >= 5, "the h2/gRPC lines")
    h2, grpc = by_id(all_lines, tag), by_id(all_lines, gtag)
    assert sorted(h2) == [f"{tag}{i}" for i in range(4)] and sorted(grpc) == [f"{gtag}{i}" for i in range(5)]
    for i in range(4):
        (ln,) = h2[f"{tag}{i}"]
        assert (ln["protocol"], ln["method"], ln["path"], ln["response_code"]) == ("HTTP/2", "GET", f"/h2/{i}", 200)
    for rows in grpc.values():
        (ln,) = rows
        assert ln["protocol"] == "HTTP/2" and ln["method"] == "POST" and ln["path"].endswith("/Echo"), ln
        assert ln["response_code"] == 200 and ln["request_protocol"] == "grpc"
        assert ln["destination_service"] == HOST[GRPC]


def test_tcp_connections_are_one_line_each_at_the_source(alab):
    before = [ln for ln in lines(alab) if ln["destination_service"] == HOST[TCP] and ln["reporter"] == "source"]
    got = http(alab, CLIENT, TCP, [["GET", f"/t/{i}", f"tcp-{i}"] for i in range(5)], fresh=True)
    assert [g[0] for g in got] == [200] * 5

    def tcp_lines(ls):
        return [ln for ln in ls if ln["destination_service"] == HOST[TCP] and ln["reporter"] == "source"]
    now = tcp_lines(settled(alab, lambda ls: len(tcp_lines(ls)) >= len(before) + 5, "the TCP lines"))
    new = now[len(before):]
    assert len(new) == 5
    for ln in new:
        assert ln["request_protocol"] == "tcp" and ln["method"] is None and ln["response_code"] == 0
        assert ln["response_flags"] == "-" and ln["bytes_received"] > 0 and ln["bytes_sent"] > 0
        assert ln["upstream_host"].endswith(":8080") and ln["source_workload"] == "node1-pod-1"


def test_a_disabled_service_route_or_workload_has_no_lines(alab):
    tag = f"quiet-{time.monotonic_ns()}-"
    assert [g[0] for g in http(alab, CLIENT, QUIET, [["GET", "/", f"{tag}svc-{i}"] for i in range(3)])] == [200] * 3
    assert [g[0] for g in http(alab, CLIENT, LOGGED, [["GET", f"/quiet/{i}", f"{tag}route-{i}"]
                                                      for i in range(3)])] == [200] * 3
    assert [g[0] for g in http(alab, QUIET_CLIENT, LOGGED, [["GET", "/", f"{tag}client-{i}"]
                                                            for i in range(3)])] == [200] * 3
    # a marker after them: once it is there, the writers have had their lines
    mark = f"{tag}marker"
    http(alab, CLIENT, LOGGED, [["GET", "/", mark]])
    all_lines = settled(alab, lambda ls: mark in by_id(ls, mark), "the marker line")
    assert by_id(all_lines, tag).keys() == {mark}
    assert not [ln for ln in all_lines if ln["destination_service"] == HOST[QUIET] and ln["reporter"] == "source"]


def test_sampling_zero_logs_nothing(alab):
    mesh.write_config(alab, "accesslog.yaml", documents(str(alab.access_log), sampling=0))

    def off(node: str) -> bool:
        config = json.loads(mesh.admin_get(alab, node, "/config_dump").stdout)["snapshot"]["config"]
        spec = next(json.loads(c["spec"]) for c in config if c["kind"] == "MeshConfig")
        return spec["accessLog"]["samplingPercentage"] == 0
    wait_for(lambda: all(off(n) for n in ("node1", "node2")), timeout=30, what="samplingPercentage 0 in force")
    time.sleep(0.5)  # the workers' copies
    size = alab.access_log.stat().st_size
    tag = f"zero-{time.monotonic_ns()}-"
    http(alab, CLIENT, LOGGED, [["GET", "/", f"{tag}{i}"] for i in range(10)])
    http(alab, CLIENT, TCP, [["GET", "/", f"{tag}tcp"]])
    time.sleep(1.5)
    assert alab.access_log.stat().st_size == size
    # every line written so far parses on its own: several processes appended whole lines
    assert all(isinstance(ln, dict) for ln in lines(alab))
    written = mesh_metric(alab, "node1", "hostmesh_agent_access_log_written_total")
    assert written > 0 and mesh_metric(alab, "node1", "hostmesh_agent_access_log_dropped_total") == 0


def mesh_metric(lab, node: str, name: str) -> float:
    """A sample summed over its label sets (workers merged by the agent)."""
    text = mesh.admin_get(lab, node, "/stats/prometheus").stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))
