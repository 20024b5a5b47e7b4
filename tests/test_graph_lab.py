"""`hostmesh graph` in the lab: the graph matches the traffic generated.

Two clients on different nodes, two HTTP Services and one TCP Service, each backed by one
pod, so every edge has one destination workload:

    node1-pod-1 -> alpha (node1-pod-2, same node)   20 rps, every 10th answered 503
    node1-pod-1 -> beta  (node2-pod-2, other node)  10 rps, no errors, over the mTLS tunnel
    node2-pod-1 -> beta  (node2-pod-2, same node)   10 rps, every 4th 503, every 20th delayed 300 ms
    node2-pod-1 -> gamma (node1-pod-2, TCP)          2 connections/s, over the mTLS tunnel

`hostmesh graph --lab` runs in-process (``cli.main``) while the load runs: the rates come
from two scrapes 6 s apart; after the load, ``--since-start`` gives the exact counts.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from hostmesh import cli
from meshlab import mesh
from tests.conftest import require_root, unique_lab_name, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

ALPHA, BETA, GAMMA = "198.19.0.90", "198.19.0.91", "198.19.0.92"
SECONDS = 16.0  # of load; the interval graph starts ~3 s in and lasts 6 s
C1, C2 = "node1/pod-1", "node2/pod-1"
STREAMS = {
    C1: [{"name": "alpha", "host": ALPHA, "rate": 20.0, "fail_every": 10},
         {"name": "beta", "host": BETA, "rate": 10.0}],
    C2: [{"name": "beta", "host": BETA, "rate": 10.0, "fail_every": 4, "delay_every": 20},
         {"name": "gamma", "host": GAMMA, "rate": 2.0, "tcp": True}],
}

# paced streams, one thread each: HTTP on one keep-alive connection, or (tcp) a new
# connection per exchange; prints {stream: {"codes": [...], "seconds": [...]}}
LOAD = textwrap.dedent("""
    import http.client, json, socket, sys, threading, time
    spec = json.loads(sys.argv[1])
    out = {}
    def paced(s, i, t0):
        wait = t0 + i / s["rate"] - time.time()
        if wait > 0:
            time.sleep(wait)
    def http_stream(s, t0):
        conn = http.client.HTTPConnection(s["host"], 80, timeout=10)
        codes, secs = [], []
        for i in range(int(spec["seconds"] * s["rate"])):
            paced(s, i, t0)
            path = "/"
            if s.get("fail_every") and i % s["fail_every"] == 0:
                path = "/?status=503"
            elif s.get("delay_every") and i % s["delay_every"] == 1:
                path = "/?delay=0.3"
            t = time.monotonic()
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            codes.append(r.status)
            secs.append(time.monotonic() - t)
        out[s["name"]] = {"codes": codes, "seconds": secs}
    def tcp_stream(s, t0):
        codes = []
        for i in range(int(spec["seconds"] * s["rate"])):
            paced(s, i, t0)
            with socket.create_connection((s["host"], 80), timeout=10) as c:
                c.sendall(b"GET / HTTP/1.1\\r\\nhost: gamma\\r\\nconnection: close\\r\\n\\r\\n")
                data = b""
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            codes.append(int(data.split(b" ", 2)[1]))
        out[s["name"]] = {"codes": codes, "seconds": []}
    t0 = time.time() + 0.2
    threads = [threading.Thread(target=tcp_stream if s.get("tcp") else http_stream, args=(s, t0))
               for s in spec["streams"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(out))
""")


def service(name: str, vip: str, pod_selector: dict, protocol: str) -> dict:
    return mesh.service_document(name, vip, pod_selector, [
        {"name": "web", "port": 80, "targetPort": 8080, "appProtocol": protocol}])


@pytest.fixture(scope="module")
def glab():
    require_root("the service graph lab")
    from meshlab.lab import Lab
    lab = Lab(unique_lab_name())
    try:
        lab.up(2, 2, capture="iptables", config=[
            service("alpha", ALPHA, {"node": "node1", "pod": "pod-2"}, "http"),
            service("beta", BETA, {"node": "node2", "pod": "pod-2"}, "http"),
            service("gamma", GAMMA, {"node": "node1", "pod": "pod-2"}, "tcp"),
        ])

        def in_force(node: str) -> bool:
            r = mesh.admin_get(lab, node, "/clusters")
            names = {c["name"] for c in json.loads(r.stdout or "[]")} if r.returncode == 0 else set()
            return sum(1 for n in names if n.split(".")[0] in ("alpha", "beta", "gamma")) >= 3
        wait_for(lambda: in_force("node1") and in_force("node2"), timeout=30, what="the services on both agents")
        yield lab
    finally:
        lab.down()


def graph_json(capsys, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = cli.main(["graph", *argv, "-o", "json"])
    return rc, json.loads(capsys.readouterr().out)


def edges_by_name(doc: dict) -> dict[tuple[str, str, str, str], dict]:
    return {(e["source_workload"], e["destination_service_name"], e["destination_workload"], e["protocol"]): e
            for e in doc["edges"]}


def bucket_of(seconds: float) -> tuple[float, float]:
    from nodeagent.proxy.l7.metrics import DURATION_BUCKETS
    lower = 0.0
    for b in DURATION_BUCKETS:
        if seconds <= b:
            return lower, b
        lower = b
    return lower, math.inf


def test_the_graph_matches_the_traffic_generated(glab, capsys, tmp_path):
    lab = glab
    loads = {pod: subprocess.Popen(lab.exec_argv(lab.target(pod), [
        sys.executable, "-c", LOAD, json.dumps({"seconds": SECONDS, "streams": streams})]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pod, streams in STREAMS.items()}
    try:
        time.sleep(3.0)
        rc, live = graph_json(capsys, "--lab", lab.name, "--interval", "6")
        results = {}
        for pod, proc in loads.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-2000:]
            results[pod] = json.loads(out)
    finally:
        for proc in loads.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # ---- rates over the 6 s window, while the load ran
    assert rc == 0 and live["complete"] and live["scrape_errors"] == [] and live["agents"] == ["node1", "node2"]
    assert live["mode"] == "interval" and 5.5 < live["window_seconds"] < 7.5
    edges = edges_by_name(live)
    assert set(edges) == {("node1-pod-1", "alpha", "node1-pod-2", "http"),
                          ("node1-pod-1", "beta", "node2-pod-2", "http"),
                          ("node2-pod-1", "beta", "node2-pod-2", "http"),
                          ("node2-pod-1", "gamma", "node1-pod-2", "tcp")}, live["edges"]
    c1_alpha = edges[("node1-pod-1", "alpha", "node1-pod-2", "http")]
    c1_beta = edges[("node1-pod-1", "beta", "node2-pod-2", "http")]
    c2_beta = edges[("node2-pod-1", "beta", "node2-pod-2", "http")]
    c2_gamma = edges[("node2-pod-1", "gamma", "node1-pod-2", "tcp")]
    assert c1_alpha["rps"] == pytest.approx(20.0, rel=0.15)
    assert c1_beta["rps"] == pytest.approx(10.0, rel=0.15) and c2_beta["rps"] == pytest.approx(10.0, rel=0.15)
    assert c2_gamma["tcp"]["connections_per_second"] == pytest.approx(2.0, abs=0.6)
    assert c1_alpha["success_rate"] == pytest.approx(0.9, abs=0.04)
    assert c2_beta["success_rate"] == pytest.approx(0.75, abs=0.06) and c1_beta["success_rate"] == 1
    assert live["edges"][0]["destination_service_name"] == "alpha"  # busiest first
    assert all(e["reporter"] == "source" for e in live["edges"])  # each request once, by the client's agent
    # the mTLS tunnel carries the cross-node edges only
    assert (c1_beta["mtls_share"], c2_gamma["mtls_share"], c1_alpha["mtls_share"], c2_beta["mtls_share"]) == \
        (1, 1, 0, 0)
    lower, upper = bucket_of(0.3)
    assert lower <= c2_beta["p99_seconds"] <= upper and c1_alpha["p99_seconds"] < 0.25

    # ---- exact totals after the load
    rc, total = graph_json(capsys, "--lab", lab.name, "--since-start")
    assert rc == 0 and total["mode"] == "since-start" and total["window_seconds"] is None
    t = edges_by_name(total)
    for (pod, stream), key in {(C1, "alpha"): ("node1-pod-1", "alpha", "node1-pod-2", "http"),
                               (C1, "beta"): ("node1-pod-1", "beta", "node2-pod-2", "http"),
                               (C2, "beta"): ("node2-pod-1", "beta", "node2-pod-2", "http")}.items():
        codes = results[pod][stream]["codes"]
        ok = sum(1 for c in codes if c < 500)
        e = t[key]
        assert e["requests"] == len(codes) and e["rps"] is None, (key, e)
        assert e["success_rate"] == pytest.approx(ok / len(codes), abs=1e-4), key
        assert e["response_codes"] == {str(c): codes.count(c) for c in set(codes)}, key
    assert set(results[C2]["gamma"]["codes"]) == {200}
    assert t[("node2-pod-1", "gamma", "node1-pod-2", "tcp")]["tcp"]["connections"] == len(results[C2]["gamma"]["codes"])
    # p99 of C2 -> beta: in the bucket of the client's own p99
    secs = sorted(results[C2]["beta"]["seconds"])
    client_p99 = secs[math.ceil(0.99 * len(secs)) - 1]
    lower, upper = bucket_of(client_p99)
    assert lower <= t[("node2-pod-1", "beta", "node2-pod-2", "http")]["p99_seconds"] <= upper

    # ---- filters, grouping, the table, DOT and SVG on the same lab
    _, only_c2 = graph_json(capsys, "--lab", lab.name, "--since-start", "--workload", "node2-pod-1")
    assert {e["source_workload"] for e in only_c2["edges"]} == {"node2-pod-1"} and len(only_c2["edges"]) == 2
    _, by_service = graph_json(capsys, "--lab", lab.name, "--since-start", "--by", "service")
    assert {(e["source_workload"], e["destination_service_name"]) for e in by_service["edges"]} == \
        {("node1-pod-1", "alpha"), ("node1-pod-1", "beta"), ("node2-pod-1", "beta"), ("node2-pod-1", "gamma")}
    capsys.readouterr()
    assert cli.main(["graph", "--lab", lab.name, "--since-start"]) == 0
    table = capsys.readouterr().out
    assert "default/node1-pod-1  default/alpha" in table and "conn" in table
    svg = tmp_path / "graph.svg"
    dot_args = ["graph", "--lab", lab.name, "--since-start", "-o", "dot"]
    if shutil.which("dot"):
        dot_args += ["--svg", str(svg)]
    assert cli.main(dot_args) == 0
    dot = capsys.readouterr().out
    assert '"workload:default/node2-pod-1" -> "service:default/beta"' in dot
    assert '"service:default/gamma" -> "workload:default/node1-pod-2"' in dot
    if shutil.which("dot"):
        assert "<svg" in svg.read_text()


def test_an_unreachable_agent_is_reported_not_fatal(glab, capsys):
    """node2's admin endpoint answers nothing for a moment (its port blocked in the node
    namespace): node1's edges still come back, the graph says it is incomplete."""
    lab = glab
    block = ["iptables", "-w", "-I", "INPUT", "-p", "tcp", "--dport", "15000", "-i", "lo", "-j", "REJECT",
             "--reject-with", "tcp-reset"]
    r = lab.run("node2", block)
    assert r.returncode == 0, r.stderr
    try:
        capsys.readouterr()
        rc = cli.main(["graph", "--lab", lab.name, "--since-start", "--timeout", "2", "-o", "json"])
        captured = capsys.readouterr()
    finally:
        r = lab.run("node2", ["iptables", "-w", "-D", *block[3:]])
        assert r.returncode == 0, r.stderr
    doc = json.loads(captured.out)
    assert rc == 1 and doc["complete"] is False and doc["agents"] == ["node1"]
    assert [e["agent"] for e in doc["scrape_errors"]] == ["node2"]
    assert "agent node2 not scraped" in captured.err and "Traceback" not in captured.err
    edges = edges_by_name(doc)
    assert edges[("node1-pod-1", "alpha", "node1-pod-2", "http")]["reporter"] == "source"
    # node2's client is still seen where its connections arrived: node1's inbound side, which
    # names the Service by the endpoint (gamma's pod and port are alpha's too)
    from_c2 = [e for k, e in edges.items() if k[0] == "node2-pod-1" and k[2:] == ("node1-pod-2", "tcp")]
    assert len(from_c2) == 1 and from_c2[0]["reporter"] == "destination" and from_c2[0]["agents"] == ["node1"]
