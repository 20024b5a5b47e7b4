"""Agent restarts and upgrades under load, over both capture backends: the successor
takes the listeners over (nodeagent/handoff.py), the predecessor drains; clients see no
failed request and no refused connection, and the fabric carries no plaintext and nothing
that went around the proxy.

A client in node1/pod-1 runs meshlab.restartload: HTTP/1.1 keep-alive and new connections
to the testapp VIP (same-node and cross-node endpoints), back-to-back TCP echo streams to
node2/pod-1 (cross-node, through the mTLS tunnel), and gRPC bidi streams to the VIP. Both
agents are restarted in turn; every fifth restart is an upgrade: the agent runs from a
copy of the sources whose build differs (another agent digest, other eBPF programs, so
the eBPF backend swaps its programs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshlab import mesh, naming
from meshlab.lab import Lab
from tests.conftest import require_root, unique_lab_name, wait_for
from tests.test_mtls_mesh_lab import FabricCapture

pytestmark = [pytest.mark.lab, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
VIP = "198.19.0.10"
ECHO_PORT = 7000
POD2 = naming.pod_ip(2, 1)
RESTARTS = 20
UPGRADES = 5


@pytest.fixture(scope="module", params=[("iptables", 2), ("ebpf", 2), ("iptables", 1)],
                ids=["iptables-workers2", "ebpf-workers2", "iptables-inprocess"])
def restart_lab(request):
    require_root("the restart lab tests")
    capture, workers = request.param
    lab = Lab(unique_lab_name())
    lab.workers = workers
    try:
        lab.up(2, 2, capture=capture)
        lab.capture = capture
        lab.spawn(lab.target("node2/pod-1"), [sys.executable, "-m", "meshlab.tcptools", "serve", "--port",
                                               str(ECHO_PORT)], "echo-node2-pod-1")
        wait_for(lambda: lab.run("node2/pod-1", ["ss", "-Hltn", f"sport = :{ECHO_PORT}"]).stdout.strip() != "",
                 what="the echo server")
        yield lab
    finally:
        lab.down()


def build_copy(root: Path, n: int) -> dict[str, str]:
    """Another build of the agent: the same sources with a marker in the agent package and
    in the eBPF programs' shared header, so both the build id and the eBPF build id change."""
    dest = root / f"build-{n}"
    if not dest.exists():
        for pkg in ("hostmesh", "nodeagent", "controlplane", "meshlab", "bpf"):
            shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        with open(dest / "nodeagent" / "__init__.py", "a") as f:
            f.write(f"\n# upgrade test build {n}\n")
        header = sorted((dest / "bpf" / "lib").glob("*.h"))[0]
        with open(header, "a") as f:
            f.write(f"\n/* upgrade test build {n} */\n")
    return {"PYTHONPATH": str(dest), "HOSTMESH_BPF_DIR": str(dest / "bpf")}


def server_info(lab: Lab, node: str) -> dict:
    return json.loads(mesh.admin_get(lab, node, "/server_info").stdout)


def no_agent_left_but(lab: Lab, node: str, pid: int, timeout: float = 30) -> None:
    wait_for(lambda: mesh.agent_pids(lab, node) == [pid], timeout=timeout,
             what=f"the predecessors on {node} to finish draining")


