"""ctypes mirror of bpf/lib/hostmesh.h and the pinned maps of bpf/lib/maps.h.

The C header is the source of truth. ``check_layout()`` compares every struct here with the
description bcc gives of the compiled maps (field names, offsets, sizes), and the loader
compares pinned maps' key/value sizes with these before adopting them, so a drift between
the two files is an error at load time, never silent corruption.

Addresses and ports are kept in network byte order, exactly as in the C structs; the
helpers ``ip4()`` / ``port()`` convert.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
from dataclasses import dataclass

from nodeagent.capture import ebpf_sys as sysb
from nodeagent.errors import CaptureError

HM_LAYOUT_VERSION = 2

HM_F_OUTBOUND = 0x1
HM_F_INBOUND = 0x2
HM_F_LOCAL_NETNS = 0x4

HM_CGROUP_PATH_MAX = 248


class HmConfig(ctypes.Structure):
    _fields_ = [("redirect_ip4", ctypes.c_uint32), ("outbound_port", ctypes.c_uint16),
                ("inbound_port", ctypes.c_uint16), ("socket_mark", ctypes.c_uint32),
                ("inbound_mark", ctypes.c_uint32), ("proxy_cgroup_id", ctypes.c_uint64),
                ("proxy_netns_cookie", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                ("accel_budget", ctypes.c_uint32)]


class HmCidrKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class HmTuple(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16)]


class HmOrigdst(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("_pad", ctypes.c_uint16)]


class HmSockKey(ctypes.Structure):
    _fields_ = [("local_ip4", ctypes.c_uint32), ("remote_ip4", ctypes.c_uint32), ("local_port", ctypes.c_uint16),
                ("remote_port", ctypes.c_uint16)]


class HmFlow(ctypes.Structure):
    _fields_ = [("redirected", ctypes.c_uint64), ("tcp_only", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class HmMeta(ctypes.Structure):
    _fields_ = [("layout", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("build_id", ctypes.c_uint8 * 32)]


class HmAttachment(ctypes.Structure):
    _fields_ = [("attach_types", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("path", ctypes.c_char * HM_CGROUP_PATH_MAX)]


# enum hm_counter, in order
COUNTERS = (
    "connect_redirected", "connect_proxy_skipped", "connect_error", "sockops_moved", "sockops_miss",
    "origdst_hit", "origdst_miss", "inbound_assigned", "inbound_no_listener", "inbound_error",
    "inbound_established", "accel_inserted", "accel_insert_error", "accel_redirected", "accel_redirected_bytes",
    "accel_passed", "accel_budget_spent", "inbound_syn",
)
COUNTER_HELP = {
    "connect_redirected": "connections redirected to the outbound listener at connect()",
    "connect_proxy_skipped": "connects of the proxy's own sockets left alone (cgroup or mark)",
    "connect_error": "redirected connections whose original destination could not be recorded",
    "sockops_moved": "original destinations filed under their 4-tuple",
    "sockops_miss": "original destinations that could not be filed under their 4-tuple",
    "origdst_hit": "SO_ORIGINAL_DST answered from the map",
    "origdst_miss": "SO_ORIGINAL_DST with no map entry (answered with the local address)",
    "inbound_assigned": "inbound connections handed to the inbound listener (sk_lookup)",
    "inbound_no_listener": "inbound SYNs refused because no listener was registered (fail closed)",
    "inbound_error": "inbound SYNs refused because bpf_sk_assign failed",
    "inbound_syn": "inbound SYNs for local pods marked for local delivery (tc)",
    "inbound_established": "inbound packets of intercepted connections delivered locally",
    "accel_inserted": "same-node sockets put into the hm_socks sockhash (acceleration)",
    "accel_insert_error": "same-node sockets the kernel refused to put into hm_socks (they stay on TCP/IP)",
    "accel_redirected": "messages sk_msg handed straight to the peer socket",
    "accel_redirected_bytes": "bytes of the messages sk_msg handed straight to the peer socket",
    "accel_passed": "messages of sockets in hm_socks sent over TCP/IP (no peer yet, or the socket fell back)",
    "accel_budget_spent": "accelerated sockets that used their redirect budget and continue over TCP/IP",
}


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key: type
    value: type
    max_entries: int
    flags: int = 0
    percpu: bool = False


MAPS: dict[str, MapSpec] = {m.name: m for m in (
    MapSpec("hm_config", sysb.MAP_TYPE_ARRAY, ctypes.c_uint32, HmConfig, 1),
    MapSpec("hm_meta", sysb.MAP_TYPE_ARRAY, ctypes.c_uint32, HmMeta, 1),
    MapSpec("hm_mesh", sysb.MAP_TYPE_LPM_TRIE, HmCidrKey, ctypes.c_uint32, 256, sysb.BPF_F_NO_PREALLOC),
    MapSpec("hm_pods", sysb.MAP_TYPE_LPM_TRIE, HmCidrKey, ctypes.c_uint32, 64, sysb.BPF_F_NO_PREALLOC),
    MapSpec("hm_inb_skip", sysb.MAP_TYPE_HASH, ctypes.c_uint32, ctypes.c_uint32, 64),
    MapSpec("hm_cookie", sysb.MAP_TYPE_LRU_HASH, ctypes.c_uint64, HmOrigdst, 65536),
    MapSpec("hm_origdst", sysb.MAP_TYPE_LRU_HASH, HmTuple, HmOrigdst, 65536),
    MapSpec("hm_listen", sysb.MAP_TYPE_SOCKMAP, ctypes.c_uint32, ctypes.c_uint64, 1),
    MapSpec("hm_socks", sysb.MAP_TYPE_SOCKHASH, HmSockKey, ctypes.c_uint64, 65536),
    MapSpec("hm_pending", sysb.MAP_TYPE_LRU_HASH, HmSockKey, ctypes.c_uint32, 65536),
    MapSpec("hm_flows", sysb.MAP_TYPE_LRU_HASH, HmSockKey, HmFlow, 65536),
    MapSpec("hm_counters", sysb.MAP_TYPE_PERCPU_ARRAY, ctypes.c_uint32, ctypes.c_uint64, len(COUNTERS), percpu=True),
    MapSpec("hm_cgroups", sysb.MAP_TYPE_HASH, ctypes.c_uint64, HmAttachment, 1024),
)}


def ip4(text: str) -> int:
    """'198.18.1.0' -> the u32 whose memory holds the address in network order."""
    return int.from_bytes(socket.inet_aton(text), "little" if _little() else "big")


def ip4_text(value: int) -> str:
    return socket.inet_ntoa(int(value).to_bytes(4, "little" if _little() else "big"))


def port(p: int) -> int:
    """Host-order port -> the u16 holding it in network order."""
    return socket.htons(p)


def port_host(value: int) -> int:
    return socket.ntohs(value)


def cidr_key(cidr: str) -> HmCidrKey:
    net = ipaddress.IPv4Network(cidr)
    return HmCidrKey(net.prefixlen, ip4(str(net.network_address)))


def cidr_text(key: HmCidrKey) -> str:
    return f"{ip4_text(key.addr)}/{key.prefixlen}"


def _little() -> bool:
    import sys
    return sys.byteorder == "little"


def possible_cpus() -> int:
    """Per-CPU map values hold one slot per *possible* CPU."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def _struct_equal(a, b) -> bool:
    return bytes(a) == bytes(b)


