"""`hostmesh demo`: a guided tour on a throwaway lab. It grows as features land."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from meshlab.errors import LabError
from meshlab.lab import Lab, require_root


def _request(lab: Lab, source: str, argv: list[str]) -> str:
    proc = lab.run(source, argv, timeout=20)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} from {source} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def run(name: str, *, keep: bool, out: TextIO) -> int:
    require_root()
    lab = Lab(name)
    if lab.exists():
        raise LabError(f"a lab named {name!r} already exists: 'hostmesh lab down --name {name}' first, "
                       "or pick another with --name")
    say = lambda s="": print(s, file=out, flush=True)  # noqa: E731
    say(f"== bringing up lab {name!r}: 2 nodes x 2 pods, each pod in its own network namespace and cgroup")
    try:
        status = lab.up(2, 2)
        for p in status["pods"]:
            say(f"   {p['node']}/{p['name']:<6} {p['address']:<14} test app on :8080 (HTTP/1.1, h2c) and :9090 (gRPC)")
        src = "node1/pod-1"
        rows = []
        for dst in (p for p in status["pods"] if p["node"] == "node2"):
            url = f"http://{dst['address']}:8080/demo"
            h1 = json.loads(_request(lab, src, ["curl", "-sS", "--max-time", "5", url]))
            h2 = json.loads(_request(lab, src, ["curl", "-sS", "--max-time", "5", "--http2-prior-knowledge", url]))
            grpc = json.loads(_request(lab, src, [sys.executable, "-m", "meshlab.probe", "grpc",
                                                   f"{dst['address']}:9090", "--message", "hello"]))
            rows.append((dst, h1, h2, grpc))
        say()
        say(f"== traffic from {src} to the pods on node2 (plain routing across the fabric, no mesh yet)")
        for dst, h1, h2, grpc in rows:
            say(f"   {dst['address']}:8080 HTTP/1.1 -> answered by {h1['node']}/{h1['pod']}, saw source {h1['source']['address']}")
            say(f"   {dst['address']}:8080 HTTP/2   -> answered by {h2['node']}/{h2['pod']} over {h2['protocol']}")
            say(f"   {dst['address']}:9090 gRPC     -> answered by {grpc['node']}/{grpc['pod']}: {grpc['message']!r}")
        say()
        say("== summary: cross-node pod-to-pod traffic works over HTTP/1.1, h2c and gRPC")
        if keep:
            say(f"   the lab stays up: 'hostmesh lab status --name {name}', "
                f"'hostmesh lab exec --name {name} node1/pod-1 -- curl -s http://198.18.2.1:8080/', "
                f"'hostmesh lab down --name {name}'")
        return 0
    finally:
        if not keep:
            lab.down()
            say(f"== lab {name!r} removed")
