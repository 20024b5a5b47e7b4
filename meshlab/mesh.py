"""The mesh side of a lab: the control plane, its config directory, and the node agents.

`lab up` writes the lab's desired state as YAML objects (a Workload per pod, the default
`testapp` Service) into a config directory the user can edit, runs `hostmesh controlplane`
in the lab's control-plane namespace (198.18.0.2) and an agent on every node connected to
it. The control plane serves 15010 over TLS from the lab's CA (``pki/ca``, created here
before it starts) and requires each node's token (``pki/tokens/<node>.token``, 0600);
agents get their token and the root bundle (``pki/root-bundle.pem``) in their bootstrap
and keep workload certificates under ``certs/<node>``. Tests and benchmarks that need no control plane can instead render static snapshot
files (`write_snapshots`) and start agents with `static=True`.
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
CP_GRPC = f"{naming.CONTROLPLANE_IP}:15010"
CP_HTTP = f"http://{naming.CONTROLPLANE_IP}:15014"


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
    """Agent bootstrap files and static snapshots (not the control plane's config)."""
    return Path(lab.names.run_dir, "config")


def cp_config_dir(lab: Lab) -> Path:
    """The control plane's config directory: edit the YAML here and the mesh follows."""
    return Path(lab.names.run_dir, "controlplane")


def pki_dir(lab: Lab) -> Path:
    """The lab's CA directory, node tokens and root bundle (removed with the lab)."""
    return Path(lab.names.run_dir, "pki")


def token_file(lab: Lab, node: str) -> Path:
    return pki_dir(lab) / "tokens" / f"{node}.token"


def root_bundle(lab: Lab) -> Path:
    return pki_dir(lab) / "root-bundle.pem"


def write_pki(lab: Lab) -> None:
    """The CA (generated once), a token per node (kept across calls) and the root bundle."""
    import os

    from controlplane import ca
    d = pki_dir(lab)
    tokens = d / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    authority = ca.CertificateAuthority(d / "ca")
    for node in lab.topology():
        path = token_file(lab, node)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(ca.new_token() + "\n")
    root_bundle(lab).write_text(authority.trust_bundle_pem)


def workload_documents(lab: Lab) -> list[dict]:
    return [{
        "apiVersion": "hostmesh.io/v1alpha1", "kind": "Workload",
        "metadata": {"name": w.name, "namespace": w.namespace, "labels": dict(w.labels)},
        "spec": {"node": w.node, "address": w.address, "serviceAccount": w.service_account,
                 "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9090}]},
    } for w in lab_workloads(lab)]


def service_document(name: str, vip: str, selector: dict, ports: list[dict], namespace: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": vip, "selector": selector, "ports": ports}}


def write_config(lab: Lab, filename: str, documents: list[dict]) -> Path:
    """Write YAML documents into the control plane's config dir atomically (it is watched)."""
    d = cp_config_dir(lab)
    d.mkdir(parents=True, exist_ok=True)
    path = d / filename
    tmp = d / f".{filename}.tmp"
    tmp.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    tmp.replace(path)
    return path


def write_default_config(lab: Lab) -> None:
    write_config(lab, "workloads.yaml", workload_documents(lab))
    write_config(lab, "services.yaml", [service_document(
        DEFAULT_SERVICE_NAME, DEFAULT_SERVICE_VIP, {"app": "testapp"},
        [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"},
         {"name": "grpc", "port": 9090, "targetPort": 9090, "appProtocol": "grpc"}])])


def start_controlplane(lab: Lab, timeout: float = AGENT_READY_TIMEOUT,
                       source: list[str] | None = None) -> subprocess.Popen:
    """`source`: the control plane's source flags (default: the lab's config dir)."""
    from meshlab.lab import CONTROLPLANE
    write_pki(lab)
    argv = [sys.executable, "-m", "hostmesh.cli", "controlplane",
            *(source or ["--config-dir", str(cp_config_dir(lab))]),
            "--ca-dir", str(pki_dir(lab) / "ca"), "--node-tokens", str(pki_dir(lab) / "tokens"),
            "--tls-san", naming.CONTROLPLANE_IP]
    proc = lab.spawn(lab.target(CONTROLPLANE), argv, "controlplane")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LabError(f"the control plane exited with {proc.returncode}; "
                           f"see {lab.names.run_dir}/logs/controlplane.log")
        r = cp_get(lab, "/ready")
        if r.returncode == 0:
            return proc
        if time.monotonic() > deadline:
            raise LabError(f"the control plane was not ready within {timeout:g}s: {r.stdout.strip()}")
        time.sleep(0.1)


def cp_get(lab: Lab, path: str) -> subprocess.CompletedProcess:
    from meshlab.lab import CONTROLPLANE
    return lab.run(CONTROLPLANE, ["curl", "-sS", "--fail-with-body", "--max-time", "5", f"{CP_HTTP}{path}"],
                   timeout=10)


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
    """The services in force: from the control plane if it runs, else the static snapshots."""
    snap = None
    topo = lab.topology()
    if topo and controlplane_running(lab):
        r = cp_get(lab, f"/debug/snapshot?node={next(iter(topo))}")
        if r.returncode == 0:
            snap = json.loads(r.stdout)
    if snap is None:
        files = sorted(config_dir(lab).glob("snapshot-*.json"))
        if not files:
            return []
        snap = json.loads(files[0].read_text())
    return [{"name": s["name"], "namespace": s["namespace"], "vip": s["cluster_ip"],
             "ports": [f"{p['port']}->{p['target_port']}" for p in s["ports"]],
             "endpoints": [e["address"] for e in s["endpoints"]]} for s in snap["services"]]


def agent_bootstrap(lab: Lab, node: str, capture: str, *, static: bool = False) -> Path:
    i = naming.node_index(node)
    all_pod_cidrs = [naming.pod_cidr(naming.node_index(n)) for n in lab.topology()]
    doc = {
        "node": node,
        "capture": {"mode": capture, "podCIDRs": [naming.pod_cidr(i)],
                    "meshCIDRs": [naming.SERVICE_CIDR] + all_pod_cidrs,
                    # eBPF capture: each pod's cgroup, the pods' gateway on the node, and the
                    # pin directory name (nodes of all labs share this kernel)
                    "cgroups": [lab.names.pod_cgroup(node, p) for p in lab.topology()[node]],
                    "redirectAddress": naming.POD_GATEWAY, "instance": f"{lab.name}-{node}"},
        "admin": {"address": ADMIN},
        **({"snapshotFile": str(config_dir(lab) / f"snapshot-{node}.json")} if static else {
            # every replica when the lab runs an HA control plane (meshlab/ha.py)
            "controlPlane": getattr(lab, "control_plane_endpoints", None) or CP_GRPC,
            "controlPlaneAuth": {"tokenFile": str(token_file(lab, node)), "rootBundle": str(root_bundle(lab))},
            "certDir": str(Path(lab.names.run_dir, "certs", node))}),
        "stateDir": str(Path(lab.names.run_dir, "state", node)),
        "drainGrace": "5s",
    }
    workers = getattr(lab, "workers", None)  # proxy worker processes; None: the agent's default (auto)
    if workers is not None:
        doc["workers"] = workers
    accelerate = getattr(lab, "accelerate", None)  # eBPF same-node acceleration; None: the agent's default
    if accelerate is not None:
        doc["capture"]["accelerate"] = accelerate
    jwks_ca = getattr(lab, "jwks_ca_file", None)  # a test's private JWKS server: the CA agents trust for it
    if jwks_ca:
        doc["jwks"] = {"caFile": str(jwks_ca), "refreshInterval": getattr(lab, "jwks_refresh", "20m")}
    path = config_dir(lab) / f"agent-{node}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_agents(lab: Lab, capture: str = "iptables", *, static: bool = False,
                 config: list[dict] | None = None) -> dict[str, subprocess.Popen]:
    """Start the control plane (unless `static`) and an agent on every node; wait until all are ready.
    `config`: extra documents written to the config dir (extra.yaml) before the control plane starts."""
    if static:
        if config:
            raise LabError("extra config documents need the control plane (not a static lab)")
        workloads = lab_workloads(lab)
        write_snapshots(lab, default_services(workloads), workloads)
    else:
        write_default_config(lab)
        if config:
            write_config(lab, "extra.yaml", config)
        start_controlplane(lab)
    procs = {node: spawn_agent(lab, node, capture, static=static) for node in lab.topology()}
    for node, proc in procs.items():
        wait_ready(lab, node, proc)
    return procs


def spawn_agent(lab: Lab, node: str, capture: str = "iptables", *, static: bool = False) -> subprocess.Popen:
    cfg = agent_bootstrap(lab, node, capture, static=static)
    argv = [sys.executable, "-m", "hostmesh.cli", "agent", "--config", str(cfg)]
    return lab.spawn(lab.target(node), argv, f"agent-{node}")


def restart_agent(lab: Lab, node: str, capture: str = "iptables", *, static: bool = False,
                  env: dict[str, str] | None = None, timeout: float = AGENT_READY_TIMEOUT) -> int:
    """Start a successor next to the running agent: it takes the listeners over (hand-off),
    the old one drains and exits. Returns once the successor serves the admin endpoint and
    is ready; ``env``: extra environment (another build: PYTHONPATH, HOSTMESH_BPF_DIR)."""
    before = set(agent_pids(lab, node))
    cfg = agent_bootstrap(lab, node, capture, static=static)
    argv = [sys.executable, "-m", "hostmesh.cli", "agent", "--config", str(cfg)]
    if env:
        argv = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
    proc = lab.spawn(lab.target(node), argv, f"agent-{node}")
    taken: list[int] = []

    def took_over() -> str:
        r = admin_get(lab, node, "/server_info")
        if r.returncode != 0:
            return r.stdout.strip()
        info = json.loads(r.stdout)
        if info["pid"] in before or info["state"] != "LIVE" or admin_get(lab, node, "/ready").returncode != 0:
            return f"pid {info['pid']} is {info['state']}"
        taken.append(info["pid"])
        return ""

    _wait_agent(lab, node, proc, took_over, timeout, "take over", poll=0.05)
    return taken[0]


def uninstall_agent(lab: Lab, node: str, capture: str = "iptables") -> subprocess.CompletedProcess:
    """`hostmesh agent --uninstall` for a node: remove its capture (a stop leaves it in place)."""
    cfg = agent_bootstrap(lab, node, capture)
    return lab.run(node, [sys.executable, "-m", "hostmesh.cli", "agent", "--config", str(cfg), "--uninstall"],
                   timeout=60)


def wait_ready(lab: Lab, node: str, proc: subprocess.Popen, timeout: float = AGENT_READY_TIMEOUT) -> None:
    def ready() -> str:
        r = admin_get(lab, node, "/ready")
        return "" if r.returncode == 0 else r.stdout.strip() or "not ready"

    _wait_agent(lab, node, proc, ready, timeout, "be ready")


def _wait_agent(lab: Lab, node: str, proc: subprocess.Popen, check, timeout: float, what: str,
                poll: float = 0.1) -> None:
    """Until ``check()`` returns "" (else: why not yet); LabError if the agent exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LabError(f"the agent on {node} exited with {proc.returncode}; "
                           f"see {lab.names.run_dir}/logs/agent-{node}.log")
        why = check()
        if not why:
            return
        if time.monotonic() > deadline:
            raise LabError(f"the agent on {node} did not {what} within {timeout:g}s: {why}")
        time.sleep(poll)


def agent_pids(lab: Lab, node: str) -> list[int]:
    """Agents running in a node's cgroup (found from the kernel, no pid files)."""
    return _command_pids(lab.names.node_cgroup(node), b"agent")


def controlplane_pids(lab: Lab) -> list[int]:
    return _command_pids(lab.names.controlplane_cgroup, b"controlplane")


def controlplane_running(lab: Lab) -> bool:
    return bool(controlplane_pids(lab))


def _command_pids(cgroup: str, word: bytes) -> list[int]:
    from meshlab import cgroups
    pids = []
    for pid in cgroups.tree_pids(cgroups.cgroup_root() / cgroup):
        try:
            if word in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
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
