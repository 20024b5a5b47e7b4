"""`hostmesh demo`: a guided tour on a throwaway lab. It grows as features land."""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from typing import TextIO

from meshlab import mesh
from meshlab.errors import LabError
from meshlab.lab import Lab, require_root

VIP_REQUESTS = 12


def _request(lab: Lab, source: str, argv: list[str]) -> str:
    proc = lab.run(source, argv, timeout=20)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} from {source} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _curl(lab: Lab, source: str, url: str, *extra: str) -> dict:
    return json.loads(_request(lab, source, ["curl", "-sS", "--max-time", "5", *extra, url]))


def _opened(lab: Lab, node: str, *keys: str) -> Counter:
    """hostmesh_tcp_connections_opened_total by the given labels (reporter, destination workload)."""
    keys = keys or ("reporter", "destination_workload")
    text = mesh.admin_get(lab, node, "/stats/prometheus").stdout
    out: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("hostmesh_tcp_connections_opened_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[tuple(labels[k] for k in keys)] += float(line.rsplit(" ", 1)[1])
    return out


def run(name: str, *, keep: bool, out: TextIO) -> int:
    require_root()
    lab = Lab(name)
    if lab.exists():
        raise LabError(f"a lab named {name!r} already exists: 'hostmesh lab down --name {name}' first, "
                       "or pick another with --name")
    say = lambda s="": print(s, file=out, flush=True)  # noqa: E731
    say(f"== bringing up lab {name!r}: 2 nodes x 2 pods, a control plane, a node agent on each node (iptables capture)")
    try:
        status = lab.up(2, 2, capture="iptables")
        for p in status["pods"]:
            say(f"   {p['node']}/{p['name']:<6} {p['address']:<11} test app: :8080 HTTP/1.1 + h2c, :9090 gRPC")
        svc = status["services"][0]
        say(f"   service {svc['namespace']}/{svc['name']} VIP {svc['vip']} ports {' '.join(svc['ports'])}, "
            f"{len(svc['endpoints'])} endpoints")

        src = "node1/pod-1"
        say()
        say(f"== {src} talks to pods on node2 by pod IP; the app does not know about the mesh")
        for dst in (p for p in status["pods"] if p["node"] == "node2"):
            url = f"http://{dst['address']}:8080/demo"
            h1 = _curl(lab, src, url)
            h2 = _curl(lab, src, url, "--http2-prior-knowledge")
            grpc = json.loads(_request(lab, src, [sys.executable, "-m", "meshlab.probe", "grpc",
                                                   f"{dst['address']}:9090", "--message", "hello"]))
            say(f"   {dst['address']}:8080 HTTP/1.1 -> {h1['node']}/{h1['pod']} (it saw the connection come from "
                f"{h1['source']['address']}: node2's proxy)")
            say(f"   {dst['address']}:8080 HTTP/2   -> {h2['node']}/{h2['pod']} over {h2['protocol']}")
            say(f"   {dst['address']}:9090 gRPC     -> {grpc['node']}/{grpc['pod']}: {grpc['message']!r}, "
                f"health {grpc['health']}")

        before = _opened(lab, "node1")
        say()
        say(f"== {VIP_REQUESTS} requests from {src} to the service VIP http://{svc['vip']}/ (round robin)")
        answered = Counter()
        for _ in range(VIP_REQUESTS):
            a = _curl(lab, src, f"http://{svc['vip']}/")
            answered[f"{a['node']}/{a['pod']}"] += 1
        for pod, n in sorted(answered.items()):
            say(f"   {pod:<12} {'#' * n} {n}")

        after = _opened(lab, "node1")
        say()
        say("== node1 agent counters (hostmesh_tcp_connections_opened_total, reporter=source) moved by:")
        for (reporter, workload), value in sorted(after.items()):
            delta = value - before.get((reporter, workload), 0)
            if reporter == "source" and delta:
                say(f"   destination_workload={workload:<12} +{delta:.0f}")
        say()
        say("== identity: every agent holds a certificate per local workload identity (from the control plane's CA)")
        for c in json.loads(mesh.admin_get(lab, "node1", "/certs").stdout):
            say(f"   node1 {c['identity']} serial {c['serial'][:12]}... valid until {c['not_after']}")
        say("   node2's inbound connections by security policy and client identity:")
        for (reporter, policy, principal), n in sorted(
                _opened(lab, "node2", "reporter", "connection_security_policy", "source_principal").items()):
            if reporter == "destination":
                say(f"   {policy:<10} from {principal:<45} {n:.0f}")
        say()
        cfg = mesh.cp_config_dir(lab)
        say(f"== live config change: edit {cfg}/services.yaml so testapp selects only node2's pods")
        mesh.write_config(lab, "services.yaml", [mesh.service_document(
            mesh.DEFAULT_SERVICE_NAME, mesh.DEFAULT_SERVICE_VIP, {"app": "testapp", "node": "node2"},
            [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"},
             {"name": "grpc", "port": 9090, "targetPort": 9090, "appProtocol": "grpc"}])])
        changed = time.monotonic()
        while True:
            pods = {f"{a['node']}/{a['pod']}" for a in (_curl(lab, src, f"http://{svc['vip']}/") for _ in range(4))}
            if pods <= {"node2/pod-1", "node2/pod-2"} or time.monotonic() - changed > 10:
                break
            time.sleep(0.05)
        say(f"   after {time.monotonic() - changed:.2f}s traffic goes only to: {', '.join(sorted(pods))}")
        agents = json.loads(mesh.cp_get(lab, "/debug/agents").stdout)
        for a in agents:
            say(f"   control plane: {a['node']} acked {a['acked_version']} "
                f"({'in sync' if a['in_sync'] else 'not in sync yet'})")

        capture = json.loads(mesh.admin_get(lab, "node1", "/capture").stdout)
        verified = (capture.get("last_verification") or {}).get("ok")
        say()
        say(f"== node1 capture: {capture.get('backend')} installed={capture.get('installed')} verified={verified}")
        say()
        say("== summary: pod traffic is captured transparently and balanced by the node proxies,")
        say("   crosses nodes over mTLS with per-workload identities, and a config edit reaches")
        say("   every node through the control plane")
        if keep:
            say(f"   the lab stays up: 'hostmesh lab status --name {name}', "
                f"'hostmesh lab exec --name {name} node1/pod-1 -- curl -s http://{svc['vip']}/', "
                f"'hostmesh lab exec --name {name} node1 -- curl -s 127.0.0.1:15000/stats/prometheus', "
                f"'hostmesh status --lab {name}', edit the YAML in {cfg}, "
                f"'hostmesh lab down --name {name}'")
        return 0
    finally:
        if not keep:
            lab.down()
            say(f"== lab {name!r} removed")
