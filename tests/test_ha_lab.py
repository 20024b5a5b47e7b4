"""Two control-plane replicas on a real etcd, agents on a 2-node lab: SIGKILL the leader
during steady traffic. A new leader is elected within the lease TTL, agents fail over to
the surviving replica, no request fails meanwhile (agents serve their last-known-good
config), and config changes applied to etcd reach the agents again after the failover."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from meshlab import mesh, naming
from meshlab.etcdserver import ETCD
from meshlab.ha import HAControlPlane, replica_ip
from meshlab.lab import Lab
from tests.conftest import IN_CI, require_root, unique_lab_name, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

VIP = mesh.DEFAULT_SERVICE_VIP
NEW_VIP = "198.19.0.77"
ECHO_PORT = 7000
POD2 = naming.pod_ip(2, 1)
TTL = 3


@pytest.fixture(scope="module")
def ha_lab():
    require_root("the HA control-plane lab")
    if not os.path.exists(ETCD):
        if IN_CI:
            pytest.fail("etcd is not installed, and CI=true: ./quickstart installs etcd-server")
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    lab = Lab(unique_lab_name())
    try:
        lab.up(2, 2)
        mesh.write_default_config(lab)
        ha = HAControlPlane(lab, replicas=2, lease_ttl=TTL)
        ha.start()
        procs = {node: mesh.spawn_agent(lab, node, "iptables") for node in lab.topology()}
        for node, proc in procs.items():
            mesh.wait_ready(lab, node, proc)
        lab.spawn(lab.target("node2/pod-1"), [sys.executable, "-m", "meshlab.tcptools", "serve", "--port",
                                               str(ECHO_PORT)], "echo-node2-pod-1")
        wait_for(lambda: lab.run("node2/pod-1", ["ss", "-Hltn", f"sport = :{ECHO_PORT}"]).stdout.strip() != "",
                 what="the echo server")
        yield lab, ha
    finally:
        lab.down()


def cp_status(lab: Lab, node: str) -> dict:
    return json.loads(mesh.admin_get(lab, node, "/config_dump").stdout)["control_plane"]


def has_service(lab: Lab, node: str, name: str) -> bool:
    snap = json.loads(mesh.admin_get(lab, node, "/config_dump").stdout)["snapshot"]
    return any(s["name"] == name for s in snap["services"])


def curl_ok(lab: Lab, url: str) -> bool:
    r = lab.run("node1/pod-1", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url])
    return r.stdout == "200"


def test_agents_know_every_replica_and_exactly_one_leads(ha_lab):
    lab, ha = ha_lab
    wait_for(lambda: ha.leader() is not None, timeout=10, what="a leader")
    for node in lab.topology():
        st = cp_status(lab, node)
        assert st["endpoints"] == ha.endpoints and st["connected"], st
    views = [ha.view(i) for i in range(ha.replicas)]
    assert sum(v["election"]["leading"] for v in views) == 1
    assert len({v["model_version"] for v in views}) == 1
    assert all(v["source"]["kind"] == "etcd" and v["source"]["connected"] for v in views)


def test_sigkill_of_the_leader_fails_over_without_a_failed_request(ha_lab, tmp_path):
    lab, ha = ha_lab
    stop_file, ready_file = tmp_path / "stop", tmp_path / "ready"
    load = lab.spawn(lab.target("node1/pod-1"), [
        sys.executable, "-m", "meshlab.restartload", "--http", f"{VIP}:80", "--tcp", f"{POD2}:{ECHO_PORT}",
        "--grpc", f"{VIP}:9090", "--stop-file", str(stop_file), "--ready-file", str(ready_file),
        "--max-seconds", "120", "--rate", "20", "--stream-seconds", "2"], "ha-load")
    try:
        wait_for(ready_file.exists, timeout=30, what="every load client's first success")
        wait_for(lambda: ha.leader() is not None, timeout=10, what="a leader")
        leader = ha.leader()
        survivor = next(i for i in range(ha.replicas) if i != leader)
        # the agents are on the leader (replica 0: started first, dialled first), so the kill
        # costs them their stream as well as the election its leader
        leader_ep = f"{replica_ip(leader)}:15010"
        assert leader == 0 and all(cp_status(lab, n)["address"] == leader_ep for n in lab.topology())
        failovers = {n: cp_status(lab, n)["failovers"] for n in lab.topology()}
        killed_at = time.monotonic()
        ha.kill(leader)
        wait_for(lambda: ha.leader() == survivor, timeout=TTL + 3, what="the survivor to lead")
        took = time.monotonic() - killed_at
        assert took <= TTL + 1.5, took
        survivor_ep = f"{replica_ip(survivor)}:15010"
        for node in lab.topology():
            wait_for(lambda: (st := cp_status(lab, node))["connected"] and st["address"] == survivor_ep,
                     timeout=15, what=f"{node} to fail over to {survivor_ep}")
            assert cp_status(lab, node)["failovers"] > failovers[node]
        # config changes work again after the failover: a new Service reaches the agents
        new = mesh.service_document("ha-new", NEW_VIP, {"app": "testapp"},
                                    [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}])
        d = mesh.cp_config_dir(lab)
        (d / "ha-new.yaml").write_text(yaml.safe_dump(new))
        ha.apply(d)
        applied = time.monotonic()
        for node in lab.topology():
            wait_for(lambda: has_service(lab, node, "ha-new"), timeout=5, what=f"{node} to get the new Service")
        assert time.monotonic() - applied < 1.0     # etcd -> replica -> agents within a second
        wait_for(lambda: curl_ok(lab, f"http://{NEW_VIP}/"), timeout=10, what="the new Service to serve")
        # the killed replica comes back as a follower
        ha.start_replica(leader)
        wait_for(lambda: (v := ha.view(leader)) is not None and v["model_version"] == ha.view(survivor)["model_version"],
                 timeout=10, what="the restarted replica to catch up")
        assert ha.leader() == survivor
        time.sleep(2.5)
    finally:
        stop_file.write_text("stop\n")
        load.wait(timeout=60)
    result = json.loads(Path(lab.names.run_dir, "logs", "ha-load.log").read_text().strip().splitlines()[-1])
    for kind, tally in result.items():
        assert tally["failed"] == 0, (kind, tally)
        assert tally["ok"] > 0, (kind, tally)
    status = json.loads(lab.run("controlplane", ["curl", "-sf", f"http://{replica_ip(survivor)}:15014/debug/config"]
                                ).stdout)
    assert status["election"]["leading"]