class Map:
    """One pinned map, opened by fd, with typed access."""

    def __init__(self, spec: MapSpec, fd: int) -> None:
        self.spec = spec
        self.fd = fd
        self._ncpu = possible_cpus() if spec.percpu else 1

    @classmethod
    def open_pinned(cls, spec: MapSpec, path: str) -> Map:
        return cls(spec, sysb.obj_get(path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def id(self) -> int:
        return sysb.map_info(self.fd).id

    def _value(self):
        if self.spec.percpu:
            return (self.spec.value * self._ncpu)()
        return self.spec.value()

    def get(self, key):
        v = self._value()
        return v if sysb.map_lookup(self.fd, _c(self.spec.key, key), v) else None

    def put(self, key, value, flags: int = sysb.BPF_ANY) -> None:
        sysb.map_update(self.fd, _c(self.spec.key, key), _c(self.spec.value, value), flags)

    def delete(self, key) -> bool:
        return sysb.map_delete(self.fd, _c(self.spec.key, key))

    def keys(self) -> list:
        out = []
        prev = None
        while True:
            nxt = self.spec.key()
            if not sysb.map_next_key(self.fd, prev, nxt):
                return out
            out.append(nxt)
            prev = nxt

    def count(self, limit: int) -> int:
        """How many keys, counting at most `limit` (one syscall per key)."""
        n = 0
        prev = None
        while n < limit:
            nxt = self.spec.key()
            if not sysb.map_next_key(self.fd, prev, nxt):
                break
            n += 1
            prev = nxt
        return n

    def items(self) -> list[tuple]:
        out = []
        for k in self.keys():
            v = self.get(k)
            if v is not None:
                out.append((k, v))
        return out

    def sum_percpu(self, key) -> int:
        v = self.get(key)
        return sum(int(x) for x in v) if v is not None else 0


def _c(ctype, value):
    """Accept a ctypes instance or a plain int for scalar types."""
    if isinstance(value, ctypes._SimpleCData) or isinstance(value, ctypes.Structure):
        return value
    return ctype(value)


def check_layout(name: str, key_desc, leaf_desc) -> list[str]:
    """Compare bcc's JSON descriptions of a map's key/leaf with the ctypes mirror.

    bcc describes a struct as [name, [[field, type(, [n])]...], "struct"] and a scalar as a
    type string. Returns the differences (empty when they agree).
    """
    spec = MAPS[name]
    problems = []
    for what, desc, ctype in (("key", key_desc, spec.key), ("value", leaf_desc, spec.value)):
        if isinstance(desc, str):
            continue  # scalar: sizes are checked against the kernel map
        fields = [f[0] for f in desc[1]]
        mirror = [f[0] for f in getattr(ctype, "_fields_", [])]
        if fields != mirror:
            problems.append(f"{name} {what}: C fields {fields} != ctypes fields {mirror} "
                            f"(bpf/lib/hostmesh.h and nodeagent/capture/ebpf_maps.py disagree)")
    return problems


def check_kernel_map(spec: MapSpec, fd: int) -> list[str]:
    """Differences between a kernel map and its spec (type, sizes, entries, flags)."""
    info = sysb.map_info(fd)
    problems = []
    want = {"type": spec.type, "key_size": ctypes.sizeof(spec.key), "value_size": ctypes.sizeof(spec.value),
            "max_entries": spec.max_entries, "map_flags": spec.flags}
    for field_name, value in want.items():
        have = getattr(info, field_name)
        if have != value:
            problems.append(f"{spec.name}: {field_name} is {have}, expected {value}")
    return problems


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise CaptureError(msg)
