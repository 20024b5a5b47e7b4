"""Build, inspect and tear down a lab cluster made of network namespaces.

Topology (ARCHITECTURE.md, "The lab"):

    hm-<lab>-fabric   bridge br0; one veth per node (n<N>) and one for the control plane (cp)
    hm-<lab>-cp       eth0 198.18.0.2/24: the control plane's host
    hm-<lab>-node<N>  eth0 198.18.0.(10+N)/24 on the fabric, a /32 route per local pod,
                      a /24 route per other node's pod CIDR via that node; ip_forward on
    hm-<lab>-node<N>-pod-<k>
                      eth0 198.18.N.k/32; route 198.18.0.0/15 via 169.254.1.1, a permanent
                      neighbour entry for 169.254.1.1 (the node-side veth's fixed MAC)

169.254.1.1 on every node-side veth matters for capture: REDIRECT rewrites the destination
to an address of the interface the packet came in on and drops it when there is none.

Nothing is ever created in the machine's root namespace and no namespace has a default
route: traffic can only reach lab hosts. Every pod gets a cgroup v2 directory and every
process started in a pod is placed there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from meshlab import cgroups, naming, system
from meshlab.errors import LabError
from meshlab.naming import LabNames

# All node-side pod veths carry this MAC so a pod's gateway entry never needs a lookup
# (Calico does the same with ee:ee:ee:ee:ee:ee).
NODE_VETH_MAC = "ee:ee:ee:ee:ee:ee"
APP_READY_TIMEOUT = 30.0
# the exec target of the control plane's namespace (198.18.0.2 on the fabric)
CONTROLPLANE = "controlplane"
BPF_PIN_ROOT = "/sys/fs/bpf/hostmesh"


@dataclass(frozen=True)
class Target:
    """Where a command runs: a node's or a pod's namespace, and its cgroup."""

    node: str
    pod: str | None
    namespace: str
    cgroup: str  # relative to the cgroup2 mount

    @property
    def label(self) -> str:
        return f"{self.node}/{self.pod}" if self.pod else self.node


class Lab:
    """One lab, found by its name; it holds no state that is not in the kernel or on disk."""

    def __init__(self, name: str = naming.DEFAULT_LAB) -> None:
        self.names = LabNames(naming.check_lab_name(name))

    @property
    def name(self) -> str:
        return self.names.lab

    # ------------------------------------------------------------------ discovery
    def namespaces(self) -> list[str]:
        return [ns for ns in system.list_netns() if ns.startswith(self.names.prefix)]

    def exists(self) -> bool:
        return bool(self.namespaces()) or (cgroups.cgroup_root() / self.names.cgroup_dir).exists() \
            or Path(self.names.run_dir).exists()

    def topology(self) -> dict[str, list[str]]:
        """node -> sorted pod names, read from the namespaces that exist."""
        nodes: dict[str, list[str]] = {}
        for ns in self.namespaces():
            parsed = self.names.parse_ns(ns)
            if parsed is None:
                continue
            node, pod = parsed
            nodes.setdefault(node, [])
            if pod:
                nodes[node].append(pod)
        return {n: sorted(p, key=naming.pod_index) for n, p in sorted(nodes.items(), key=lambda kv: naming.node_index(kv[0]))}

    def target(self, spec: str) -> Target:
        """'node1/pod-1' -> that pod; 'node1' -> the node itself."""
        topo = self.topology()
        if not topo:
            raise LabError(f"lab {self.name!r} is not up (hostmesh lab up --name {self.name})")
        if spec == CONTROLPLANE:
            return Target(CONTROLPLANE, None, self.names.controlplane_ns, self.names.controlplane_cgroup)
        node, _, pod = spec.partition("/")
        known = [f"{n}/{p}" for n, pods in topo.items() for p in pods]
        if node not in topo or (pod and pod not in topo[node]):
            raise LabError(
                f"unknown target {spec!r} in lab {self.name!r}; known pods: {', '.join(known)}; "
                f"nodes: {', '.join(topo)}; and {CONTROLPLANE}"
            )
        if pod:
            return Target(node, pod, self.names.pod_ns(node, pod), self.names.pod_cgroup(node, pod))
        return Target(node, None, self.names.node_ns(node), self.names.node_cgroup(node))

    # ------------------------------------------------------------------ up
    def up(self, nodes: int, pods_per_node: int, *, apps: bool = True, capture: str | None = None,
           config: list[dict] | None = None) -> dict:
        """Build the lab; with `capture` ("iptables"), start a node agent on every node.
        `config`: extra YAML documents for the control plane's config dir (e.g. a MeshConfig),
        in force before the first agent connects."""
        naming.check_counts(nodes, pods_per_node)
        if self.exists():
            raise LabError(
                f"a lab named {self.name!r} already exists (namespaces with prefix {self.names.prefix!r}); "
                f"run 'hostmesh lab down --name {self.name}' first or choose another --name"
            )
        try:
            self._build(nodes, pods_per_node)
            if apps:
                self.start_apps()
            if capture:
                from meshlab import mesh  # mesh builds on the lab, not the other way round
                mesh.start_agents(self, capture, config=config)
        except BaseException:
            # never leave a half-built lab behind, whatever went wrong (Ctrl-C included)
            self.down()
            raise
        return self.status()

    def _build(self, nodes: int, pods: int) -> None:
        n = self.names
        Path(n.run_dir, "logs").mkdir(parents=True, exist_ok=True)
        node_names = [naming.node_name(i) for i in range(1, nodes + 1)]
        pod_names = [naming.pod_name(k) for k in range(1, pods + 1)]

        system.add_netns(n.fabric_ns)
        system.add_netns(n.controlplane_ns)
        cgroups.create(n.controlplane_cgroup)
        for node in node_names:
            system.add_netns(n.node_ns(node))
            cgroups.create(n.node_cgroup(node))
            for pod in pod_names:
                system.add_netns(n.pod_ns(node, pod))
                cgroups.create(n.pod_cgroup(node, pod))

        fabric = ["link set lo up", "link add br0 type bridge", "link set br0 up",
                  f"link add cp type veth peer name eth0 netns {n.controlplane_ns}",
                  "link set cp master br0", "link set cp up"]
        for i, node in enumerate(node_names, 1):
            fabric += [
                f"link add n{i} type veth peer name eth0 netns {n.node_ns(node)}",
                f"link set n{i} master br0",
                f"link set n{i} up",
            ]
        system.ip_batch(n.fabric_ns, fabric)

        # the control plane reaches nodes on the fabric; it needs no route to any pod
        system.ip_batch(n.controlplane_ns, ["link set lo up", f"addr add {naming.CONTROLPLANE_IP}/24 dev eth0",
                                            "link set eth0 up"])
        for i, node in enumerate(node_names, 1):
            cmds = ["link set lo up", f"addr add {naming.node_ip(i)}/24 dev eth0", "link set eth0 up"]
            cmds += [
                f"route add {naming.pod_cidr(j)} via {naming.node_ip(j)} dev eth0"
                for j in range(1, nodes + 1) if j != i
            ]
            for k, pod in enumerate(pod_names, 1):
                veth = naming.pod_veth(pod)
                cmds += [
                    f"link add {veth} address {NODE_VETH_MAC} type veth peer name eth0 netns {n.pod_ns(node, pod)}",
                    # REDIRECT rewrites to an address of the incoming interface: without one
                    # the kernel drops captured SYNs, so the pod's gateway is that address
                    f"addr add {naming.POD_GATEWAY}/32 dev {veth} scope link",
                    f"link set {veth} up",
                    # the node talks to its pods from its fabric address, not the gateway's
                    f"route add {naming.pod_ip(i, k)}/32 dev {veth} scope link src {naming.node_ip(i)}",
                ]
            system.ip_batch(n.node_ns(node), cmds)
            system.sysctl(n.node_ns(node), {"net.ipv4.ip_forward": "1"})
            for k, pod in enumerate(pod_names, 1):
                system.ip_batch(n.pod_ns(node, pod), [
                    "link set lo up",
                    f"addr add {naming.pod_ip(i, k)}/32 dev eth0",
                    "link set eth0 up",
                    f"route add {naming.POD_GATEWAY} dev eth0 scope link",
                    f"route add {naming.LAB_RANGE} via {naming.POD_GATEWAY} dev eth0",
                    f"neigh add {naming.POD_GATEWAY} lladdr {NODE_VETH_MAC} dev eth0 nud permanent",
                ])

    # ------------------------------------------------------------------ processes
    def exec_argv(self, target: Target, argv: list[str]) -> list[str]:
        return system.enter_argv(target.namespace, cgroups.procs_file(target.cgroup), argv)

    def run(self, spec: str, argv: list[str], *, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command in a pod or node and wait for it (stdout/stderr captured as text)."""
        return subprocess.run(self.exec_argv(self.target(spec), argv), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def spawn(self, target: Target, argv: list[str], log_name: str) -> subprocess.Popen:
        """Start a long-running process in `target`; its output goes to the lab's log dir."""
        log_path = Path(self.names.run_dir, "logs", f"{log_name}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                self.exec_argv(target, argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True,
            )

    def start_apps(self) -> None:
        """Start the test workload in every pod and wait until each has bound its ports."""
        ready_dir = Path(self.names.run_dir, "ready")
        ready_dir.mkdir(parents=True, exist_ok=True)
        waiting: dict[Path, tuple[Target, subprocess.Popen]] = {}
        for node, pods in self.topology().items():
            for pod in pods:
                t = self.target(f"{node}/{pod}")
                ready = ready_dir / f"{node}-{pod}"
                ready.unlink(missing_ok=True)
                argv = [sys.executable, "-m", "meshlab.testapp", "--pod", pod, "--node", node,
                        "--ready-file", str(ready)]
                if getattr(self, "log_requests", False):  # a line per request in its log (tests count them)
                    argv.append("--log-requests")
                waiting[ready] = (t, self.spawn(t, argv, f"app-{node}-{pod}"))
        deadline = time.monotonic() + APP_READY_TIMEOUT
        while waiting:
            for ready, (t, proc) in list(waiting.items()):
                if ready.exists():
                    del waiting[ready]
                elif proc.poll() is not None:
                    raise LabError(f"test app in {t.label} exited with {proc.returncode}; "
                                   f"see {self.names.run_dir}/logs/app-{t.node}-{t.pod}.log")
            if waiting and time.monotonic() > deadline:
                raise LabError(f"test app did not become ready within {APP_READY_TIMEOUT:g}s in: "
                               + ", ".join(t.label for t, _ in waiting.values()))
            time.sleep(0.05)

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        topo = self.topology()
        root = cgroups.cgroup_root()
        nodes, pods = [], []
        for node, pod_list in topo.items():
            i = naming.node_index(node)
            nodes.append({"name": node, "namespace": self.names.node_ns(node), "address": naming.node_ip(i),
                          "pod_cidr": naming.pod_cidr(i)})
            for pod in pod_list:
                cg = root / self.names.pod_cgroup(node, pod)
                pods.append({
                    "node": node, "name": pod, "namespace": self.names.pod_ns(node, pod),
                    "address": naming.pod_ip(i, naming.pod_index(pod)), "cgroup": str(cg),
                    "processes": len(cgroups.tree_pids(cg)),
                })
        from meshlab import mesh
        for n in nodes:
            n["agent"] = mesh.agent_running(self, n["name"])
        return {
            "name": self.name, "up": bool(topo), "nodes": nodes, "pods": pods,
            "services": mesh.read_services(self), "run_dir": self.names.run_dir,
            "controlplane": {"address": naming.CONTROLPLANE_IP, "grpc": mesh.CP_GRPC, "http": mesh.CP_HTTP,
                             "config_dir": str(mesh.cp_config_dir(self)),
                             "running": mesh.controlplane_running(self)} if topo else None,
        }

    # ------------------------------------------------------------------ down
    def down(self) -> dict:
        return teardown(self.names.prefix, [cgroups.cgroup_root() / self.names.cgroup_dir],
                        [Path(self.names.run_dir)], bpf_pins(self.name))


def teardown_all() -> dict:
    """Remove every lab (and every hm- leftover), whatever its name."""
    root = cgroups.cgroup_root()
    cg_dirs = [p for p in root.glob(f"{naming.NAMESPACE_PREFIX}*") if p.is_dir()]
    run_root = Path(naming.RUN_ROOT)
    labs = {p.name[len(naming.NAMESPACE_PREFIX):] for p in cg_dirs}
    labs |= {ns[len(naming.NAMESPACE_PREFIX):].split("-", 1)[0] for ns in system.list_netns()
             if ns.startswith(naming.NAMESPACE_PREFIX)}
    pins = [pin for lab in sorted(labs) for pin in bpf_pins(lab)]
    return teardown(naming.NAMESPACE_PREFIX, cg_dirs, [run_root] if run_root.exists() else [], pins)


def bpf_pins(lab: str) -> list[Path]:
    """eBPF pin directories of a lab's agents (instance `<lab>-<node>`): an agent that was
    SIGKILLed leaves them behind, and its cgroups and namespaces are gone with the lab."""
    return sorted(Path(BPF_PIN_ROOT).glob(f"{lab}-node*"))


def teardown(prefix: str, cgroup_dirs: list[Path], run_dirs: list[Path], pins: list[Path] = ()) -> dict:
    """Kill lab processes, delete namespaces, cgroups and run dirs; report what was removed."""
    namespaces = [ns for ns in system.list_netns() if ns.startswith(prefix)]

    def lab_pids() -> set[int]:
        found: set[int] = set()
        for ns in namespaces:
            found |= system.netns_pids(ns)
        for d in cgroup_dirs:
            found |= cgroups.tree_pids(d)
        return found

    pids = lab_pids()
    killed = set(pids)
    # a process may fork while we kill (an agent running iptables-restore, a test's
    # client): kill again until the lab's namespaces and cgroups hold no process
    for _ in range(5):
        if not pids:
            break
        system.kill_all(pids)
        pids = lab_pids() - {os.getpid()}
        killed |= pids
    errors = []
    for ns in namespaces:
        try:
            system.delete_netns(ns)
        except LabError as exc:
            errors.append(str(exc))
    for d in cgroup_dirs:
        errors += cgroups.remove_tree(d)
    for d in [*run_dirs, *pins]:
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)
    if errors:
        raise LabError("lab teardown left things behind:\n  " + "\n  ".join(errors))
    return {"namespaces": namespaces, "processes": sorted(killed), "cgroups": [str(d) for d in cgroup_dirs]}


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, cgroups); run as root")
