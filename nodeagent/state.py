"""The agent's view of the mesh: an immutable, versioned snapshot of what this node needs.

The config source (today a static snapshot file, later the control-plane client) builds a
`NodeSnapshot` and swaps it into `AgentState`; the proxies only ever read the current
snapshot. A connection takes the snapshot once when it starts and keeps it, so a config
change never alters a connection mid-flight.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from nodeagent.errors import ConfigError


@dataclass(frozen=True)
class Endpoint:
    """One backend of a service: a pod (or host workload) address and the port to dial."""

    address: str
    port: int
    node: str = ""
    workload: str = ""
    namespace: str = "default"


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    cluster_ip: str
    ports: tuple[ServicePort, ...]
    # endpoints keyed by the service port they serve
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True)
class Workload:
    """A workload known to the mesh (a pod in the lab or in Kubernetes, a Workload object on bare metal)."""

    name: str
    namespace: str
    node: str
    address: str
    service_account: str = "default"
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ConfigObject:
    """A validated policy or route object carried to the agent as is (kind/namespace/name and
    its spec as canonical JSON); the features that act on each kind read them from here."""

    kind: str
    namespace: str
    name: str
    spec: str = "{}"


@dataclass(frozen=True)
class NodeSnapshot:
    node: str
    services: tuple[Service, ...] = ()
    workloads: tuple[Workload, ...] = ()
    config: tuple[ConfigObject, ...] = ()
    version: str = field(default="")

    def __post_init__(self) -> None:
        if not self.version:
            object.__setattr__(self, "version", content_version(self))

    # -- lookups used on the connection path; built lazily once per snapshot --
    def service_by_vip(self, ip: str, port: int) -> tuple[Service, ServicePort] | None:
        return self._vip_index().get((ip, port))

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self._workload_index().get(ip)

    def local_workloads(self) -> tuple[Workload, ...]:
        return tuple(w for w in self.workloads if w.node == self.node)

    def _vip_index(self) -> dict[tuple[str, int], tuple[Service, ServicePort]]:
        idx = self.__dict__.get("_vip_idx")
        if idx is None:
            idx = {(s.cluster_ip, p.port): (s, p) for s in self.services for p in s.ports}
            object.__setattr__(self, "_vip_idx", idx)
        return idx

    def _workload_index(self) -> dict[str, Workload]:
        idx = self.__dict__.get("_wl_idx")
        if idx is None:
            idx = {w.address: w for w in self.workloads}
            object.__setattr__(self, "_wl_idx", idx)
        return idx

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "version": self.version,
            "services": [asdict(s) for s in self.services],
            "workloads": [asdict(w) for w in self.workloads],
            "config": [asdict(c) for c in self.config],
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "snapshot") -> "NodeSnapshot":
        """Parse and validate a snapshot; every problem is reported with its field path."""
        errors: list[str] = []
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        unknown = set(data) - {"node", "version", "services", "workloads", "config"}
        if unknown:
            errors.append(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        node = data.get("node")
        if not isinstance(node, str) or not node:
            errors.append(f"{source}: node: must be a non-empty string")
        services = tuple(_parse_list(data.get("services", []), _parse_service, f"{source}: services", errors))
        workloads = tuple(_parse_list(data.get("workloads", []), _parse_workload, f"{source}: workloads", errors))
        config = tuple(_parse_list(data.get("config", []), _parse_config, f"{source}: config", errors))
        seen: set[tuple[str, int]] = set()
        for i, svc in enumerate(services):
            for p in svc.ports:
                key = (svc.cluster_ip, p.port)
                if key in seen:
                    errors.append(f"{source}: services[{i}]: {svc.cluster_ip}:{p.port} is used by another service")
                seen.add(key)
        if errors:
            raise ConfigError("\n".join(errors))
        return cls(node=node, services=services, workloads=workloads, config=config)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def content_version(snap: NodeSnapshot) -> str:
    body = json.dumps(
        {"node": snap.node, "services": [asdict(s) for s in snap.services],
         "workloads": [asdict(w) for w in snap.workloads], "config": [asdict(c) for c in snap.config]},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class AgentState:
    """Holds the current snapshot. The config source writes; proxies and admin read."""

    def __init__(self) -> None:
        self._snapshot: NodeSnapshot | None = None
        self._subscribers: list = []

    @property
    def snapshot(self) -> NodeSnapshot | None:
        return self._snapshot

    def apply(self, snapshot: NodeSnapshot) -> None:
        self._snapshot = snapshot
        for notify in self._subscribers:
            notify(snapshot)

    def subscribe(self, notify) -> None:
        """Call ``notify(snapshot)`` synchronously on every apply: readers that derive state
        from the snapshot (the certificate manager) follow it with no window in which the
        agent would report ready for a snapshot they have not seen."""
        self._subscribers.append(notify)


# ---------------------------------------------------------------- parsing helpers

def _parse_list(value: Any, parse_one, where: str, errors: list[str]) -> list:
    if not isinstance(value, (list, tuple)):
        errors.append(f"{where}: must be a list")
        return []
    out = []
    for i, item in enumerate(value):
        try:
            out.append(parse_one(item, f"{where}[{i}]"))
        except ConfigError as exc:
            errors.append(str(exc))
    return out


def _require(d: Any, where: str, allowed: set[str], required: set[str]) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be a mapping")
    problems = []
    unknown = set(d) - allowed
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    missing = required - set(d)
    if missing:
        problems.append(f"{where}: missing field(s) {', '.join(sorted(missing))}")
    if problems:
        raise ConfigError("\n".join(problems))


def _ip(value: Any, where: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise ConfigError(f"{where}: {value!r} is not an IPv4 address") from None


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}: {value!r} is not a port (1-65535)")
    return value


def _str(value: Any, where: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty_ok):
        raise ConfigError(f"{where}: must be a {'string' if empty_ok else 'non-empty string'}")
    return value


def _parse_endpoint(d: Any, where: str) -> Endpoint:
    _require(d, where, {"address", "port", "node", "workload", "namespace"}, {"address", "port"})
    return Endpoint(
        address=_ip(d["address"], f"{where}.address"),
        port=_port(d["port"], f"{where}.port"),
        node=_str(d.get("node", ""), f"{where}.node", empty_ok=True),
        workload=_str(d.get("workload", ""), f"{where}.workload", empty_ok=True),
        namespace=_str(d.get("namespace", "default"), f"{where}.namespace"),
    )


def _parse_service_port(d: Any, where: str) -> ServicePort:
    _require(d, where, {"port", "target_port", "name", "protocol", "app_protocol"}, {"port"})
    protocol = d.get("protocol", "TCP")
    if protocol != "TCP":
        raise ConfigError(f"{where}.protocol: only TCP is supported, got {protocol!r}")
    return ServicePort(
        port=_port(d["port"], f"{where}.port"),
        target_port=_port(d.get("target_port", d["port"]), f"{where}.target_port"),
        name=_str(d.get("name", ""), f"{where}.name", empty_ok=True),
        protocol=protocol,
        app_protocol=_str(d.get("app_protocol", ""), f"{where}.app_protocol", empty_ok=True),
    )


def _parse_service(d: Any, where: str) -> Service:
    _require(d, where, {"name", "namespace", "cluster_ip", "ports", "endpoints"}, {"name", "cluster_ip", "ports"})
    errors: list[str] = []
    ports = _parse_list(d["ports"], _parse_service_port, f"{where}.ports", errors)
    endpoints = _parse_list(d.get("endpoints", []), _parse_endpoint, f"{where}.endpoints", errors)
    if not ports and not errors:
        errors.append(f"{where}.ports: at least one port is required")
    try:
        name = _str(d["name"], f"{where}.name")
        namespace = _str(d.get("namespace", "default"), f"{where}.namespace")
        vip = _ip(d["cluster_ip"], f"{where}.cluster_ip")
    except ConfigError as exc:
        errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))
    return Service(name=name, namespace=namespace, cluster_ip=vip, ports=tuple(ports), endpoints=tuple(endpoints))


def _parse_workload(d: Any, where: str) -> Workload:
    _require(d, where, {"name", "namespace", "node", "address", "service_account", "labels"},
             {"name", "node", "address"})
    labels = d.get("labels", {})
    if not isinstance(labels, (dict, list, tuple)):
        raise ConfigError(f"{where}.labels: must be a mapping")
    items = labels.items() if isinstance(labels, dict) else labels
    return Workload(
        name=_str(d["name"], f"{where}.name"),
        namespace=_str(d.get("namespace", "default"), f"{where}.namespace"),
        node=_str(d["node"], f"{where}.node"),
        address=_ip(d["address"], f"{where}.address"),
        service_account=_str(d.get("service_account", "default"), f"{where}.service_account"),
        labels=tuple(sorted((str(k), str(v)) for k, v in items)),
    )


def _parse_config(d: Any, where: str) -> ConfigObject:
    _require(d, where, {"kind", "namespace", "name", "spec"}, {"kind", "name"})
    spec = d.get("spec", "{}")
    if isinstance(spec, (dict, list)):
        spec = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    try:
        json.loads(spec)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.spec: must be a JSON object") from None
    return ConfigObject(
        kind=_str(d["kind"], f"{where}.kind"),
        namespace=_str(d.get("namespace", "default"), f"{where}.namespace"),
        name=_str(d["name"], f"{where}.name"),
        spec=spec,
    )


# ---------------------------------------------------------------- endpoint health
# The control plane carries the endpoints the agents' health checks found unhealthy as
# config objects (controlplane/health.py writes them, the balancers read them here).
ENDPOINT_HEALTH = "EndpointHealth"
HEALTH_NAMESPACE = "hostmesh-system"


def unhealthy_endpoints(config: Iterable[ConfigObject]) -> frozenset[tuple[str, int, str]]:
    """Every (address, port, "ns/service") the snapshot's EndpointHealth objects name."""
    out: set[tuple[str, int, str]] = set()
    for c in config:
        if c.kind != ENDPOINT_HEALTH:
            continue
        try:
            out.update((str(a), int(p), str(s)) for a, p, s in json.loads(c.spec).get("unhealthy", ()))
        except (ValueError, TypeError, AttributeError):
            continue
    return frozenset(out)
