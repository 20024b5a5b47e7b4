"""eBPF capture backend: connect-time redirection (cgroup/connect4) and eBPF TPROXY inbound.

What it installs for one agent (``instance`` = e.g. ``<lab>-<node>``; several agents can
share a kernel, each with its own pins)::

    /sys/fs/bpf/hostmesh/<instance>/      pinned maps (bpf/lib/maps.h) and programs (prog_*)
    cgroup/connect4, connect6 + sockops   on every cgroup in spec.cgroups (pods, host units)
    cgroup/getsockopt                     on the agent's own cgroup (the proxy's sockets)
    tc clsact ingress filter              on the node's fabric interface(s)
    sk_lookup                             on the node's netns (a BPF link, pinned as link_sk_lookup)
    ip rule fwmark 0x150060 lookup 15006  + `local 0.0.0.0/0 dev lo table 15006`
    IP_TRANSPARENT on the inbound listener, which goes into the hm_listen sockmap
    spec.accelerate only: sockops_accel on the capture cgroups and the agent's cgroup,
                          sk_msg attached to the hm_socks sockhash

Outbound (bpf/connect4.c, bpf/connect6.c, bpf/sockops.c). A pod's connect() to a mesh destination (LPM
trie of spec.mesh_cidrs) is rewritten *before the SYN exists* to the proxy's outbound
listener: ``spec.redirect_address:15001`` — the pods' gateway on the node-side veth
(169.254.1.1 in the lab), because a pod lives in its own network namespace and its
127.0.0.1 is not the node. A process of a selected host cgroup (same namespace as the
proxy, recognised by its netns cookie) is sent to 127.0.0.1:15001 instead. The original
destination is stored under the socket cookie, and sockops (TCP_CONNECT_CB, local port
known, SYN not yet sent) files it under the 4-tuple the proxy will see. connect6 does the
same for dual-stack sockets dialing IPv4-mapped addresses (gRPC C-core does that): iptables
sees their IPv4 packets anyway, connect-time capture must hook both.

Original destination: cgroup/getsockopt, not a map lookup in Python. The proxy keeps its
single code path, ``getsockopt(SOL_IP, SO_ORIGINAL_DST)``, exactly as under iptables
REDIRECT; bpf/getsockopt.c (attached to the agent's cgroup) answers it from the map. One
syscall per connection instead of getpeername + getsockname + a map lookup, and any proxy
that speaks SO_ORIGINAL_DST (Envoy's original_dst) works unchanged — Merbridge's choice.
The program answers a socket with no entry with its own local address, as conntrack does
for an un-NATed connection, which is also exactly right for inbound (below) and keeps the
proxy's loop guard working. ``original_destination()`` falls back to reading the map from
Python only when the program could not be attached (the agent runs in the root cgroup,
where hostmesh never attaches anything).

Inbound (bpf/tc_inbound.c, bpf/sk_lookup.c): pure eBPF, no iptables. A SYN arriving on
the fabric interface for a local pod is marked at tc ingress; the policy route above
delivers marked packets locally although the destination is the pod's address, and the
sk_lookup program on the node's netns answers the kernel's listener lookup with the
proxy's 0.0.0.0:15006 listener (TPROXY in eBPF, as Cloudflare's sk_lookup and Cilium's
bpf_sk_assign do it). The kernel's own 4-tuple lookup runs first, so a SYN that reuses a
4-tuple this node still holds in TIME_WAIT gets the kernel's usual TIME_WAIT handling
(assigning the SYN to the listener at tc skipped it, and the kernel silently dropped such
SYNs: a client connect timed out whenever its kernel picked the source port of a connection
this node had closed first). The listener needs IP_TRANSPARENT (the SYN-ACK leaves from
the pod's address); the backend sets it on the listener it finds among the agent process's
own sockets (install() runs after the proxy bound its listeners) and puts it in the
hm_listen sockmap. The accepted socket's local address *is* the original destination.
Later packets only need the mark (their socket is found by the normal lookup); packets of
connections opened before capture pass untouched. Known limit: a connection completed by
a SYN cookie (listen queue overflow) is not recognised on its first ACK and is forwarded
to the pod, which resets it.

Loop avoidance: the proxy's sockets live in the agent's cgroup, where connect4 is never
attached; connect4 also skips the agent's cgroup id and the proxy's socket mark. Capture
cgroups that contain the agent (or are the cgroup root) are refused.

Fail closed: cgroup attachments and the tc filter belong to the kernel, not the agent
process. With the agent SIGKILLed, pods are still redirected to 169.254.1.1:15001 where
nothing listens (refused), and inbound SYNs find no listener in the sockmap (the kernel
drops a closed socket from it) and are refused — never forwarded in plaintext.

Restart and removal: a new agent adopts the pins (same build: no compile, same program
ids, nothing re-attached) and re-registers its new listener; a changed build is attached
next to the old one before the old one is detached. remove() detaches from every cgroup
recorded in hm_cgroups, removes the tc filter (and the clsact qdisc when it holds nothing
else), the ip rule and route, and every pin. Instances whose cgroups no longer exist
(a lab removed under a SIGKILLed agent) are unpinned by the next install().

Same-node acceleration (spec.accelerate, off by default: README, "Capture benchmark").
bpf/sockops_accel.c puts both ends of each same-node leg into the hm_socks sockhash when
they are established: a pod's redirected connection and the proxy's accepted socket, the
proxy's upstream socket to a local pod and the pod's accepted socket. bpf/sk_msg.c then
hands every message of such a socket to its peer's receive queue (bpf_msg_redirect_hash,
BPF_F_INGRESS), skipping TCP/IP and the veth. Connections to other hosts keep their
node-facing leg on TCP. The kernel unlinks a socket from the map when it is closed; no
state callback deletes entries at TCP_CLOSE, because that would drop bytes still queued
for a half-closed reader (the reply after EOF). The ingress redirect charges the receiving
socket without looking at its receive buffer (no flow control), so each socket redirects
at most ACCEL_BUDGET bytes and then continues over TCP/IP for good (bench/capture.py
"stalled receiver" shows why). Switching it off (restart with accelerate: false) detaches
both programs; sockets already in the map stay accelerated until they close.

IPv4 only: connect6/IPv6 inbound are not implemented (the lab has no IPv6).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

from nodeagent import cgroups as cgmod
from nodeagent.capture import ebpf_maps as m
from nodeagent.capture import netns as nsmod
from nodeagent.capture.base import Capture, CaptureSpec, CaptureStatus
from nodeagent.capture.ebpf_loader import (
    CGROUP_PROGRAMS,
    PIN_ROOT,
    PROGRAMS,
    BpfLoader,
    cgroup_id,
    collect_orphans,
    ensure_bpffs,
)
from nodeagent.capture.origdst import so_original_dst
from nodeagent.errors import CaptureError

log = logging.getLogger("hostmesh.capture.ebpf")

DEFAULT_REDIRECT_ADDRESS = "169.254.1.1"
DEFAULT_INSTANCE = "default"
INBOUND_MARK = 0x150060
ROUTE_TABLE = 15006
RULE_PRIORITY = 15006
IP_TRANSPARENT = 19
SO_COOKIE = 57
SO_NETNS_COOKIE = 71
# attached to every capture cgroup (the agent's own cgroup gets only getsockopt)
CAPTURE_PROGRAMS = ("connect4", "connect6", "sockops")
# same-node acceleration (spec.accelerate): sockops_accel on the capture cgroups and the agent's
# cgroup, sk_msg on the hm_socks sockhash
ACCEL_PROGRAM = "sockops_accel"
ACCEL_MSG_PROGRAM = "sk_msg"
# bytes one accelerated socket may hand to its peer before it continues over TCP/IP, where the
# receive window bounds what is in flight (bpf/sk_msg.c): covers request/response traffic,
# keeps bulk transfers from queueing unbounded kernel memory behind a slow reader
ACCEL_BUDGET = 1 << 20


def netns_cookie(netns: str | None) -> int:
    """The network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+), 0 when unavailable."""
    s = nsmod.socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    except OSError:
        return 0
    finally:
        s.close()


def own_cgroup() -> str | None:
    """This process's cgroup v2 directory (absolute), None when it is the root or unknown."""
    root = cgmod.find_cgroup2_mount()
    if root is None:
        return None
    try:
        for line in open("/proc/self/cgroup"):
            hid, _, rest = line.rstrip("\n").partition(":")
            controllers, _, path = rest.partition(":")
            if hid == "0" and controllers == "":
                if path in ("", "/"):
                    return None
                return os.path.join(root, path.lstrip("/"))
    except OSError:
        return None
    return None


