"""The agent process: bad input fails clearly with nothing installed; readiness follows
config and capture; config changes apply, broken ones keep the last good snapshot;
drain and quit through the admin endpoint; a stop leaves capture installed (fail closed),
the next agent adopts it, and `hostmesh agent --uninstall` removes it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshlab import mesh
from meshlab.lab import Lab
from tests.conftest import HOSTMESH, require_root, unique_lab_name, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def node_lab():
    require_root("the agent lifecycle tests")
    lab = Lab(unique_lab_name())
    try:
        lab.up(1, 1)
        workloads = mesh.lab_workloads(lab)
        mesh.write_snapshots(lab, mesh.default_services(workloads), workloads)
        yield lab
    finally:
        lab.down()


def bootstrap(lab: Lab, **changes) -> Path:
    path = mesh.agent_bootstrap(lab, "node1", "iptables", static=True)
    doc = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            doc.setdefault(section, {})[field] = value
        elif value is None:
            doc.pop(section, None)
        else:
            doc[section] = value
    out = path.with_name("agent-test.yaml")
    out.write_text(yaml.safe_dump(doc))
    return out


def run_agent(lab: Lab, *args: str, env_path: str | None = None) -> subprocess.CompletedProcess:
    argv = [HOSTMESH, "agent", *args]
    if env_path is not None:
        argv = ["env", f"PATH={env_path}", *argv]
    return lab.run("node1", argv, timeout=60)


def no_capture_installed(lab: Lab) -> bool:
    return "HOSTMESH" not in lab.run("node1", ["iptables-save"]).stdout


def start(lab: Lab, cfg: Path) -> subprocess.Popen:
    return lab.spawn(lab.target("node1"), [HOSTMESH, "agent", "--config", str(cfg)], "agent-test")


def admin(lab, path, method="GET"):
    return mesh.admin_get(lab, "node1", path, method)


@pytest.mark.parametrize("host,port,message", [
    ("0.0.0.0", 15001, "cannot listen on 0.0.0.0:15001: address already in use"),
    ("127.0.0.1", 15000, "admin endpoint: cannot listen on 127.0.0.1:15000: address already in use"),
])
def test_port_in_use(node_lab, host, port, message):
    lab = node_lab
    holder = lab.spawn(lab.target("node1"), [sys.executable, "-c",
                       f"import socket,time; s=socket.socket(); s.bind(('{host}',{port})); s.listen(); time.sleep(60)"],
                       "port-holder")
    try:
        wait_for(lambda: f":{port}" in lab.run("node1", ["ss", "-ltn"]).stdout, what="the port holder")
        r = run_agent(lab, "--config", str(bootstrap(lab)))
        assert r.returncode == 1
        assert message in r.stderr
        assert no_capture_installed(lab)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("changes,message", [
    ({"capture.mode": "magic"}, "capture.mode: 'magic' is not a capture mode (valid: iptables, ebpf, auto, none)"),
    ({"capture.podCIDRs": ["198.18.1.0/33"]}, "capture.podCIDRs[0]: '198.18.1.0/33' is not an IPv4 CIDR"),
    ({"proxy": {"outboundPort": "x"}}, "proxy.outboundPort: must be an integer, got 'x'"),
    ({"nodes": "node1"}, "nodes: unknown field"),
])
def test_malformed_bootstrap(node_lab, changes, message):
    r = run_agent(node_lab, "--config", str(bootstrap(node_lab, **changes)))
    assert r.returncode == 1
    assert message in r.stderr
    assert no_capture_installed(node_lab)


def test_unknown_flag(node_lab):
    r = run_agent(node_lab, "--node", "node1", "--frobnicate")
    assert r.returncode == 2 and "--frobnicate" in r.stderr


def test_invalid_snapshot_at_start(node_lab):
    bad = Path(node_lab.names.run_dir, "config", "bad-snapshot.json")
    bad.write_text(json.dumps({"node": "node1", "services": [{"name": "x", "cluster_ip": "1.2.3", "ports": []}]}))
    r = run_agent(node_lab, "--config", str(bootstrap(node_lab, snapshotFile=str(bad))))
    assert r.returncode == 1
    assert "services[0].cluster_ip: '1.2.3' is not an IPv4 address" in r.stderr
    assert no_capture_installed(node_lab)


def test_capture_the_host_cannot_provide(node_lab):
    """Without iptables on PATH the backend cannot install: clear error, nothing installed."""
    venv_bin = str(Path(HOSTMESH).parent)
    r = run_agent(node_lab, "--config", str(bootstrap(node_lab)), env_path=f"{venv_bin}:/bin")
    assert r.returncode == 1
    assert "iptables" in r.stderr
    assert no_capture_installed(node_lab)


def test_readiness_config_changes_and_quit(node_lab):
    lab = node_lab
    snap = Path(lab.names.run_dir, "config", "late-snapshot.json")
    snap.unlink(missing_ok=True)
    proc = start(lab, bootstrap(lab, snapshotFile=str(snap)))
    try:
        # the admin endpoint answers while the agent is still starting; then it waits for config
        wait_for(lambda: "no config received yet" in admin(lab, "/ready").stdout, what="not ready: no config")
        assert admin(lab, "/ready").returncode != 0
        good = json.loads(Path(lab.names.run_dir, "config", "snapshot-node1.json").read_text())
        snap.write_text(json.dumps(good))
        wait_for(lambda: admin(lab, "/ready").returncode == 0, what="ready after the snapshot appeared")
        version = json.loads(admin(lab, "/server_info").stdout)["snapshot_version"]

        snap.write_text('{"node": "node1", "services": [{"name": "oops"}]}')
        wait_for(lambda: json.loads(admin(lab, "/config_dump").stdout)["snapshot_error"], what="the error to show")
        dump = json.loads(admin(lab, "/config_dump").stdout)
        assert "services[0]: missing field(s) cluster_ip, ports" in dump["snapshot_error"]
        assert json.loads(admin(lab, "/server_info").stdout)["snapshot_version"] == version
        assert admin(lab, "/ready").returncode == 0  # the last good snapshot stays in force
        assert "hostmesh_agent_config_errors_total 1.0" in admin(lab, "/stats/prometheus").stdout
        answer = lab.run("node1/pod-1", ["curl", "-sS", "--max-time", "5", "http://198.19.0.10/"])
        assert json.loads(answer.stdout)["pod"] == "pod-1"

        r = admin(lab, "/quitquitquit", "POST")
        assert r.returncode == 0
        assert proc.wait(timeout=20) == 0
        assert_stopped_agent_fails_closed(lab)
    finally:
        proc.kill()
        proc.wait()
        uninstall_ok(lab, bootstrap(lab, snapshotFile=str(snap)))


def test_drain_refuses_new_connections_and_keeps_failing_closed(node_lab):
    lab = node_lab
    proc = start(lab, bootstrap(lab))
    try:
        wait_for(lambda: admin(lab, "/ready").returncode == 0, what="ready")
        assert admin(lab, "/drain").returncode != 0  # GET on a mutation is refused (405)
        assert admin(lab, "/drain", "POST").returncode == 0
        wait_for(lambda: "draining" in admin(lab, "/ready").stdout, what="draining on /ready")
        r = lab.run("node1/pod-1", ["curl", "-sS", "--max-time", "5", "http://198.19.0.10/"])
        assert r.returncode == 7  # refused while draining, never bypassed
        assert not no_capture_installed(lab)
        refused = run_agent(lab, "--config", str(bootstrap(lab)), "--uninstall")
        assert refused.returncode != 0 and "an agent is running with state directory" in refused.stderr, refused
        assert not no_capture_installed(lab)
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert_stopped_agent_fails_closed(lab)
    uninstall_ok(lab, bootstrap(lab))


def test_sigterm_keeps_capture_and_the_next_agent_adopts_it(node_lab):
    lab = node_lab
    cfg = bootstrap(lab)
    proc = start(lab, cfg)
    try:
        wait_for(lambda: admin(lab, "/ready").returncode == 0, what="ready")
        assert json.loads(admin(lab, "/server_info").stdout)["capture_adopted"] is False  # a clean node
        rules = sorted(lab.run("node1", ["iptables-save"]).stdout.splitlines())
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        assert_stopped_agent_fails_closed(lab)
        proc = start(lab, cfg)
        wait_for(lambda: admin(lab, "/ready").returncode == 0, what="the next agent ready")
        assert json.loads(admin(lab, "/server_info").stdout)["capture_adopted"] is True
        assert "hostmesh_agent_capture_adopted 1.0" in admin(lab, "/stats/prometheus").stdout
        answer = lab.run("node1/pod-1", ["curl", "-sS", "--max-time", "5", "http://198.19.0.10/"])
        assert answer.returncode == 0 and json.loads(answer.stdout)["pod"] == "pod-1"
        now = sorted(lab.run("node1", ["iptables-save"]).stdout.splitlines())
        assert [r for r in now if "HOSTMESH" in r] == [r for r in rules if "HOSTMESH" in r]  # adopted, not doubled
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        uninstall_ok(lab, cfg)


def assert_stopped_agent_fails_closed(lab: Lab) -> None:
    """No agent, capture in place: a pod's connection is refused, never delivered around the proxy."""
    assert not no_capture_installed(lab), "a stop must leave capture installed"
    r = lab.run("node1/pod-1", ["curl", "-sS", "--max-time", "5", "http://198.19.0.10/"])
    assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)


def uninstall_ok(lab: Lab, cfg: Path) -> None:
    """`hostmesh agent --uninstall` removes everything, and a second run is a no-op success."""
    for _ in range(2):
        r = run_agent(lab, "--config", str(cfg), "--uninstall")
        assert r.returncode == 0, r.stderr
        assert "capture removed" in r.stdout
        assert no_capture_installed(lab)
