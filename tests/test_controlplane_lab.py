"""The control plane in the lab: file edits reach every agent and traffic follows; broken
files change nothing and say why; agents survive the control plane's death, resync when it
returns, start from disk while it is away; a NACK leaves the agent on its version."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from meshlab import mesh
from meshlab.lab import Lab
from tests.conftest import HOSTMESH, require_root, unique_lab_name, wait_for

pytestmark = pytest.mark.lab

VIP = "198.19.0.40"


@pytest.fixture(scope="module")
def cp_lab():
    require_root("the control-plane lab tests")
    lab = Lab(unique_lab_name())
    lab.capture = "iptables"
    try:
        lab.up(2, 2, capture="iptables")
        yield lab
    finally:
        lab.down()


def pods_answering(lab, url, n=12, src="node1/pod-1", strict=True):
    """Which pods answer `n` requests; with strict=False a failed request counts as 'error'."""
    seen = set()
    for _ in range(n):
        r = lab.run(src, ["curl", "-sS", "--max-time", "5", url])
        if r.returncode != 0 and not strict:
            seen.add("error")
            continue
        assert r.returncode == 0, r.stderr
        a = json.loads(r.stdout)
        seen.add(f"{a['node']}/{a['pod']}")
    return seen


def set_selector(lab, selector):
    mesh.write_config(lab, "web.yaml", [mesh.service_document(
        "web", VIP, selector, [{"name": "http", "port": 80, "targetPort": 8080}])])


def agent_version(lab, node):
    return json.loads(mesh.admin_get(lab, node, "/server_info").stdout)["snapshot_version"]


def cp_status(lab):
    r = subprocess.run([HOSTMESH, "status", "--lab", lab.name, "-o", "json"], capture_output=True, text=True,
                       timeout=30)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip().startswith("{") else r.stderr


def in_sync(lab):
    code, st = cp_status(lab)
    return code == 0 and all(a["in_sync"] for a in st["agents"])


def test_edit_changes_where_traffic_goes(cp_lab):
    lab = cp_lab
    set_selector(lab, {"app": "testapp", "node": "node2"})
    wait_for(lambda: pods_answering(lab, f"http://{VIP}/", 4, strict=False) == {"node2/pod-1", "node2/pod-2"},
             what="the new service to reach node2's pods")
    assert pods_answering(lab, f"http://{VIP}/") == {"node2/pod-1", "node2/pod-2"}
    set_selector(lab, {"app": "testapp", "pod": "pod-1"})
    wait_for(lambda: pods_answering(lab, f"http://{VIP}/", 6, strict=False) == {"node1/pod-1", "node2/pod-1"},
             what="the selector change to reach traffic")
    wait_for(lambda: in_sync(lab), what="every agent to ACK")


def test_established_connection_survives_an_endpoint_change(cp_lab):
    lab = cp_lab
    set_selector(lab, {"app": "testapp", "node": "node2", "pod": "pod-2"})
    wait_for(lambda: pods_answering(lab, f"http://{VIP}/", 3, strict=False) == {"node2/pod-2"}, what="web -> node2/pod-2")
    # a slow download through the VIP keeps one connection open across the change
    result = {}

    def download():
        result["r"] = lab.run("node1/pod-2", ["curl", "-sS", "--max-time", "20", "-o", "/dev/null",
                                              "-w", "%{size_download}", "--limit-rate", "2M",
                                              f"http://{VIP}/?size=6M"], timeout=30)
    t = threading.Thread(target=download)
    t.start()
    time.sleep(0.5)
    set_selector(lab, {"app": "testapp", "node": "node1", "pod": "pod-1"})
    wait_for(lambda: pods_answering(lab, f"http://{VIP}/", 3, strict=False) == {"node1/pod-1"}, what="web -> node1/pod-1")
    t.join(40)
    assert result["r"].returncode == 0, result["r"].stderr
    assert result["r"].stdout == str(6 << 20)


def test_broken_file_changes_nothing_and_says_why(cp_lab):
    lab = cp_lab
    set_selector(lab, {"app": "testapp", "pod": "pod-2"})
    wait_for(lambda: pods_answering(lab, f"http://{VIP}/", 6, strict=False) == {"node1/pod-2", "node2/pod-2"},
             what="web -> the pod-2s")
    wait_for(lambda: in_sync(lab), what="sync")
    versions = {n: agent_version(lab, n) for n in ("node1", "node2")}
    bad = mesh.cp_config_dir(lab) / "broken.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec:\n  ports:\n  - port: 99999\n")
    try:
        wait_for(lambda: cp_status(lab)[0] == 1, what="status to report the error")
        code, st = cp_status(lab)
        messages = [e["message"] for e in st["config"]["errors"]]
        assert any("broken.yaml" in m and "Service default/broken" in m and "spec.ports[0].port" in m
                   for m in messages), messages
        human = subprocess.run([HOSTMESH, "status", "--lab", lab.name], capture_output=True, text=True, timeout=30)
        assert human.returncode == 1 and "INVALID" in human.stdout and "broken.yaml" in human.stdout
        time.sleep(1.0)
        assert {n: agent_version(lab, n) for n in ("node1", "node2")} == versions
        assert pods_answering(lab, f"http://{VIP}/", 4) == {"node1/pod-2", "node2/pod-2"}
        metrics = mesh.cp_get(lab, "/metrics").stdout
        assert "hostmesh_controlplane_config_valid 0.0" in metrics
    finally:
        bad.unlink()
    wait_for(lambda: cp_status(lab)[0] == 0, what="the config to be valid again")


def test_nack_keeps_the_agent_on_its_version(cp_lab):
    lab = cp_lab
    wait_for(lambda: in_sync(lab), what="sync")
    before = agent_version(lab, "node1")
    # valid for the control plane, but outside node1's pod CIDR: only node1's agent can tell
    mesh.write_config(lab, "stray.yaml", [{
        "apiVersion": "hostmesh.io/v1alpha1", "kind": "Workload",
        "metadata": {"name": "stray", "namespace": "default", "labels": {"app": "stray"}},
        "spec": {"node": "node1", "address": "198.18.2.77"}}])
    try:
        def nacked():
            code, st = cp_status(lab)
            node1 = next(a for a in st["agents"] if a["node"] == "node1")
            return code == 1 and "outside this node's pod CIDRs" in node1["last_nack_error"]
        wait_for(nacked, what="node1's NACK in hostmesh status")
        assert agent_version(lab, "node1") == before
        human = subprocess.run([HOSTMESH, "status", "--lab", lab.name], capture_output=True, text=True, timeout=30)
        assert "outside this node's pod CIDRs" in human.stdout
    finally:
        (mesh.cp_config_dir(lab) / "stray.yaml").unlink()
    wait_for(lambda: in_sync(lab), what="sync after the fix")


def kill(pids, sig):
    for pid in pids:
        os.kill(pid, sig)


def test_controlplane_death_and_return(cp_lab):
    lab = cp_lab
    set_selector(lab, {"app": "testapp", "node": "node2"})
    wait_for(lambda: pods_answering(lab, f"http://{VIP}/", 6, strict=False) == {"node2/pod-1", "node2/pod-2"},
             what="web -> node2")
    wait_for(lambda: in_sync(lab), what="sync")
    kill(mesh.controlplane_pids(lab), signal.SIGKILL)
    wait_for(lambda: not mesh.controlplane_running(lab), what="the control plane to die")
    # traffic continues on the last good config
    assert pods_answering(lab, f"http://{VIP}/", 4) == {"node2/pod-1", "node2/pod-2"}
    wait_for(lambda: "stale config since" in mesh.admin_get(lab, "node1", "/ready").stdout, what="stale on /ready")
    assert "hostmesh_agent_config_stale 1.0" in mesh.admin_get(lab, "node1", "/stats/prometheus").stdout

    # an agent restarted while the control plane is down serves from disk
    kill(mesh.agent_pids(lab, "node1"), signal.SIGTERM)
    wait_for(lambda: not mesh.agent_running(lab, "node1"), what="the agent to stop")
    proc = mesh.spawn_agent(lab, "node1", "iptables")
    mesh.wait_ready(lab, "node1", proc)
    assert "stale config since" in mesh.admin_get(lab, "node1", "/ready").stdout
    assert pods_answering(lab, f"http://{VIP}/", 4) == {"node2/pod-1", "node2/pod-2"}

    # edits made while it was away apply once it is back; agents resync
    set_selector(lab, {"app": "testapp", "node": "node1"})
    mesh.start_controlplane(lab)
    wait_for(lambda: pods_answering(lab, f"http://{VIP}/", 4, strict=False) == {"node1/pod-1", "node1/pod-2"},
             timeout=30, what="agents to resync")
    wait_for(lambda: in_sync(lab), timeout=30, what="every agent to ACK")
    assert "stale" not in mesh.admin_get(lab, "node1", "/ready").stdout


def test_lab_status_shows_controlplane_and_services(cp_lab):
    r = subprocess.run([HOSTMESH, "lab", "status", "--name", cp_lab.name, "-o", "json"], capture_output=True,
                       text=True, timeout=30)
    st = json.loads(r.stdout)
    assert st["controlplane"]["running"] and st["controlplane"]["address"] == "198.18.0.2"
    assert st["controlplane"]["config_dir"].endswith("/controlplane")
    assert any(s["name"] == "testapp" and s["vip"] == "198.19.0.10" for s in st["services"])