def probe(spec: CaptureSpec | None = None) -> tuple[bool, str]:
    """Cheap checks for `--capture auto`: can this host plausibly run the eBPF backend?"""
    import importlib.util
    import platform

    if os.geteuid() != 0:
        return False, "not root (loading and attaching eBPF programs needs CAP_BPF + CAP_NET_ADMIN)"
    if cgmod.find_cgroup2_mount() is None:
        return False, "no cgroup v2 hierarchy is mounted (cgroup/connect4 attaches to cgroup v2)"
    if not os.path.isdir("/sys/fs/bpf"):
        return False, "/sys/fs/bpf is missing (no bpf filesystem for pins)"
    if importlib.util.find_spec("bcc") is None:
        return False, "bcc is not importable (install python3-bpfcc; venvs need --system-site-packages)"
    release = platform.release()
    if not (os.path.isdir(f"/lib/modules/{release}/build") or os.environ.get("BCC_KERNEL_SOURCE")
            or os.path.exists("/sys/kernel/kheaders.tar.xz")):
        return False, (f"no kernel headers for bcc: /lib/modules/{release}/build is missing "
                       f"(install linux-headers, or set BCC_KERNEL_SOURCE)")
    if spec is not None:
        root = cgmod.find_cgroup2_mount()
        for g in spec.cgroups:
            path = g if os.path.isabs(g) else os.path.join(root, g)
            if not os.path.isdir(path):
                return False, f"capture cgroup {path} does not exist"
    return True, "eBPF prerequisites present"


