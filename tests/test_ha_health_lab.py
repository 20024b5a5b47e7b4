"""Endpoint health across control-plane replicas (controlplane/healthsync.py), in an HA lab:
two replicas on a real etcd, node1's agent connected only to replica 0, node2's only to
replica 1. node1's agent finds one of its pods failing its health check; node2's agent,
whose replica never heard from node1, stops sending it traffic within a bound. Replica 0 is
then SIGKILLed: its entries in etcd lapse with its lease, and node2 sends traffic to the pod
again (a report nobody stands behind any more does not keep an endpoint out)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from meshlab import mesh, naming
from meshlab.etcdserver import ETCD
from meshlab.ha import HAControlPlane, replica_ip
from meshlab.lab import CONTROLPLANE, Lab
from tests.conftest import IN_CI, require_root, unique_lab_name, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

TTL = 3
CHECKED = "198.19.0.88"
CLIENT_POD = "node2/pod-1"
# which pod answers each of n requests to the checked Service (argv: host, n)
WHO = textwrap.dedent("""
    import http.client, json, sys
    out = []
    for _ in range(int(sys.argv[2])):
        c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
        try:
            c.request("GET", "/")
            r = c.getresponse()
            body = r.read()
            out.append(json.loads(body)["pod"] if r.status == 200 else f"status {r.status}")
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            out.append(type(exc).__name__)
        finally:
            c.close()
    print(json.dumps(out))
""")


def documents() -> list[dict]:
    """`checked`: node1's two pods only; pod-2 fails the check (the test app's pod knob)."""
    return [mesh.service_document("checked", CHECKED, {"app": "testapp", "node": "node1"},
                                  [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}]),
            {"apiVersion": "hostmesh.io/v1alpha1", "kind": "TrafficPolicy",
             "metadata": {"name": "checked", "namespace": "default"},
             "spec": {"targetRef": {"kind": "Service", "name": "checked"}, "healthCheck": {
                 "http": {"path": "/?pod=pod-2&status=503"}, "interval": "500ms", "timeout": "300ms",
                 "jitter": "0s", "unhealthyThreshold": 2, "healthyThreshold": 1, "panicThreshold": 0}}}]


@pytest.fixture(scope="module")
def ha_lab():
    require_root("the HA endpoint-health lab")
    if not os.path.exists(ETCD):
        if IN_CI:
            pytest.fail("etcd is not installed, and CI=true: ./quickstart installs etcd-server")
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    lab = Lab(unique_lab_name())
    try:
        lab.up(2, 2)
        mesh.write_default_config(lab)
        mesh.write_config(lab, "checked.yaml", documents())
        ha = HAControlPlane(lab, replicas=2, lease_ttl=TTL)
        ha.start()
        procs = {}
        for node, replica in (("node1", 0), ("node2", 1)):
            lab.control_plane_endpoints = [ha.endpoints[replica]]   # one replica each: no failover
            procs[node] = mesh.spawn_agent(lab, node, "iptables")
        lab.control_plane_endpoints = ha.endpoints
        for node, proc in procs.items():
            mesh.wait_ready(lab, node, proc)
        yield lab, ha
    finally:
        lab.down()


def failing(lab: Lab, node: str) -> set[str]:
    for c in json.loads(mesh.admin_get(lab, node, "/clusters").stdout or "[]"):
        if c["service"].startswith("checked."):
            return {e["workload"] for e in c["endpoints"] if e.get("healthCheck") == "failing"}
    return set()


def health_detail(lab: Lab, replica: int) -> dict:
    r = lab.run(CONTROLPLANE, ["curl", "-sS", "--fail-with-body", "--max-time", "3",
                               f"http://{replica_ip(replica)}:15014/debug/health?detail=1"], timeout=10)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def answering_pods(lab: Lab, n: int = 24) -> list[str]:
    r = lab.run(CLIENT_POD, [sys.executable, "-c", WHO, CHECKED, str(n)], timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_health_reported_to_one_replica_reaches_agents_of_the_other_and_lapses_with_its_lease(ha_lab):
    lab, ha = ha_lab
    for node, replica in (("node1", 0), ("node2", 1)):
        st = json.loads(mesh.admin_get(lab, node, "/config_dump").stdout)["control_plane"]
        assert st["connected"] and st["address"] == ha.endpoints[replica], st
    # node1 probes its pods (500 ms, 2 failures) and reports to replica 0 only
    wait_for(lambda: failing(lab, "node1") == {"node1-pod-2"}, timeout=15, what="node1 to find its pod-2 failing")
    found = time.monotonic()
    wait_for(lambda: failing(lab, "node2") == {"node1-pod-2"}, timeout=5,
             what="node2 (on replica 1) to learn node1's report through etcd")
    assert time.monotonic() - found < 2.0
    detail = health_detail(lab, 1)["nodes"]["node1"]
    assert detail["source"] == "etcd" and detail["etcd"]["replica"] == "cp0" and "local" not in detail
    assert detail["unhealthy"] == [f"default/checked {naming.pod_ip(1, 2)}:8080"]
    assert set(answering_pods(lab)) == {"pod-1"}      # node1's pod-2 gets nothing from node2
    # replica 0 dies; node1's agent knows no other, so nobody stands behind the report any more
    ha.kill(0)
    killed = time.monotonic()
    wait_for(lambda: not failing(lab, "node2"), timeout=TTL + 5, what="replica 0's health entries to lapse")
    assert time.monotonic() - killed <= TTL + 2.5
    assert "node1" not in health_detail(lab, 1)["nodes"]
    wait_for(lambda: "pod-2" in answering_pods(lab, 12), timeout=10, what="node1's pod-2 to get traffic again")