def test_restarts_and_upgrades_under_load_drop_nothing_and_bypass_nothing(restart_lab, tmp_path):
    lab = restart_lab
    stop_file, ready_file = tmp_path / "stop", tmp_path / "ready"
    load = lab.spawn(lab.target("node1/pod-1"), [
        sys.executable, "-m", "meshlab.restartload", "--http", f"{VIP}:80", "--tcp", f"{POD2}:{ECHO_PORT}",
        "--grpc", f"{VIP}:9090", "--stop-file", str(stop_file), "--ready-file", str(ready_file),
        "--max-seconds", "300", "--rate", "20", "--stream-seconds", "2"], "restartload")
    captures = {}
    try:
        wait_for(ready_file.exists, timeout=30, what="every load client's first success")
        for node in ("node1", "node2"):
            captures[node] = FabricCapture(lab.names.node_ns(node), tmp_path / f"{node}.pcap")
        generations = {node: server_info(lab, node)["generation"] for node in ("node1", "node2")}
        first = dict(generations)
        for i in range(1, RESTARTS + UPGRADES + 1):
            node = "node1" if i % 2 else "node2"
            upgrade = i % 5 == 0
            # an upgrade runs another build; the restart after it goes back to the repo's (a downgrade)
            env = build_copy(tmp_path, i) if upgrade else None
            pid = mesh.restart_agent(lab, node, lab.capture, env=env)
            info = server_info(lab, node)
            generations[node] += 1
            assert info["pid"] == pid and info["generation"] == generations[node], info
            assert info["predecessor"] is not None, info
            if upgrade:
                assert info["build"] != info["predecessor"]["build"], info
            time.sleep(0.5)
        for node in ("node1", "node2"):
            no_agent_left_but(lab, node, server_info(lab, node)["pid"])
        time.sleep(2.5)  # a whole stream of each kind on the last agents
    finally:
        stop_file.write_text("stop\n")
        load.wait(timeout=60)
        for cap in captures.values():
            cap.stop()
    result = json.loads(Path(lab.names.run_dir, "logs", "restartload.log").read_text().strip().splitlines()[-1])
    for kind, tally in result.items():
        assert tally["failed"] == 0, (kind, tally)
        assert tally["ok"] > 0, (kind, tally)
    assert result["keepalive"]["ok"] + result["fresh"]["ok"] > 20 * (RESTARTS + UPGRADES) * 0.5 * 2
    for node, cap in captures.items():
        # between nodes only the tunnel (15008) and the control plane; never a pod port in the clear
        # nor a VIP (a VIP on the fabric went around the proxy)
        assert cap.count(f"tcp and not port 15008 and not host {naming.CONTROLPLANE_IP}") == 0, node
        assert cap.count("tcp and net 198.19.0.0/16") == 0, node
        assert cap.count("tcp port 15008") > 0, node
    for node in ("node1", "node2"):
        metrics = mesh.admin_get(lab, node, "/metrics").stdout
        assert f"hostmesh_agent_handoffs_total {float(generations[node] - first[node])}" in metrics
        assert f"hostmesh_agent_generation {float(generations[node])}" in metrics


def test_sigkill_during_a_handoff_leaves_the_old_agent_serving(restart_lab):
    """A successor killed while it waits for its turn changes nothing."""
    lab = restart_lab
    before = server_info(lab, "node1")
    cfg = mesh.agent_bootstrap(lab, "node1", lab.capture)
    # a successor whose control plane answers nothing: it waits (up to handoff.timeout) for config
    doc = cfg.read_text().replace(mesh.CP_GRPC, "127.0.0.1:1")
    broken = cfg.with_name("agent-node1-nocp.yaml")
    broken.write_text(doc)
    state = Path(lab.names.run_dir, "state", "node1", "snapshot.json")
    saved = state.read_bytes()
    state.unlink()  # nothing persisted either
    try:
        proc = lab.spawn(lab.target("node1"), [sys.executable, "-m", "hostmesh.cli", "agent", "--config",
                                                str(broken)], "agent-node1-nocp")
        wait_for(lambda: len(mesh.agent_pids(lab, "node1")) == 2, what="the successor")
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        state.write_bytes(saved)
    after = server_info(lab, "node1")
    assert after["pid"] == before["pid"] and after["state"] == "LIVE"
    r = lab.run("node1/pod-2", ["curl", "-sS", "--max-time", "5", f"http://{VIP}/"])
    assert r.returncode == 0, r.stderr
    metrics = mesh.admin_get(lab, "node1", "/metrics").stdout
    assert 'hostmesh_agent_handoff_failures_total{reason="aborted"}' in metrics


def test_a_killed_worker_is_restarted_while_the_others_serve(restart_lab, tmp_path):
    lab = restart_lab
    if lab.workers < 2:
        pytest.skip("needs worker processes")
    before = server_info(lab, "node1")
    (victim, *_rest) = [p for p in before["workers"]["processes"] if p["state"] == "serving"]
    cap = FabricCapture(lab.names.node_ns("node1"), tmp_path / "node1.pcap")
    try:
        os.kill(victim["pid"], signal.SIGKILL)
        t_end = time.monotonic() + 3.0
        codes = []
        while time.monotonic() < t_end:  # new connections keep working: the other worker accepts them
            r = lab.run("node1/pod-1", ["curl", "-sS", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code}",
                                        "--max-time", "5",
                                        f"http://{VIP}/", f"http://{POD2}:8080/"])
            codes.append(r.stdout)
        assert set(codes) == {"200200"}, codes
        wait_for(lambda: any(p.get("pid") not in (None, victim["pid"]) and p["state"] == "serving"
                             and p["index"] == victim["index"]
                             for p in server_info(lab, "node1")["workers"]["processes"]),
                 timeout=30, what="the killed worker to be started again")
    finally:
        cap.stop()
    after = server_info(lab, "node1")
    assert after["pid"] == before["pid"]  # the agent itself, and so capture, untouched
    assert cap.count(f"tcp and not port 15008 and not host {naming.CONTROLPLANE_IP}") == 0
    metrics = mesh.admin_get(lab, "node1", "/metrics").stdout
    assert "hostmesh_agent_worker_restarts_total 1.0" in metrics
    assert "hostmesh_agent_workers_serving 2.0" in metrics