class EbpfCapture(Capture):
    name = "ebpf"

    def __init__(self, spec: CaptureSpec, *, netns: str | None = None, proxy_cgroup: str | None = None,
                 inbound_interfaces: tuple[str, ...] | None = None, pin_root: str = PIN_ROOT) -> None:
        super().__init__(spec, netns=netns)
        self.instance = spec.instance or DEFAULT_INSTANCE
        self.redirect_address = spec.redirect_address or DEFAULT_REDIRECT_ADDRESS
        self.pin_root = pin_root
        self._proxy_cgroup_arg = proxy_cgroup
        self._inbound_interfaces_arg = inbound_interfaces
        self._lock = threading.RLock()
        self._runtime: BpfLoader | None = None     # open maps while installed (counters, fallback)
        self._getsockopt_attached = False
        self.how_loaded = ""
        self.notes: list[str] = []
        self._metrics_registered = False

    def _in_netns(self, fn, *args):
        """Run fn in a short-lived thread in the target netns. Always a fresh thread: pyroute2's
        synchronous API runs its own asyncio loop, which fails inside the agent's loop thread
        (describe() is called from the admin endpoint)."""
        if self.netns is not None:
            return nsmod.call_in(self.netns, fn, *args)
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                box["result"] = fn(*args)
            except BaseException as exc:  # re-raised in the caller
                box["error"] = exc

        t = threading.Thread(target=body, name="ebpf-netlink", daemon=True)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    # ------------------------------------------------------------------ resolution
    def _cg_root(self) -> str:
        root = cgmod.find_cgroup2_mount()
        if root is None:
            raise CaptureError("ebpf capture: no cgroup v2 hierarchy is mounted; cgroup/connect4 needs one")
        return os.path.realpath(root)

    def proxy_cgroup(self) -> str | None:
        """The agent's (the proxy's) cgroup: cgroup/getsockopt goes there. None: not attachable."""
        path = self._proxy_cgroup_arg if self._proxy_cgroup_arg is not None else own_cgroup()
        if not path:
            return None
        root = self._cg_root()
        path = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
        if path == root or not path.startswith(root + os.sep):
            return None  # never the root cgroup, never outside the hierarchy
        return path

    def capture_cgroups(self) -> list[str]:
        """spec.cgroups as absolute directories, checked: inside the hierarchy, not the root,
        not the agent's own cgroup or an ancestor of it (that would capture the proxy)."""
        root = self._cg_root()
        proxy = self.proxy_cgroup() or (own_cgroup() or "")
        out = []
        for g in self.spec.cgroups:
            path = os.path.realpath(g if os.path.isabs(g) else os.path.join(root, g.lstrip("/")))
            if not path.startswith(root + os.sep):
                raise CaptureError(f"ebpf capture: cgroup {g!r} is not below the cgroup v2 hierarchy at {root} "
                                   f"(hostmesh never attaches to the root cgroup)")
            if proxy and (proxy == path or proxy.startswith(path + os.sep)):
                raise CaptureError(f"ebpf capture: cgroup {path} contains the agent itself ({proxy}); capturing it "
                                   f"would loop the proxy's own connections")
            if not os.path.isdir(path):
                raise CaptureError(f"ebpf capture: cgroup {path} does not exist")
            out.append(path)
        return out

    def inbound_interfaces(self) -> list[str]:
        """Interfaces tc_inbound goes on: all but loopback and the interfaces routes to local
        pods use (pod veths); in the lab that is the fabric interface eth0. Runs in netns."""
        if self._inbound_interfaces_arg is not None:
            return list(self._inbound_interfaces_arg)
        from pyroute2 import IPRoute

        pods = [ipaddress.IPv4Network(c) for c in self.spec.pod_cidrs]
        with IPRoute() as ipr:
            links = {l["index"]: (l.get_attr("IFLA_IFNAME"), l["flags"]) for l in ipr.get_links()}
            pod_ifs = set()
            for r in ipr.get_routes(family=socket.AF_INET, table=254):
                dst, oif = r.get_attr("RTA_DST"), r.get_attr("RTA_OIF")
                if not dst or oif is None or r.get_attr("RTA_GATEWAY"):
                    continue
                net = ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False)
                if any(net.subnet_of(p) for p in pods):
                    pod_ifs.add(oif)
        return sorted(name for idx, (name, flags) in links.items()
                      if not flags & 0x8 and idx not in pod_ifs)  # IFF_LOOPBACK

    # ------------------------------------------------------------------ desired config
    def desired_config(self, netns_ck: int) -> m.HmConfig:
        proxy = self.proxy_cgroup()
        flags = m.HM_F_OUTBOUND | m.HM_F_INBOUND | (m.HM_F_LOCAL_NETNS if netns_ck else 0)
        return m.HmConfig(redirect_ip4=m.ip4(self.redirect_address), outbound_port=m.port(self.spec.outbound_port),
                          inbound_port=m.port(self.spec.inbound_port), socket_mark=self.spec.socket_mark,
                          inbound_mark=INBOUND_MARK, proxy_cgroup_id=cgroup_id(proxy) if proxy else 0,
                          proxy_netns_cookie=netns_ck, flags=flags, accel_budget=ACCEL_BUDGET)

    def _write_config(self, ld: BpfLoader) -> None:
        ld.maps["hm_config"].put(0, self.desired_config(netns_cookie(self.netns)))
        for name, cidrs in (("hm_mesh", self.spec.mesh_cidrs), ("hm_pods", self.spec.pod_cidrs)):
            mp = ld.maps[name]
            want = {c: m.cidr_key(c) for c in cidrs}
            for c, k in want.items():
                mp.put(k, 1)
            for k in mp.keys():
                if m.cidr_text(k) not in want:
                    mp.delete(k)
        skip = ld.maps["hm_inb_skip"]
        for p in self.spec.exclude_inbound_ports:
            skip.put(p, 1)
        for k in skip.keys():
            if k.value not in self.spec.exclude_inbound_ports:
                skip.delete(k)

    # ------------------------------------------------------------------ interface
    def install(self) -> None:
        with self._lock:
            cgroups = self.capture_cgroups()
            proxy = self.proxy_cgroup()
            ensure_bpffs()
            loader = BpfLoader(self.instance, pin_root=self.pin_root)
            fresh = not loader.exists()
            try:
                collect_orphans(self.pin_root, keep=self.instance)
                with loader as ld:
                    self.how_loaded = ld.load()
                    self._write_config(ld)
                    for cg in cgroups:
                        for key in CAPTURE_PROGRAMS:
                            ld.attach_cgroup(cg, key)
                    if proxy:
                        ld.attach_cgroup(proxy, "getsockopt")
                    self._reconcile_acceleration(ld, cgroups, proxy)
                    keep = set(cgroups) | ({proxy} if proxy else set())
                    for path in ld.registered_cgroups():
                        if path not in keep:
                            ld.detach_cgroup(path)
                            ld.unregister(path)
                    self._in_netns(self._install_in_netns, ld)
            except BaseException as exc:
                if fresh:
                    try:
                        self.remove()
                    except CaptureError as rexc:
                        log.error("rollback after a failed eBPF install failed too: %s", rexc)
                if isinstance(exc, OSError):
                    raise CaptureError(f"ebpf capture: install failed: {exc}; "
                                       f"{'nothing was left installed' if fresh else 'the previous state stays'}") from None
                raise
            self._getsockopt_attached = proxy is not None
            self.notes = [] if proxy else [
                "the agent runs in the root cgroup (or none is known): cgroup/getsockopt is not attached there, "
                "the original destination is read from the map by the agent"]
            if self.spec.accelerate and not proxy:
                self.notes.append("acceleration is on but the agent runs in the root cgroup: the proxy's sockets "
                                  "cannot be put into hm_socks, so nothing is accelerated")
            self._open_runtime()
            self.last_status = CaptureStatus(ok=True, problems=[], checked_at=time.time())
            log.info("eBPF capture installed", extra={"instance": self.instance, "programs": self.how_loaded,
                                                      "cgroups": len(cgroups)})

    def _accelerating(self, proxy: str | None) -> bool:
        """Acceleration needs the proxy's sockets in hm_socks: sockops on the agent's own cgroup."""
        return self.spec.accelerate and proxy is not None

    def _reconcile_acceleration(self, ld: BpfLoader, cgroups: list[str], proxy: str | None) -> None:
        """On: sockops_accel on the capture cgroups and the agent's, sk_msg on hm_socks. Off: none
        of it anywhere (an earlier agent may have switched it on)."""
        targets = cgroups + ([proxy] if proxy else [])
        if self._accelerating(proxy):
            ld.attach_sockmap(ACCEL_MSG_PROGRAM)  # first, so every inserted socket gets it
            for cg in targets:
                ld.attach_cgroup(cg, ACCEL_PROGRAM)
            return
        for cg in set(targets) | set(ld.registered_cgroups()):
            ld.detach_program(cg, ACCEL_PROGRAM)
        ld.detach_sockmap(ACCEL_MSG_PROGRAM)

    def _verify_acceleration(self, ld: BpfLoader) -> list[str]:
        proxy = self.proxy_cgroup()
        targets = self.capture_cgroups() + ([proxy] if proxy else [])
        p = PROGRAMS[ACCEL_PROGRAM]
        problems = []
        on = self._accelerating(proxy)
        for cg in targets:
            ids = [pid for pid, name in ld.attached(cg, p.attach_type) if name == p.func]
            if on and ld.prog_ids[ACCEL_PROGRAM] not in ids:
                problems.append(f"{p.func} is not attached to {cg} (acceleration is on)")
            if not on and ids:
                problems.append(f"{p.func} is attached to {cg} but acceleration is off")
        msg = ld.sockmap_attached(ACCEL_MSG_PROGRAM)
        if on and msg != [ld.prog_ids[ACCEL_MSG_PROGRAM]]:
            problems.append(f"hm_sk_msg is not (the only program) attached to hm_socks (have {msg})")
        if not on and msg:
            problems.append(f"programs {msg} are attached to hm_socks but acceleration is off")
        return problems

    def acceleration_view(self, ld: BpfLoader) -> dict[str, Any]:
        """For /capture: switched on?, what is attached, how many sockets are in hm_socks now."""
        limit = 4096
        n = ld.maps["hm_socks"].count(limit)
        return {"enabled": self._accelerating(self.proxy_cgroup()), "requested": self.spec.accelerate,
                "sk_msg_attached": ld.sockmap_attached(ACCEL_MSG_PROGRAM),
                "sockets": n if n < limit else f">={limit}",
                "pending_peers": ld.maps["hm_pending"].count(limit)}

    def _install_in_netns(self, ld: BpfLoader) -> None:
        ifaces = self.inbound_interfaces()
        ld.attach_netns()  # before tc marks anything: a marked SYN needs it to find the listener
        for name in ifaces:
            ld.attach_tc(name)
        for name in ld.tc_interfaces():
            if name not in ifaces:
                ld.detach_tc(name)
        _ensure_routing()
        self._register_listener(ld)

    def _open_runtime(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
        rt = BpfLoader(self.instance, pin_root=self.pin_root)
        try:
            rt.load(compile=False)
        except (CaptureError, OSError):
            rt.close()
            self._runtime = None
            return
        self._runtime = rt

    # -- the inbound listener -------------------------------------------------------------
    def find_listener(self) -> socket.socket | None:
        """A dup of this process's TCP listener on inbound_port in the target netns, or None."""
        found = self.find_listeners()
        for extra in found[1:]:
            extra.close()
        return found[0] if found else None

    def find_listeners(self) -> list[socket.socket]:
        """Dups of every TCP listener of this process on inbound_port in the target netns
        (several with proxy workers: one SO_REUSEPORT socket each), in fd order."""
        out: list[socket.socket] = []
        want_ck = netns_cookie(self.netns)
        for name in os.listdir("/proc/self/fd"):
            try:
                if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    continue
                s = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
            except (OSError, ValueError):
                continue
            try:
                if (s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) != socket.AF_INET
                        or s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM
                        or not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                        or s.getsockname()[1] != self.spec.inbound_port):
                    s.close()
                    continue
                if want_ck:
                    ck = struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
                    if ck != want_ck:
                        s.close()
                        continue
                out.append(s)
            except OSError:
                s.close()
        return out

    def _register_listener(self, ld: BpfLoader) -> None:
        """IP_TRANSPARENT on every inbound listener (a SYN the sockmap's socket gets may be
        handed to any socket of its SO_REUSEPORT group); the sockmap holds one of them."""
        socks = self.find_listeners()
        if not socks:
            log.warning("no inbound listener on port %d in this process: inbound SYNs for local pods are "
                        "dropped (fail closed) until one is registered", self.spec.inbound_port)
            return
        try:
            cookies = []
            for s in socks:
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                cookies.append(struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])
            have = ld.maps["hm_listen"].get(0)
            if have is None or int(have.value) not in cookies:
                ld.maps["hm_listen"].put(0, ctypes.c_uint64(socks[0].fileno()))
        except OSError as exc:
            raise CaptureError(f"ebpf capture: cannot register the inbound listener: {exc}") from None
        finally:
            for s in socks:
                s.close()

    def listener_status(self) -> dict[str, Any]:
        socks = self.find_listeners()
        if not socks:
            return {"found": False}
        try:
            cookies = [struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0] for s in socks]
            info = {"found": True, "address": "%s:%d" % socks[0].getsockname(), "cookie": cookies[0],
                    "sockets": len(socks),
                    "transparent": all(bool(s.getsockopt(socket.SOL_IP, IP_TRANSPARENT)) for s in socks)}
        finally:
            for s in socks:
                s.close()
        rt = self._runtime
        if rt is not None:
            try:
                have = rt.maps["hm_listen"].get(0)
                info["in_sockmap"] = have is not None and int(have.value) in cookies
                if info["in_sockmap"]:
                    info["cookie"] = int(have.value)
            except OSError:
                info["in_sockmap"] = False
        return info

    # -- removal ----------------------------------------------------------------------------
    def leftovers(self) -> bool:
        return os.path.isdir(os.path.join(self.pin_root, self.instance))

    def remove(self) -> None:
        with self._lock:
            if self._runtime is not None:
                self._runtime.close()
                self._runtime = None
            ld = BpfLoader(self.instance, pin_root=self.pin_root)
            errors: list[str] = []
            try:
                try:
                    ld.load(compile=False)
                except (CaptureError, OSError):
                    pass  # nothing (complete) pinned: still sweep cgroups, tc and routing
                targets = set(ld.registered_cgroups())
                try:
                    targets |= set(self.capture_cgroups())
                except CaptureError:
                    pass
                proxy = self.proxy_cgroup()
                if proxy:
                    targets.add(proxy)
                for cg in sorted(targets):
                    try:
                        ld.detach_cgroup(cg)
                    except OSError as exc:
                        errors.append(f"detach from {cg}: {exc}")
                try:
                    ld.detach_sockmap(ACCEL_MSG_PROGRAM)  # unpinning would release it too; be explicit
                except OSError as exc:
                    errors.append(f"detach sk_msg from hm_socks: {exc}")
                try:
                    self._in_netns(self._remove_in_netns, ld)
                except (OSError, CaptureError) as exc:
                    errors.append(str(exc))
            finally:
                ld.close()
                ld.unpin_all()
            self.last_status = None
            self._getsockopt_attached = False
            if errors:
                raise CaptureError("ebpf capture: removal incomplete: " + "; ".join(errors))

    def _remove_in_netns(self, ld: BpfLoader) -> None:
        for name in ld.tc_interfaces():
            ld.detach_tc(name)
        ld.detach_netns()
        _remove_routing()

    # -- verification -----------------------------------------------------------------------
    def verify(self) -> CaptureStatus:
        with self._lock:
            problems: list[str] = []
            ld = BpfLoader(self.instance, pin_root=self.pin_root)
            try:
                try:
                    ld.load(compile=False)
                except (CaptureError, OSError) as exc:
                    problems.append(f"nothing adoptable is pinned in {ld.pin_dir}: {exc}")
                    return self._status(problems)
                problems += self._verify_loaded(ld)
            except (CaptureError, OSError) as exc:
                problems.append(str(exc))
            finally:
                ld.close()
            return self._status(problems)

    def _status(self, problems: list[str]) -> CaptureStatus:
        st = CaptureStatus(ok=not problems, problems=problems, checked_at=time.time())
        self.last_status = st
        return st

    def _verify_loaded(self, ld: BpfLoader) -> list[str]:
        problems = []
        try:
            if ld.pinned_build_id() != ld.build_id():
                problems.append("the pinned programs were built from other sources or flags (reinstall)")
        except CaptureError as exc:
            problems.append(str(exc))
        have = ld.maps["hm_config"].get(0)
        want = self.desired_config(netns_cookie(self.netns))
        if have is None or bytes(have) != bytes(want):
            problems.append("hm_config differs from the desired configuration")
        for name, cidrs in (("hm_mesh", self.spec.mesh_cidrs), ("hm_pods", self.spec.pod_cidrs)):
            got = sorted(m.cidr_text(k) for k in ld.maps[name].keys())
            if got != sorted(cidrs):
                problems.append(f"{name} holds {got}, expected {sorted(cidrs)}")
        for cg in self.capture_cgroups():
            for key in CAPTURE_PROGRAMS:
                p = PROGRAMS[key]
                if not any(pid == ld.prog_ids[key] for pid, _ in ld.attached(cg, p.attach_type)):
                    problems.append(f"{p.func} is not attached to {cg}")
        proxy = self.proxy_cgroup()
        if proxy and not any(pid == ld.prog_ids["getsockopt"]
                             for pid, _ in ld.attached(proxy, PROGRAMS["getsockopt"].attach_type)):
            problems.append(f"hm_getsockopt is not attached to the agent's cgroup {proxy}")
        problems += self._verify_acceleration(ld)
        problems += self._in_netns(self._verify_in_netns, ld)
        return problems

    def _verify_in_netns(self, ld: BpfLoader) -> list[str]:
        problems = []
        have = ld.tc_interfaces()
        for name in self.inbound_interfaces():
            if have.get(name) != [ld.tc_name()]:
                problems.append(f"tc ingress program missing or outdated on {name} (have {have.get(name)})")
        link = ld.netns_link()
        ino = os.stat("/proc/thread-self/ns/net").st_ino
        if link is None or link["netns_ino"] != ino or link["prog_id"] != ld.prog_ids["sk_lookup"]:
            problems.append(f"hm_sk_lookup is not attached to this network namespace (link {link}): inbound "
                            f"SYNs for local pods find no listener")
        rules, routes = _routing_state()
        if len(rules) != 1:
            problems.append(f"ip rule 'fwmark {INBOUND_MARK:#x} lookup {ROUTE_TABLE}' present {len(rules)} times")
        if len(routes) != 1:
            problems.append(f"route 'local 0.0.0.0/0 dev lo table {ROUTE_TABLE}' present {len(routes)} times")
        lst = self.listener_status()
        if not lst.get("found"):
            problems.append(f"no inbound listener on port {self.spec.inbound_port} in this process: inbound "
                            f"connections are dropped")
        elif not lst.get("transparent") or not lst.get("in_sockmap", True):
            problems.append("the inbound listener is not registered (IP_TRANSPARENT + hm_listen)")
        return problems

    # -- views ------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        rt = self._runtime
        if rt is None:
            return {}
        try:
            return rt.counters()
        except OSError:
            return {}

    def describe(self) -> dict:
        with self._lock:
            info: dict[str, Any] = {
                "backend": self.name,
                "netns": self.netns,
                "spec": self.spec.to_dict(),
                "instance": self.instance,
                "pin_dir": os.path.join(self.pin_root, self.instance),
                "redirect_address": f"{self.redirect_address}:{self.spec.outbound_port}",
                "original_destination": ("cgroup/getsockopt answers SO_ORIGINAL_DST" if self._getsockopt_attached
                                         else "map lookup by the agent"),
                "notes": list(self.notes),
                "last_verification": self.last_status.to_dict() if self.last_status else None,
            }
            ld = BpfLoader(self.instance, pin_root=self.pin_root)
            try:
                ld.load(compile=False)
                info["programs_loaded"] = self.how_loaded or "adopted"
                info["programs"] = {k: {"id": ld.prog_ids[k], "name": PROGRAMS[k].func,
                                        "pin": os.path.join(ld.pin_dir, f"prog_{k}")} for k in PROGRAMS}
                info["pinned"] = ld.pinned()
                attachments = {}
                for cg in sorted(set(ld.registered_cgroups())):
                    if not os.path.isdir(cg):
                        continue
                    attachments[cg] = sorted(name for p in CGROUP_PROGRAMS.values()
                                             for _pid, name in ld.attached(cg, p.attach_type) if name == p.func)
                info["attachments"] = attachments
                info["tc"] = self._in_netns(ld.tc_interfaces)
                info["sk_lookup"] = ld.netns_link()
                rules, routes = self._in_netns(_routing_state)
                info["policy_routing"] = {"rules": rules, "routes": routes}
                info["counters"] = ld.counters()
                info["acceleration"] = self.acceleration_view(ld)
                info["inbound_listener"] = self._in_netns(self.listener_status)
                info["entries"] = {"mesh": sorted(m.cidr_text(k) for k in ld.maps["hm_mesh"].keys()),
                                   "pods": sorted(m.cidr_text(k) for k in ld.maps["hm_pods"].keys())}
                info["installed"] = True
            except (CaptureError, OSError) as exc:
                info["installed"] = False
                info["error"] = str(exc)
            finally:
                ld.close()
            return info

    def register_metrics(self, registry) -> None:
        """Expose the eBPF counters as hostmesh_agent_capture_ebpf_events_total{event=...}."""
        if self._metrics_registered:
            return
        from prometheus_client.core import CounterMetricFamily

        capture = self

        class _Collector:
            def collect(self):
                fam = CounterMetricFamily("hostmesh_agent_capture_ebpf_events",
                                          "eBPF capture events counted in the hm_counters map", labels=["event"])
                for name, value in capture.counters().items():
                    fam.add_metric([name], value)
                yield fam

            def describe(self):
                return []

        registry.register(_Collector())
        self._metrics_registered = True

    # -- original destination -----------------------------------------------------------------
    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        if self._getsockopt_attached:
            return so_original_dst(sock)  # answered by bpf/getsockopt.c: one syscall
        try:
            answer: tuple[str, int] | None = so_original_dst(sock)
        except CaptureError:
            answer = None
        local, peer = sock.getsockname(), sock.getpeername()
        rt = self._runtime
        if rt is not None:
            t = m.HmTuple(saddr=m.ip4(peer[0]), daddr=m.ip4(local[0]), sport=m.port(peer[1]), dport=m.port(local[1]))
            try:
                hit = rt.maps["hm_origdst"].get(t)
            except OSError:
                hit = None
            if hit is not None:
                return m.ip4_text(hit.addr), m.port_host(hit.port)
        if answer is not None:
            return answer
        return local[0], local[1]  # conntrack's answer for an un-NATed connection (and sk_assign inbound)


