"""The capture interface every traffic-redirection backend implements.

A backend makes TCP traffic of this node's pods land on the agent's listeners: outbound
connections (pod -> anything in the mesh) on `outbound_port` (15001), plaintext connections
arriving for a local pod on `inbound_port` (15006). The proxy recovers where a connection
was headed with `Capture.original_destination()`.

Contract (ARCHITECTURE.md, "Principles"):
* install() reconciles to exactly the desired state: idempotent, adopts the leftovers of a
  crashed agent, never duplicates, and raises CaptureError leaving nothing new installed
  when the host cannot do it;
* capture fails closed: with the proxy down, captured connections are refused, never
  passed through in plaintext;
* remove() leaves no trace and is a no-op when nothing is installed.
"""

from __future__ import annotations

import abc
import ipaddress
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nodeagent.capture.origdst import so_original_dst
from nodeagent.errors import CaptureError

MAX_MARK = 0xFFFFFFFF
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture. Validated (and normalised) on construction: errors name the field."""

    pod_cidrs: tuple[str, ...]          # this node's local pod CIDR(s), e.g. ("198.18.1.0/24",)
    mesh_cidrs: tuple[str, ...]         # destinations captured outbound: service VIP CIDR + every node's pod CIDR
    outbound_port: int = 15001
    inbound_port: int = 15006
    socket_mark: int = 0x539            # the proxy's own sockets carry this mark and are never captured
    exclude_inbound_ports: tuple[int, ...] = ()
    # eBPF backend only (the iptables backend ignores them):
    cgroups: tuple[str, ...] = ()       # cgroup v2 dirs whose processes are captured outbound (pods, host units)
    redirect_address: str = ""          # where pods reach the node's proxy (their gateway, e.g. 169.254.1.1)
    instance: str = ""                  # names this agent's pins: /sys/fs/bpf/hostmesh/<instance>
    accelerate: bool = False            # sockops + sk_msg for same-node socket pairs (pod <-> proxy)

    def __post_init__(self) -> None:
        for name in ("pod_cidrs", "mesh_cidrs"):
            object.__setattr__(self, name, _cidrs(name, getattr(self, name)))
        for name in ("outbound_port", "inbound_port"):
            _port(name, getattr(self, name))
        if self.outbound_port == self.inbound_port:
            raise CaptureError(f"capture spec: outbound_port and inbound_port are both "
                               f"{self.outbound_port}; they must differ")
        mark = self.socket_mark
        if isinstance(mark, bool) or not isinstance(mark, int) or not 0 < mark <= MAX_MARK:
            raise CaptureError(f"capture spec: socket_mark {mark!r} must be an integer in "
                               f"1..0x{MAX_MARK:x} (0 would match every unmarked packet)")
        ports = _seq("exclude_inbound_ports", self.exclude_inbound_ports)
        seen: set[int] = set()
        for p in ports:
            _port("exclude_inbound_ports", p)
            if p in seen:
                raise CaptureError(f"capture spec: exclude_inbound_ports lists {p} twice")
            seen.add(p)
        object.__setattr__(self, "exclude_inbound_ports", tuple(ports))
        groups = _seq("cgroups", self.cgroups)
        for g in groups:
            if not isinstance(g, str) or not g.strip() or "\0" in g:
                raise CaptureError(f"capture spec: cgroups entry {g!r} is not a cgroup path")
        if len(set(groups)) != len(groups):
            raise CaptureError("capture spec: cgroups lists a cgroup twice")
        object.__setattr__(self, "cgroups", tuple(groups))
        if self.redirect_address:
            try:
                ipaddress.IPv4Address(self.redirect_address)
            except ValueError:
                raise CaptureError(f"capture spec: redirect_address {self.redirect_address!r} is not an "
                                   f"IPv4 address") from None
        if not isinstance(self.accelerate, bool):
            raise CaptureError(f"capture spec: accelerate {self.accelerate!r} must be true or false")
        if not isinstance(self.instance, str) or (self.instance and not _INSTANCE.match(self.instance)):
            raise CaptureError(f"capture spec: instance {self.instance!r} must be 1-64 letters, digits, "
                               f"'.', '_' or '-'")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pod_cidrs"] = list(self.pod_cidrs)
        d["mesh_cidrs"] = list(self.mesh_cidrs)
        d["exclude_inbound_ports"] = list(self.exclude_inbound_ports)
        d["cgroups"] = list(self.cgroups)
        return d


def _seq(name: str, value: Any) -> tuple:
    # a bare string would be iterated character by character: a classic config mistake
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise CaptureError(f"capture spec: {name} must be a list of values, got {value!r}")
    return tuple(value)


def _cidrs(name: str, value: Any) -> tuple[str, ...]:
    items = _seq(name, value)
    if not items:
        raise CaptureError(f"capture spec: {name} is empty; at least one IPv4 CIDR is required")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise CaptureError(f"capture spec: {name} entry {item!r} is not a CIDR string")
        try:
            net = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            raise CaptureError(f"capture spec: {name} entry {item!r} is not a valid CIDR ({exc})") from None
        if net.version != 4:
            raise CaptureError(f"capture spec: {name} entry {item!r} is IPv6; capture handles "
                               f"IPv4 only for now")
        text = str(net)
        if name == "pod_cidrs" and net.prefixlen == 0:
            raise CaptureError(f"capture spec: pod_cidrs entry {item!r} covers every address; "
                               f"give this node's pod CIDR")
        if text in out:
            raise CaptureError(f"capture spec: {name} lists {text} twice")
        out.append(text)
    return tuple(out)


def _port(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise CaptureError(f"capture spec: {name} {value!r} is not a TCP port (1..65535)")


@dataclass
class CaptureStatus:
    ok: bool
    problems: list[str] = field(default_factory=list)
    checked_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": list(self.problems), "checked_at": self.checked_at}


class Capture(abc.ABC):
    """A traffic-capture backend bound to one spec and one network namespace."""

    name: str = ""

    def __init__(self, spec: CaptureSpec, *, netns: str | None = None) -> None:
        if not isinstance(spec, CaptureSpec):
            raise CaptureError(f"capture: spec must be a CaptureSpec, got {type(spec).__name__}")
        self.spec = spec
        self.netns = netns
        self.last_status: CaptureStatus | None = None

    @abc.abstractmethod
    def install(self) -> None:
        """Reconcile to exactly the desired state (idempotent; adopts leftovers; no duplicates)."""

    @abc.abstractmethod
    def verify(self) -> CaptureStatus:
        """Compare what is installed with what is desired."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Remove everything this backend added (idempotent; fine when nothing is installed)."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """JSON-able: backend, spec, what is installed, last verification."""

    def register_metrics(self, registry: Any) -> None:
        """Add backend-specific metrics to the agent's Prometheus registry (default: none)."""

    def leftovers(self) -> bool:
        """Is anything of this backend installed (by any agent, for this spec)? Cheap."""
        return False

    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        """Where a redirected connection was originally headed (IPv4 SO_ORIGINAL_DST)."""
        return so_original_dst(sock)
