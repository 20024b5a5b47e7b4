"""Names and addresses of a lab, derived from the lab name and counts alone.

Everything a lab creates carries the prefix ``hm-<lab>-`` (namespaces) or lives under
``hm-<lab>/`` (cgroups) and ``/run/hostmesh/lab/<lab>/`` (logs, config), so that
``lab down`` can find it again without a state file, also after a crash.

Addressing (ARCHITECTURE.md, "The lab"): fabric 198.18.0.0/24 with the control plane on
198.18.0.2 and node N on 198.18.0.(10+N); pods of node N in 198.18.N.0/24 (pod k is
198.18.N.k); service VIPs in 198.19.0.0/16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshlab.errors import LabError

NAMESPACE_PREFIX = "hm-"
RUN_ROOT = "/run/hostmesh/lab"
DEFAULT_LAB = "lab"
MAX_NODES = 32
MAX_PODS_PER_NODE = 64

FABRIC_CIDR = "198.18.0.0/24"
CONTROLPLANE_IP = "198.18.0.2"
SERVICE_CIDR = "198.19.0.0/16"
# Pods see the node as this on-link gateway (as Calico does): every node-side pod veth
# holds it as a /32, and pods resolve it through a permanent neighbour entry.
POD_GATEWAY = "169.254.1.1"
# The one route a pod gets: the whole lab range, nothing else (no route out).
LAB_RANGE = "198.18.0.0/15"

_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_NODE_NAME = re.compile(r"^node([1-9][0-9]*)$")
_POD_NAME = re.compile(r"^pod-([1-9][0-9]*)$")


def check_lab_name(name: str) -> str:
    if not _LAB_NAME.match(name or ""):
        raise LabError(
            f"invalid lab name {name!r}: use 1-10 characters, a lowercase letter first, "
            "then lowercase letters or digits (it becomes part of namespace names)"
        )
    return name


def check_counts(nodes: int, pods_per_node: int) -> None:
    if not 1 <= nodes <= MAX_NODES:
        raise LabError(f"invalid --nodes {nodes}: a lab has 1 to {MAX_NODES} nodes")
    if not 1 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise LabError(f"invalid --pods-per-node {pods_per_node}: use 1 to {MAX_PODS_PER_NODE}")


@dataclass(frozen=True)
class LabNames:
    """Every name of one lab, computed from its name."""

    lab: str

    @property
    def prefix(self) -> str:
        return f"{NAMESPACE_PREFIX}{self.lab}-"

    @property
    def fabric_ns(self) -> str:
        return f"{self.prefix}fabric"

    @property
    def controlplane_ns(self) -> str:
        return f"{self.prefix}cp"

    def node_ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def pod_ns(self, node: str, pod: str) -> str:
        return f"{self.prefix}{node}-{pod}"

    @property
    def cgroup_dir(self) -> str:
        """Relative to the cgroup2 mount point."""
        return f"{NAMESPACE_PREFIX}{self.lab}"

    def node_cgroup(self, node: str) -> str:
        # node-level processes (the agent) live in a leaf next to the pods' cgroups
        return f"{self.cgroup_dir}/{node}/system"

    def pod_cgroup(self, node: str, pod: str) -> str:
        return f"{self.cgroup_dir}/{node}/{pod}"

    @property
    def controlplane_cgroup(self) -> str:
        return f"{self.cgroup_dir}/controlplane"

    @property
    def run_dir(self) -> str:
        return f"{RUN_ROOT}/{self.lab}"

    def parse_ns(self, ns: str) -> tuple[str, str | None] | None:
        """'hm-lab-node1-pod-2' -> ('node1', 'pod-2'); 'hm-lab-node1' -> ('node1', None)."""
        if not ns.startswith(self.prefix):
            return None
        rest = ns[len(self.prefix):]
        node, _, pod = rest.partition("-")
        if not _NODE_NAME.match(node):
            return None
        if not pod:
            return node, None
        return (node, pod) if _POD_NAME.match(pod) else None


def node_name(n: int) -> str:
    return f"node{n}"


def pod_name(k: int) -> str:
    return f"pod-{k}"


def node_index(node: str) -> int:
    m = _NODE_NAME.match(node)
    if not m:
        raise LabError(f"invalid node name {node!r}")
    return int(m.group(1))


def pod_index(pod: str) -> int:
    m = _POD_NAME.match(pod)
    if not m:
        raise LabError(f"invalid pod name {pod!r}")
    return int(m.group(1))


def node_ip(n: int) -> str:
    return f"198.18.0.{10 + n}"


def pod_cidr(n: int) -> str:
    return f"198.18.{n}.0/24"


def pod_ip(n: int, k: int) -> str:
    return f"198.18.{n}.{k}"


def pod_veth(pod: str) -> str:
    """The node-side end of a pod's veth pair (inside the node's namespace)."""
    return f"vp-{pod}"[:15]