# ---------------------------------------------------------------------- policy routing


def _routing_state() -> tuple[list[str], list[str]]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        rules = [f"{r.get_attr('FRA_PRIORITY')}: fwmark {r.get_attr('FRA_FWMARK'):#x} lookup {ROUTE_TABLE}"
                 for r in ipr.get_rules(family=socket.AF_INET)
                 if r.get_attr("FRA_PRIORITY") == RULE_PRIORITY and r.get_attr("FRA_FWMARK") == INBOUND_MARK
                 and (r.get_attr("FRA_TABLE") or r["table"]) == ROUTE_TABLE]
        routes = [f"local {r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']} oif {r.get_attr('RTA_OIF')}"
                  for r in ipr.get_routes(family=socket.AF_INET, table=ROUTE_TABLE)
                  if r["type"] == 2 and r["dst_len"] == 0]  # RTN_LOCAL
    return rules, routes


def _ensure_routing() -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    rules, routes = _routing_state()
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            if not routes:
                ipr.route("add", dst="0.0.0.0", dst_len=0, type="local", scope="host", oif=lo, table=ROUTE_TABLE)
            for _ in rules[1:]:
                ipr.rule("del", table=ROUTE_TABLE, priority=RULE_PRIORITY, fwmark=INBOUND_MARK, fwmask=0xFFFFFFFF)
            if not rules:
                ipr.rule("add", table=ROUTE_TABLE, priority=RULE_PRIORITY, fwmark=INBOUND_MARK, fwmask=0xFFFFFFFF)
        except NetlinkError as exc:
            raise CaptureError(f"ebpf capture: cannot install the inbound policy route "
                               f"(fwmark {INBOUND_MARK:#x} -> table {ROUTE_TABLE}): {exc}") from None


