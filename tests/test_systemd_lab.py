"""The agent as a systemd service, in the lab: each node is provisioned by
vagrant/provision/node.sh (into its own root directory, no systemctl) and its agent runs
under meshlab/supervisor.py from the installed hostmesh-agent.service, which speaks the
notify protocol as systemd does for Type=notify (real socket, shipped WatchdogSec=,
RestartSec=, no override).

Checked: READY=1 comes only once capture is verified and a config is applied (agents start
while the control plane is down: they report that they wait for config and send no
READY; /ready is never 503 after READY arrived), the STATUS lines say what the agent
does, traffic between pods goes through the mesh, and an agent whose main process is
stopped (SIGSTOP) stops petting, is killed by the watchdog (SIGABRT) and restarted after
RestartSec; meanwhile capture stays installed (pods' connections are not answered, then
queued in the kernel for the next agent: nothing goes around the proxy) and traffic works
again after the restart. And a
hand-off to an agent in a second unit (the upgrade path under systemd) ends the old unit
cleanly (STOPPING=1, exit 0, no restart). The agent keeps its listening sockets in the
unit's file descriptor store (FDSTORE=1), so a `systemctl restart` under load fails no
request, and connections made while no agent runs wait and are served by the next one.
Runtime: about 40 s (the watchdog alone waits WatchdogSec=10s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshlab import mesh, naming
from meshlab.lab import Lab
from meshlab.supervisor import Supervisor, load_unit
from tests.conftest import HOSTMESH, require_root, unique_lab_name

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]
NODE_SH = REPO / "vagrant" / "provision" / "node.sh"
VIP = mesh.DEFAULT_SERVICE_VIP


def host_root(lab: Lab, node: str) -> Path:
    return Path(lab.names.run_dir, "hosts", node)  # removed with the lab's run dir


def provision(lab: Lab, node: str) -> Path:
    """vagrant/provision/node.sh, as in a VM, into the node's root directory."""
    root = host_root(lab, node)
    root.mkdir(parents=True)
    i = naming.node_index(node)
    env = {"PATH": os.environ["PATH"], "HOSTMESH_ROOT": str(root), "HOSTMESH_NO_START": "1", "HOSTMESH_BIN": HOSTMESH,
           "HOSTMESH_NODE": node, "HOSTMESH_CONTROL_PLANE": mesh.CP_GRPC,
           "HOSTMESH_TOKEN_FILE": str(mesh.token_file(lab, node)), "HOSTMESH_ROOT_BUNDLE": str(mesh.root_bundle(lab)),
           "HOSTMESH_POD_CIDR": naming.pod_cidr(i),
           "HOSTMESH_MESH_CIDRS": " ".join([naming.SERVICE_CIDR] + [naming.pod_cidr(naming.node_index(n))
                                                                    for n in lab.topology()]),
           # one process: a stopped agent is a stopped proxy (workers would keep serving)
           "HOSTMESH_INSTALL_ARGS": "--workers 1"}
    r = subprocess.run([str(NODE_SH)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return root / "etc/systemd/system/hostmesh-agent.service"


class ReadyPoller:
    """Asks the agent's /ready over and over: (start, end, HTTP ok?, answer) per query."""

    def __init__(self, lab: Lab, node: str) -> None:
        self.lab, self.node = lab, node
        self.results: list[tuple[float, float, bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            r = mesh.admin_get(self.lab, self.node, "/ready")
            self.results.append((t0, time.monotonic(), r.returncode == 0, r.stdout.strip()))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


@dataclass
class SystemdLab:
    lab: Lab
    sups: dict[str, Supervisor]
    polls: dict[str, ReadyPoller]
    cp_started: float = 0.0
    ready_before_cp: dict[str, bool] = field(default_factory=dict)
    capture_at_ready: dict[str, str] = field(default_factory=dict)


def ready_events(sup: Supervisor) -> list:
    return sup.of("ready")


@pytest.fixture(scope="module")
def slab():
    require_root("the systemd lab tests")
    lab = Lab(unique_lab_name())
    sups: dict[str, Supervisor] = {}
    polls: dict[str, ReadyPoller] = {}
    try:
        lab.up(2, 2)  # namespaces, pods, the test app; no agent, no control plane yet
        mesh.write_default_config(lab)
        mesh.write_pki(lab)  # the CA, node tokens and root bundle node.sh installs
        units = {node: provision(lab, node) for node in lab.topology()}
        for node, unit in units.items():
            polls[node] = ReadyPoller(lab, node)
            sups[node] = Supervisor(load_unit(unit), wrap=lambda argv, n=node: lab.exec_argv(lab.target(n), argv),
                                    log_path=Path(lab.names.run_dir, "logs", f"agent-{node}.log"))
            sups[node].start()
        out = SystemdLab(lab, sups, polls)
        for node, sup in sups.items():
            sup.wait(lambda _: any(s.startswith("waiting for config from the control plane") for s in sup.statuses()),
                     30, f"{node}: the agent waiting for the control plane")
        time.sleep(1.0)  # capture is in, the agent is LIVE: still no READY without a config
        out.ready_before_cp = {node: bool(ready_events(sup)) for node, sup in sups.items()}
        out.cp_started = time.monotonic()
        mesh.start_controlplane(lab)
        for node, sup in sups.items():
            sup.wait(lambda ev: [e for e in ev if e.kind == "ready"], 45, f"{node}: READY=1")
            out.capture_at_ready[node] = lab.run(node, ["iptables-save", "-t", "nat"]).stdout
        time.sleep(0.5)
        for p in polls.values():
            p.stop()
        yield out
    finally:
        for p in polls.values():
            p.stop()
        for sup in sups.values():
            sup.close()
        if os.environ.get("HOSTMESH_KEEP_LOGS"):
            import shutil
            shutil.copytree(Path(lab.names.run_dir, "logs"), os.environ["HOSTMESH_KEEP_LOGS"], dirs_exist_ok=True)
        lab.down()


def curl(lab: Lab, url: str, max_time: float = 3) -> subprocess.CompletedProcess:
    return lab.run("node1/pod-1", ["curl", "-sS", "--max-time", str(max_time), url], timeout=max_time + 10)


def test_ready_only_once_capture_is_verified_and_a_config_is_applied(slab):
    assert slab.ready_before_cp == {"node1": False, "node2": False}  # LIVE with capture, no config: not ready
    for node, sup in slab.sups.items():
        ready = ready_events(sup)
        assert len(ready) == 1 and ready[0].t > slab.cp_started, node
        polls = slab.polls[node].results
        # /ready was asked all along: never not-ready once READY had arrived ...
        assert not [p for p in polls if p[0] > ready[0].t and not p[2]], node
        # ... and not ready (admin not up, or waiting for config) before the config existed
        before = [p for p in polls if p[1] < slab.cp_started]
        assert before and not any(ok for _, _, ok, _ in before), node
        assert any("no config" in text for _, _, _, text in before), node
        assert [p for p in polls if p[0] > ready[0].t and p[2]], node
        # capture was in place at READY, and what /capture verified matches
        assert ":HOSTMESH-PREROUTING" in slab.capture_at_ready[node]
        view = json.loads(mesh.admin_get(slab.lab, node, "/capture").stdout)
        assert view["installed"] and view["last_verification"]["ok"]
        assert not sup.of("ignored")  # every message came from the main process


def test_status_lines_say_what_the_agent_does(slab):
    for node, sup in slab.sups.items():
        statuses = sup.statuses()
        assert statuses[:2] == ["starting: opening listeners", "starting: installing iptables capture"], statuses
        assert statuses[2].startswith("waiting for config from the control plane: no config: control plane "
                                      f"{mesh.CP_GRPC} unreachable"), statuses
        ready = ready_events(sup)[0]
        assert ready.fields["STATUS"].startswith("serving 1 service, 2 local workloads (snapshot "), ready.fields


def test_traffic_between_pods_goes_through_the_mesh(slab):
    lab = slab.lab
    r = curl(lab, "http://198.18.2.1:8080/")  # cross-node pod IP
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert (body["node"], body["pod"]) == ("node2", "pod-1")
    assert body["source"]["address"] != naming.pod_ip(1, 1)  # the destination node's proxy dialed it
    seen = {json.loads(curl(lab, f"http://{VIP}/").stdout)["pod"] for _ in range(8)}
    assert len(seen) >= 2  # the VIP, balanced by the proxy
    metrics = mesh.admin_get(lab, "node1", "/metrics").stdout
    assert 'hostmesh_tcp_connections_opened_total{' in metrics


class Load:
    """meshlab.restartload in node1/pod-1: HTTP/1.1 keep-alive and new connections and gRPC
    streams to the VIP, TCP echo streams to node2/pod-1 (through the tunnel)."""

    def __init__(self, lab: Lab, tmp_path: Path, name: str) -> None:
        import sys
        self.lab, self.name = lab, name
        if not lab.run("node2/pod-1", ["ss", "-Hltn", "sport = :7000"]).stdout.strip():
            lab.spawn(lab.target("node2/pod-1"), [sys.executable, "-m", "meshlab.tcptools", "serve", "--port",
                                                   "7000"], "echo-node2-pod-1")
            wait(lambda: lab.run("node2/pod-1", ["ss", "-Hltn", "sport = :7000"]).stdout.strip(), 15, "the echo server")
        self.stop_file, ready = tmp_path / f"{name}.stop", tmp_path / f"{name}.ready"
        self.proc = lab.spawn(lab.target("node1/pod-1"), [
            sys.executable, "-m", "meshlab.restartload", "--http", f"{VIP}:80", "--tcp", f"{naming.pod_ip(2, 1)}:7000",
            "--grpc", f"{VIP}:9090", "--stop-file", str(self.stop_file), "--ready-file", str(ready),
            "--max-seconds", "120", "--rate", "20", "--stream-seconds", "2"], name)
        wait(ready.exists, 30, "every load client's first success")

    def result(self) -> dict:
        self.stop_file.write_text("stop\n")
        self.proc.wait(timeout=60)
        return json.loads(Path(self.lab.names.run_dir, "logs", f"{self.name}.log").read_text().strip().splitlines()[-1])


def assert_nothing_failed(result: dict) -> None:
    for kind, tally in result.items():
        assert tally["failed"] == 0, (kind, tally)
        assert tally["ok"] > 0, (kind, tally)


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return got


def test_systemctl_reload_restarts_the_agent_under_load_and_drops_nothing(slab, tmp_path):
    """`systemctl reload` (ExecReload=kill -HUP $MAINPID): the agent starts its successor in
    the unit, hands the listeners over and says MAINPID=; the unit stays active throughout,
    follows the new process, and no request, stream or connection fails."""
    lab = slab.lab
    load = Load(lab, tmp_path, "reload-load")
    try:
        for node in ("node1", "node2"):
            sup = slab.sups[node]
            old = sup.main_pid
            sup.reload()
            assert sup.main_pid != old and sup.state == "active"
            mainpid = [e for e in sup.of("mainpid") if e.fields["from"] == old]
            assert mainpid and mainpid[0].pid == sup.main_pid
            info = json.loads(mesh.admin_get(lab, node, "/server_info").stdout)
            assert info["pid"] == sup.main_pid and info["predecessor"]["pid"] == old
            wait(lambda: [e for e in sup.of("exit-former") if e.pid == old], 30, f"the old {node} agent to exit")
            assert [e for e in sup.of("exit-former") if e.pid == old][0].fields["returncode"] == 0
            # the new main process pets the watchdog: systemd would otherwise kill it
            wait(lambda: [e for e in sup.of("notify") if e.pid == sup.main_pid and e.fields.get("WATCHDOG") == "1"],
                 10, "the new agent's watchdog pets")
            time.sleep(1.0)
        time.sleep(2.5)
    finally:
        result = load.result()
    assert_nothing_failed(result)


def test_systemctl_restart_under_load_refuses_nothing(slab, tmp_path):
    """`systemctl restart` stops before it starts; the agent's listening sockets stay in
    the unit's file descriptor store (FDSTORE=1, FileDescriptorStoreMax=), so connections
    made in the gap wait in the kernel's accept queue and the next agent serves them."""
    lab = slab.lab
    load = Load(lab, tmp_path, "restart-load")
    try:
        for node in ("node1", "node2"):
            sup = slab.sups[node]
            before = sup.main_pid
            stored = {n for n, _ in sup.fd_store}
            assert {"outbound", "inbound", "tunnel", "admin"} <= stored, stored
            sup.restart()
            sup.wait(lambda ev: [e for e in ev if e.kind == "ready" and e.pid != before], 45, f"{node} READY again")
            info = json.loads(mesh.admin_get(lab, node, "/server_info").stdout)
            assert info["pid"] == sup.main_pid != before
            assert {n for n, _ in sup.fd_store} == stored   # the same sockets, not new copies
            time.sleep(1.0)
        time.sleep(2.5)
    finally:
        result = load.result()
    assert_nothing_failed(result)
    logs = Path(lab.names.run_dir, "logs", "agent-node1.log").read_text()
    assert "listening on the sockets the service manager kept" in logs


def test_a_stuck_agent_is_killed_by_the_watchdog_restarted_and_never_bypassed(slab):
    lab, sup = slab.lab, slab.sups["node1"]
    spec = sup.spec  # the shipped unit's values
    first = sup.main_pid
    generation = json.loads(mesh.admin_get(lab, "node1", "/server_info").stdout)["generation"]
    os.kill(first, signal.SIGSTOP)
    stopped = time.monotonic()
    # stuck: the listener still exists, so the kernel accepts, but nobody answers
    r = curl(lab, "http://198.18.2.1:8080/", max_time=1)
    assert r.returncode == 28 and r.stdout == "", (r.returncode, r.stdout)
    died = sup.wait(lambda ev: [e for e in ev if e.kind == "exit" and e.pid == first], spec.watchdog + 15,
                    "the watchdog to kill the stopped agent")[0]
    # the gap before RestartSec: capture stays and the unit keeps the listening sockets, so
    # connections wait in the accept queue: never answered by anything but a proxy, never
    # sent around it, and the next agent serves them
    urls = ("http://198.18.2.1:8080/", f"http://{VIP}/", "http://198.18.1.2:8080/")
    probes = [subprocess.Popen(lab.exec_argv(lab.target("node1/pod-1"), ["curl", "-sS", "--max-time", "1", url]),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for url in urls]
    for url, probe in zip(urls, probes):   # side by side: all inside RestartSec
        out, _ = probe.communicate(timeout=10)
        assert probe.returncode == 28 and out == "", (url, probe.returncode, out)  # accepted, unanswered
    assert time.monotonic() - died.t < spec.restart_sec
    assert ":HOSTMESH-PREROUTING" in lab.run("node1", ["iptables-save", "-t", "nat"]).stdout
    waiting = subprocess.Popen(lab.exec_argv(lab.target("node1/pod-1"), [
        "curl", "-sS", "--max-time", "40", "http://198.18.2.1:8080/"]), stdout=subprocess.PIPE, text=True)
    assert not [e for e in sup.of("restart") if died.t < e.t < time.monotonic() - 0.5]
    timeout = next(e for e in sup.of("watchdog-timeout") if e.pid == first)
    last_pet = [e for e in sup.of("notify") if e.pid == first and e.fields.get("WATCHDOG") == "1"][-1]
    assert last_pet.t <= stopped + 0.1
    # the watchdog runs from READY=1 on (as systemd's), re-armed by every pet
    armed = max(last_pet.t, next(e.t for e in sup.of("ready") + sup.of("reloaded") if e.pid == first))
    assert timeout.t - armed == pytest.approx(spec.watchdog, abs=0.5)
    abort = next(e for e in sup.of("kill") if e.pid == first and e.fields["signal"] == "SIGABRT")
    assert died.fields["signal"] == "SIGABRT" and abort.t == pytest.approx(timeout.t, abs=0.1)
    # restarted after RestartSec, ready again, adopting the capture the killed agent left
    again = sup.wait(lambda ev: [e for e in ev if e.kind == "ready" and e.t > died.t], 45, "READY after the restart")
    restart = next(e for e in sup.of("restart") if e.t > died.t)
    assert restart.t - died.t >= spec.restart_sec - 0.05
    info = json.loads(mesh.admin_get(lab, "node1", "/server_info").stdout)
    assert info["pid"] == again[0].pid and info["capture_adopted"] is True and info["generation"] == generation + 1
    r = curl(lab, "http://198.18.2.1:8080/")
    assert r.returncode == 0 and json.loads(r.stdout)["node"] == "node2", r.stderr
    assert json.loads(curl(lab, f"http://{VIP}/").stdout)["pod"]
    out, _ = waiting.communicate(timeout=45)   # made while no agent ran: served by the new one
    assert waiting.returncode == 0 and json.loads(out)["node"] == "node2"
    assert json.loads(out)["source"]["address"] != naming.pod_ip(1, 1)   # through the proxy


def test_a_hand_off_between_two_units_ends_the_old_one_cleanly(slab):
    """The upgrade path under systemd (README): start the new agent in a second unit next to
    the running one (systemd-run); it takes the listeners over and sends READY, and the old
    agent exits 0 after STOPPING=1, so its unit ends cleanly instead of being restarted."""
    lab, old = slab.lab, slab.sups["node2"]
    old_pid = old.main_pid
    new = Supervisor(old.spec, wrap=lambda argv: lab.exec_argv(lab.target("node2"), argv),
                     log_path=Path(lab.names.run_dir, "logs", "agent-node2-next.log"))
    slab.sups["node2-next"] = new  # closed by the fixture
    new.start()
    new.wait(lambda ev: [e for e in ev if e.kind == "ready"], 45, "the successor's READY")
    restarts = old.restarts
    exit_ = old.wait(lambda ev: [e for e in ev if e.kind == "exit" and e.pid == old_pid], 30,
                     "the predecessor to exit")[0]
    old.wait(lambda _: old.state == "inactive", 5, "the old unit to be inactive")
    assert exit_.fields["returncode"] == 0 and old.restarts == restarts
    stopping = [e for e in old.of("notify") if e.fields.get("STOPPING") == "1" and e.pid == old_pid]
    assert stopping and stopping[0].fields["STATUS"] == f"handed off to the agent with pid {new.main_pid}: draining"
    info = json.loads(mesh.admin_get(lab, "node2", "/server_info").stdout)
    assert info["pid"] == new.main_pid and info["predecessor"]["pid"] == old_pid
    r = lab.run("node2/pod-1", ["curl", "-sS", "--max-time", "3", "http://198.18.1.1:8080/"], timeout=15)
    assert r.returncode == 0 and json.loads(r.stdout)["node"] == "node1", r.stderr
