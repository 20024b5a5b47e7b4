"""The mesh side of a lab: the default Service, per-node agent config, and starting the agents.

Until the control plane lands, the lab renders each node's snapshot itself (services with
their endpoints, and the workloads) into the lab's run dir; agents read it from there and
pick up changes to it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from meshlab import naming
from meshlab.errors import LabError
from meshlab.lab import Lab
from nodeagent.state import Endpoint, NodeSnapshot, Service, ServicePort, Workload

DEFAULT_SERVICE_NAME = "testapp"
DEFAULT_SERVICE_VIP = "198.19.0.10"
AGENT_READY_TIMEOUT = 20.0
ADMIN = "127.0.0.1:15000"


def lab_workloads(lab: Lab) -> list[Workload]:
    out = []
    for node, pods in lab.topology().items():
        i = naming.node_index(node)
        for pod in pods:
            out.append(Workload(
                name=f"{node}-{pod}", namespace="default", node=node,
                address=naming.pod_ip(i, naming.pod_index(pod)), service_account="testapp",
                labels=(("app", "testapp"), ("node", node), ("pod", pod)),
            ))
    return out


def default_services(workloads: list[Workload]) -> list[Service]:
    """`testapp`: VIP port 80 -> the test app's 8080 and 9090 -> its gRPC port, on every pod."""
    ports = (ServicePort(port=80, target_port=8080, name="http"),
             ServicePort(port=9090, target_port=9090, name="grpc", app_protocol="grpc"))
    # a multi-port service carries one endpoint per workload and target port
    endpoints = tuple(Endpoint(address=w.address, port=p.target_port, node=w.node, workload=w.name,
                               namespace=w.namespace) for p in ports for w in workloads)
    return [Service(name=DEFAULT_SERVICE_NAME, namespace="default", cluster_ip=DEFAULT_SERVICE_VIP,
                    ports=ports, endpoints=endpoints)]


def config_dir(lab: Lab) -> Path:
    return Path(lab.names.run_dir, "config")


def write_snapshots(lab: Lab, services: list[Service], workloads: list[Workload]) -> None:
    """Render one snapshot file per node, atomically (agents may be reading them)."""
    d = config_dir(lab)
    d.mkdir(parents=True, exist_ok=True)
    for node in lab.topology():
        snap = NodeSnapshot(node=node, services=tuple(services), workloads=tuple(workloads))
        path = d / f"snapshot-{node}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(snap.to_json())
        tmp.replace(path)


def read_services(lab: Lab) -> list[dict]:
    """The services as the lab last rendered them (for `lab status`)."""
    files = sorted(config_dir(lab).glob("snapshot-*.json"))
    if not files:
        return []
    snap = json.loads(files[0].read_text())
    return [{"name": s["name"], "namespace": s["namespace"], "vip": s["cluster_ip"],
             "ports": [f"{p['port']}->{p['target_port']}" for p in s["ports"]],
             "endpoints": [e["address"] for e in s["endpoints"]]} for s in snap["services"]]


def agent_bootstrap(lab: Lab, node: str, capture: str) -> Path:
    i = naming.node_index(node)
    all_pod_cidrs = [naming.pod_cidr(naming.node_index(n)) for n in lab.topology()]
    doc = {
        "node": node,
        "capture": {"mode": capture, "podCIDRs": [naming.pod_cidr(i)],
                    "meshCIDRs": [naming.SERVICE_CIDR] + all_pod_cidrs},
        "admin": {"address": ADMIN},
        "snapshotFile": str(config_dir(lab) / f"snapshot-{node}.json"),
        "stateDir": str(Path(lab.names.run_dir, "state", node)),
        "drainGrace": "5s",
    }
    path = config_dir(lab) / f"agent-{node}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_agents(lab: Lab, capture: str = "iptables") -> dict[str, subprocess.Popen]:
    """Render the default config, start an agent on every node and wait until all are ready."""
    workloads = lab_workloads(lab)
    write_snapshots(lab, default_services(workloads), workloads)
    procs = {node: spawn_agent(lab, node, capture) for node in lab.topology()}
    for node, proc in procs.items():
        wait_ready(lab, node, proc)
    return procs


def spawn_agent(lab: Lab, node: str, capture: str = "iptables") -> subprocess.Popen:
    cfg = agent_bootstrap(lab, node, capture)
    argv = [sys.executable, "-m", "hostmesh.cli", "agent", "--config", str(cfg)]
    return lab.spawn(lab.target(node), argv, f"agent-{node}")


def wait_ready(lab: Lab, node: str, proc: subprocess.Popen, timeout: float = AGENT_READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LabError(f"the agent on {node} exited with {proc.returncode}; "
                           f"see {lab.names.run_dir}/logs/agent-{node}.log")
        r = admin_get(lab, node, "/ready")
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise LabError(f"the agent on {node} was not ready within {timeout:g}s: {r.stdout.strip()}")
        time.sleep(0.1)


def agent_pids(lab: Lab, node: str) -> list[int]:
    """Agents running in a node's cgroup (found from the kernel, no pid files)."""
    from meshlab import cgroups
    pids = []
    for pid in cgroups.tree_pids(cgroups.cgroup_root() / lab.names.node_cgroup(node)):
        try:
            if b"agent" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def agent_running(lab: Lab, node: str) -> bool:
    return bool(agent_pids(lab, node))


def admin_get(lab: Lab, node: str, path: str, method: str = "GET") -> subprocess.CompletedProcess:
    """Query a node agent's admin endpoint from inside the node's namespace."""
    return lab.run(node, ["curl", "-sS", "--fail-with-body", "--max-time", "5", "-X", method,
                          f"http://{ADMIN}{path}"], timeout=10)