def _remove_routing() -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    rules, routes = _routing_state()
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for _ in rules:
            try:
                ipr.rule("del", table=ROUTE_TABLE, priority=RULE_PRIORITY, fwmark=INBOUND_MARK, fwmask=0xFFFFFFFF)
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:
                    raise
        for _ in routes:
            try:
                ipr.route("del", dst="0.0.0.0", dst_len=0, type="local", scope="host", oif=lo, table=ROUTE_TABLE)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ESRCH):
                    raise


# ---------------------------------------------------------------------- CLI: --dump-bpf


def main(argv: list[str] | None = None) -> int:
    """python -m nodeagent.capture.ebpf --dump-bpf [--instance NAME] | --gc | --remove INSTANCE"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nodeagent.capture.ebpf",
                                 description="hostmesh eBPF capture: print the final program source, or clean up pins")
    ap.add_argument("--dump-bpf", action="store_true", help="print the final source bcc compiles (headers inlined)")
    ap.add_argument("--instance", default=DEFAULT_INSTANCE, help="instance whose pin directory goes into the flags")
    ap.add_argument("--gc", action="store_true", help="unpin instances whose cgroups no longer exist")
    args = ap.parse_args(argv)
    if args.dump_bpf:
        print(BpfLoader(args.instance).dump_source(), end="")
        return 0
    if args.gc:
        for inst in collect_orphans():
            print(f"removed {inst}")
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
