"""A tiny two-node topology for the capture tests, built only from network namespaces.

    hm-capt-<pid>[-tag]-fabric   bridge br0, one veth per node (f-node1, f-node2) enslaved to it
    hm-capt-<pid>[-tag]-node1    eth0 198.18.0.11/24 (peer of f-node1); vpod1 -> pod1
                                 route 198.18.1.1/32 dev vpod1 scope link
                                 route 198.18.2.0/24 via 198.18.0.12
                                 route 198.19.0.0/16 via 198.18.0.12 (the "VIP" range, see below)
                                 net.ipv4.ip_forward=1
    hm-capt-<pid>[-tag]-node2    eth0 198.18.0.12/24; vpod2 -> pod2; 198.19.0.10/32 on lo
                                 route 198.18.2.1/32 dev vpod2, route 198.18.1.0/24 via 198.18.0.11
    hm-capt-<pid>[-tag]-pod1     eth0 198.18.1.1/32; route 169.254.1.1 dev eth0 scope link;
                                 route 198.18.0.0/15 via 169.254.1.1; permanent neighbour
                                 169.254.1.1 -> the node-side veth's (fixed) MAC
    hm-capt-<pid>[-tag]-pod2     eth0 198.18.2.1/32, same gateway set-up
    hm-capt-<pid>[-tag]-pod3     eth0 198.18.1.2/32 on node1 (vpod3): a second local pod, for
                                 the local pod -> local pod case

Every veth is created with `ip -n <ns> link add ... peer name ... netns <ns2>`, i.e. from
inside a lab namespace and straight into another one: nothing is ever created in, or
connected to, the machine's root namespace, and nothing has a route out of 198.18.0.0/15.

198.19.0.10 lives on node2's loopback and node1 routes the VIP range to node2, so without
capture pod1 -> 198.19.0.10:80 really reaches a server (the control case of the
fail-closed test); with capture it must be redirected on node1 instead.

**Node-side veth address.** REDIRECT rewrites the destination to the *primary IPv4 address
of the interface the packet came in on*, and drops the packet when that interface has no
IPv4 address. A point-to-point CNI whose node-side veth carries no address therefore gets
its pods' SYNs silently dropped by REDIRECT. The lab puts the pods' gateway address
169.254.1.1/32 on each node-side veth by default (`node_veth_address`); pass None to build
the address-less variant (the tests use it to show the drop and the verify() warning).

All sockets are opened in-process with `nodeagent.capture.netns.socket_in()`, so a test
can listen "in node1" and connect "from pod1" without spawning servers or polling for
readiness. Names embed the pid: `cleanup_stale()` removes namespaces of dead test runs
and never touches those of a live process.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field

from nodeagent.capture.netns import NETNS_DIR, run, socket_in

PREFIX = "hm-capt-"
NODE_VETH_MAC = "ee:ee:ee:ee:ee:ee"
POD_GATEWAY = "169.254.1.1"
NODE_IP = {"node1": "198.18.0.11", "node2": "198.18.0.12"}
POD_IP = {"pod1": "198.18.1.1", "pod2": "198.18.2.1", "pod3": "198.18.1.2"}
POD_CIDR = {"node1": "198.18.1.0/24", "node2": "198.18.2.0/24"}
POD_NODE = {"pod1": "node1", "pod2": "node2", "pod3": "node1"}
POD_VETH = {"pod1": "vpod1", "pod2": "vpod2", "pod3": "vpod3"}
VIP = "198.19.0.10"
VIP_CIDR = "198.19.0.0/16"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lab_namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def cleanup_stale() -> list[str]:
    """Delete hm-capt-<pid>-* namespaces whose pid is no longer running; returns their names."""
    removed = []
    for name in lab_namespaces():
        m = re.match(rf"{re.escape(PREFIX)}(\d+)-", name)
        if m and not _pid_alive(int(m.group(1))):
            run(["ip", "netns", "del", name])
            removed.append(name)
    return removed


@dataclass
class CaptureLab:
    tag: str = ""
    node_veth_address: str | None = POD_GATEWAY
    _sockets: list[socket.socket] = field(default_factory=list, repr=False)
    _created: list[str] = field(default_factory=list, repr=False)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{os.getpid()}-" + (f"{self.tag}-" if self.tag else "")

    def ns(self, role: str) -> str:
        """Namespace name of a role: node1, node2, pod1, pod2, pod3, fabric."""
        return self.prefix + role

    # -- commands ---------------------------------------------------------------------
    def sh(self, role: str, *argv: str, check: bool = True, input: str | None = None):
        return run(list(argv), netns=self.ns(role), check=check, input=input)

    def ip(self, role: str, args: str, check: bool = True):
        """`ip -n <ns> <args>`: iproute2 addresses the namespace itself."""
        return run(["ip", "-n", self.ns(role), *args.split()], check=check)

    # -- lifecycle ----------------------------------------------------------------------
    def up(self) -> "CaptureLab":
        for tool in ("ip", "iptables-save", "iptables-restore"):
            if not shutil.which(tool):
                raise RuntimeError(f"capture lab needs {tool}")
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _add_ns(self, role: str) -> None:
        name = self.ns(role)
        run(["ip", "netns", "add", name], check=True)
        self._created.append(name)
        self.ip(role, "link set lo up")

    def _build(self) -> None:
        for role in ("fabric", "node1", "node2", *POD_NODE):
            self._add_ns(role)
        self.ip("fabric", "link add br0 type bridge")
        self.ip("fabric", "link set br0 up")
        for node in ("node1", "node2"):
            # created inside the fabric namespace, peer born inside the node namespace
            self.ip("fabric", f"link add f-{node} type veth peer name eth0 netns {self.ns(node)}")
            self.ip("fabric", f"link set f-{node} master br0")
            self.ip("fabric", f"link set f-{node} up")
            self.ip(node, f"addr add {NODE_IP[node]}/24 dev eth0")
            self.ip(node, "link set eth0 up")
            self._sysctl(node, "net.ipv4.ip_forward", "1")
        for pod, node in POD_NODE.items():
            veth = POD_VETH[pod]
            self.ip(node, f"link add {veth} address {NODE_VETH_MAC} type veth peer name eth0 "
                          f"netns {self.ns(pod)}")
            if self.node_veth_address:
                self.ip(node, f"addr add {self.node_veth_address}/32 dev {veth} scope link")
            self.ip(node, f"link set {veth} up")
            self.ip(node, f"route add {POD_IP[pod]}/32 dev {veth} scope link")
            self.ip(pod, f"addr add {POD_IP[pod]}/32 dev eth0")
            self.ip(pod, "link set eth0 up")
            self.ip(pod, f"route add {POD_GATEWAY} dev eth0 scope link")
            self.ip(pod, f"route add 198.18.0.0/15 via {POD_GATEWAY} dev eth0")
            self.ip(pod, f"neigh add {POD_GATEWAY} lladdr {NODE_VETH_MAC} dev eth0 nud permanent")
        self.ip("node1", f"route add {POD_CIDR['node2']} via {NODE_IP['node2']}")
        self.ip("node2", f"route add {POD_CIDR['node1']} via {NODE_IP['node1']}")
        self.ip("node2", f"addr add {VIP}/32 dev lo")
        self.ip("node1", f"route add {VIP_CIDR} via {NODE_IP['node2']}")

    def _sysctl(self, role: str, key: str, value: str) -> None:
        if shutil.which("sysctl"):
            self.sh(role, "sysctl", "-q", "-w", f"{key}={value}")
            return
        path = "/proc/sys/" + key.replace(".", "/")
        self.sh(role, "sh", "-c", f"echo {value} > {path}")

    def down(self) -> None:
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
        self._sockets.clear()
        for name in reversed(self._created):
            run(["ip", "netns", "del", name])
        self._created.clear()
        # anything of ours the list missed (e.g. a failure between add and append)
        for name in lab_namespaces():
            if name.startswith(self.prefix):
                run(["ip", "netns", "del", name])

    def __enter__(self) -> "CaptureLab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- sockets ------------------------------------------------------------------------
    def listen(self, role: str, port: int, addr: str = "0.0.0.0") -> socket.socket:
        s = socket_in(self.ns(role))
        self._sockets.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(16)
        return s

    def connect(self, role: str, addr: str, port: int, *, timeout: float = 3.0,
                mark: int | None = None) -> socket.socket:
        """A connected TCP socket from `role` (raises OSError/TimeoutError like connect())."""
        s = socket_in(self.ns(role))
        self._sockets.append(s)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.settimeout(timeout)
        s.connect((addr, port))
        return s

    def close(self, s: socket.socket) -> None:
        s.close()
        if s in self._sockets:
            self._sockets.remove(s)

    def reset_netfilter(self, role: str) -> None:
        """Wipe every netfilter table of a lab namespace (tests only: never the root one)."""
        assert self.ns(role).startswith(PREFIX)
        if shutil.which("nft"):
            self.sh(role, "nft", "flush", "ruleset")
            return
        for table in ("nat", "filter", "mangle", "raw"):
            self.sh(role, "iptables-restore", input=f"*{table}\nCOMMIT\n", check=False)

    # -- snapshots ----------------------------------------------------------------------
    def iptables_save(self, role: str, table: str | None = None) -> str:
        """`iptables-save` of a namespace without the timestamp comments and counters."""
        argv = ["iptables-save"] + (["-t", table] if table else [])
        return strip_save(self.sh(role, *argv).stdout)

    def network_state(self, role: str) -> dict[str, str]:
        """Everything capture could conceivably leave behind, as comparable text."""
        state = {
            "iptables-save": self.iptables_save(role),
            "ip rule": self.ip(role, "rule").stdout,
            "ip route table all": self.ip(role, "route show table all").stdout,
            "ip -6 rule": self.ip(role, "-6 rule").stdout,
        }
        if shutil.which("nft"):
            state["nft list ruleset"] = self.sh(role, "nft", "list", "ruleset").stdout
        return state


class Acceptor:
    """Accepts connections on a listening socket in a background thread, keeps them."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.conns: list[socket.socket] = []
        self._cv = threading.Condition()
        self._stop = False
        listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._cv:
                self.conns.append(conn)
                self._cv.notify_all()

    def wait(self, n: int = 1, timeout: float = 3.0) -> list[socket.socket]:
        with self._cv:
            self._cv.wait_for(lambda: len(self.conns) >= n, timeout=timeout)
            return list(self.conns)

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.listener.close()
        for c in self.conns:
            c.close()


_COUNTERS = re.compile(r"\[\d+:\d+\]")


def strip_save(text: str) -> str:
    """iptables-save text without '# Generated/Completed' lines and packet counters."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        out.append(_COUNTERS.sub("[0:0]", line))
    return "\n".join(out) + ("\n" if out else "")
