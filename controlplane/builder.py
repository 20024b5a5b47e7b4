"""Per-node snapshots from a validated model, and the consistency check run before publishing.

Every node gets the same content today: all Services (with endpoints), all Workloads
(the proxy needs them to recognise pod-IP destinations and to label metrics) and every
route/policy/MeshConfig as a `ConfigObject`. The content tuples are built once and
shared by all snapshots of one build; only `node` (and so `version`) differs. Across
builds, unchanged Service/Workload/ConfigObject objects (and unchanged tuples) are the
very same objects as in the previous build, which the snapshot cache exploits.

Endpoints: the Workloads a Service selects (see `controlplane.model.selection`), one
Endpoint per (Workload, resolved target port), deduplicated, sorted by workload
namespace/name then port. `ServicePort.target_port` is the integer targetPort, or for a
named one the port the first selected Workload (by name) defines under that name (for a
multi-port Service validation guarantees all selected Workloads agree), or the Service
port when no selected Workload defines it (then the port has no endpoints).

Versions are `nodeagent.state.content_version` of the snapshot - the same value an
agent computes from the snapshot's content - but computed from JSON fragments built
once per build, so N nodes cost one serialisation plus N hashes instead of N
serialisations. `tests/test_cp_builder.py` checks that the two agree.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import weakref
from collections.abc import Iterable
from typing import Any

from controlplane.errors import SnapshotError
from controlplane.model.objects import MeshModel, MeshObject
from controlplane.model.selection import WorkloadIndex, resolve_target_port
from nodeagent.state import (
    ConfigObject,
    Endpoint,
    NodeSnapshot,
    Service,
    ServicePort,
    Workload,
)


def build_snapshots(model: MeshModel, nodes: Iterable[str] = (),
                    extra: tuple[ConfigObject, ...] = ()) -> dict[str, NodeSnapshot]:
    """{node: snapshot} for the given nodes (agents connected) and every node a Workload is on,
    in sorted node order. Identical models and nodes give identical snapshots and versions.
    ``extra``: config objects that do not come from the model (``controlplane.health``)."""
    return snapshot_set(model, extra).build(nodes)


def build_snapshot(model: MeshModel, node: str, extra: tuple[ConfigObject, ...] = ()) -> NodeSnapshot:
    """One node's snapshot (e.g. for an agent that just connected); cheap after a build of the same model."""
    return snapshot_set(model, extra).get(node)


class SnapshotSet:
    """The snapshots of one model: content built once, per-node snapshots made on demand and kept."""

    def __init__(self, model: MeshModel, previous: SnapshotSet | None = None,
                 extra: tuple[ConfigObject, ...] = ()) -> None:
        self.model = model
        self.extra = extra
        services, workloads, config = build_content(model)
        if extra:
            config = tuple(sorted(config + extra, key=lambda c: (c.kind, c.namespace, c.name)))
        if previous is not None:   # keep unchanged objects (and whole tuples) identical across builds
            services = _reuse(services, previous.services)
            workloads = _reuse(workloads, previous.workloads)
            config = _reuse(config, previous.config)
        self.services, self.workloads, self.config = services, workloads, config
        self.shared = _Shared(self.services, self.workloads, self.config)
        self._snapshots: dict[str, NodeSnapshot] = {}

    def nodes(self, nodes: Iterable[str] = ()) -> list[str]:
        return sorted({n for n in nodes if n} | set(self.model.nodes))

    def get(self, node: str) -> NodeSnapshot:
        snap = self._snapshots.get(node)
        if snap is None:
            snap = NodeSnapshot(node=node, services=self.services, workloads=self.workloads, config=self.config,
                                version=self.shared.version(node))
            self._snapshots[node] = snap
        return snap

    def build(self, nodes: Iterable[str] = ()) -> dict[str, NodeSnapshot]:
        return {n: self.get(n) for n in self.nodes(nodes)}


_last_set: SnapshotSet | None = None


def snapshot_set(model: MeshModel, extra: tuple[ConfigObject, ...] = ()) -> SnapshotSet:
    """The SnapshotSet of `model` (plus `extra`), reused while the same (equal) ones are asked for again."""
    global _last_set
    current = _last_set
    if current is not None and (current.model is model or current.model == model) and current.extra == extra:
        return current
    current = _last_set = SnapshotSet(model, previous=current, extra=extra)
    return current


def _reuse(new: tuple, old: tuple) -> tuple:
    """`new` with every item equal to one in `old` replaced by that object; `old` itself when
    equal. The snapshot cache indexes shared objects and tuples once (controlplane/resources.py)."""
    if new == old:
        return old
    known = {item: item for item in old}
    return tuple(known.get(item, item) for item in new)


def build_content(model: MeshModel) -> tuple[tuple[Service, ...], tuple[Workload, ...], tuple[ConfigObject, ...]]:
    """The node-independent content: services with endpoints, workloads, config objects, all sorted."""
    index = WorkloadIndex(model.workloads)
    services = tuple(_service(s, index) for s in sorted(model.services, key=lambda o: (o.namespace, o.name)))
    workloads = tuple(_workload(w) for w in sorted(model.workloads, key=lambda o: (o.namespace, o.name)))
    return services, workloads, model.config_objects()


def _workload(w: MeshObject) -> Workload:
    spec = w.spec_view
    return Workload(name=w.name, namespace=w.namespace, node=spec["node"], address=spec["address"],
                    service_account=spec["serviceAccount"], labels=w.labels)


def _service(svc: MeshObject, index: WorkloadIndex) -> Service:
    spec = svc.spec_view
    selected = index.select(svc.namespace, spec.get("selector") or {})
    ports = []
    endpoints: dict[tuple[str, str, int], Endpoint] = {}
    for p in spec["ports"]:
        target = p["targetPort"]
        resolved = [(w, resolve_target_port(target, w)) for w in selected]
        if isinstance(target, int):
            target_port = target
        else:
            target_port = next((port for _, port in resolved if port is not None), p["port"])
        ports.append(ServicePort(port=p["port"], target_port=target_port, name=p.get("name", ""),
                                 protocol=p["protocol"], app_protocol=p.get("appProtocol", "")))
        for w, port in resolved:
            if port is None:
                continue
            key = (w.namespace, w.name, port)
            if key not in endpoints:
                ws = w.spec_view
                endpoints[key] = Endpoint(address=ws["address"], port=port, node=ws["node"], workload=w.name,
                                          namespace=w.namespace)
    return Service(name=svc.name, namespace=svc.namespace, cluster_ip=spec["clusterIP"], ports=tuple(ports),
                   endpoints=tuple(endpoints[k] for k in sorted(endpoints)))


# ---------------------------------------------------------------- versions

def _dumps(value: Any) -> str:
    # exactly the encoding nodeagent.state.content_version uses
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _endpoint_dict(e: Endpoint) -> dict[str, Any]:
    return {"address": e.address, "port": e.port, "node": e.node, "workload": e.workload, "namespace": e.namespace}


def _service_dict(s: Service) -> dict[str, Any]:
    return {"name": s.name, "namespace": s.namespace, "cluster_ip": s.cluster_ip,
            "ports": [{"port": p.port, "target_port": p.target_port, "name": p.name, "protocol": p.protocol,
                       "app_protocol": p.app_protocol} for p in s.ports],
            "endpoints": [_endpoint_dict(e) for e in s.endpoints]}


def _workload_dict(w: Workload) -> dict[str, Any]:
    return {"name": w.name, "namespace": w.namespace, "node": w.node, "address": w.address,
            "service_account": w.service_account, "labels": w.labels}


def _config_dict(c: ConfigObject) -> dict[str, Any]:
    return {"kind": c.kind, "namespace": c.namespace, "name": c.name, "spec": c.spec}


class _Shared:
    """The node-independent part of a build: JSON fragments, a prefix hash, each node's version,
    and the result of the node-independent consistency checks (computed on first use)."""

    def __init__(self, services, workloads, config) -> None:
        self.services, self.workloads, self.config = services, workloads, config
        c = _dumps([_config_dict(x) for x in config])
        s = _dumps([_service_dict(x) for x in services])
        w = _dumps([_workload_dict(x) for x in workloads])
        self._prefix = hashlib.sha256(('{"config":' + c + ',"node":').encode())
        self._suffix = (',"services":' + s + ',"workloads":' + w + "}").encode()
        self._versions: dict[str, str] = {}
        self.problems: list[str] | None = None
        _registry[id(services)] = self

    def is_for(self, services, workloads, config) -> bool:
        return services is self.services and workloads is self.workloads and config is self.config

    def _compute(self, node: str) -> str:
        h = self._prefix.copy()
        h.update(_dumps(node).encode())
        h.update(self._suffix)
        return h.hexdigest()[:16]

    def version(self, node: str) -> str:
        v = self._versions.get(node)
        if v is None:
            v = self._versions[node] = self._compute(node)
        return v


_registry: weakref.WeakValueDictionary[int, _Shared] = weakref.WeakValueDictionary()


def _shared_for(services, workloads, config) -> _Shared:
    """The _Shared of these exact tuples (alive while their SnapshotSet is), or a new one."""
    shared = _registry.get(id(services))
    if shared is not None and shared.is_for(services, workloads, config):
        return shared
    return _Shared(services, workloads, config)


# ---------------------------------------------------------------- consistency

def check_consistency(snapshot: NodeSnapshot) -> None:
    """Raise SnapshotError naming every inconsistency; called before a snapshot is published.

    Checks: node set; services/workloads/config sorted and unique; VIP:port unique; ports
    valid and unique per service; every endpoint belongs to a Workload of the snapshot
    (same address and node) and, for a multi-port Service, serves one of its target
    ports; workload addresses unique; config specs are JSON objects and exactly one
    MeshConfig; and the version matches the content."""
    problems = []
    if not snapshot.node:
        problems.append("node is empty")
    shared = _shared_for(snapshot.services, snapshot.workloads, snapshot.config)
    if shared.problems is None:
        shared.problems = _content_problems(snapshot.services, snapshot.workloads, snapshot.config)
    problems.extend(shared.problems)
    expected = shared.version(snapshot.node)
    if snapshot.version != expected:
        problems.append(f"version {snapshot.version} does not match the content (expected {expected})")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise SnapshotError(f"snapshot for node {snapshot.node!r} is inconsistent: " + "; ".join(shown))


def _content_problems(services, workloads, config) -> list[str]:
    problems: list[str] = []
    wl_by_key: dict[tuple[str, str], Workload] = {}
    addresses: dict[str, str] = {}
    keys = [(w.namespace, w.name) for w in workloads]
    if keys != sorted(keys):
        problems.append("workloads are not sorted by namespace/name")
    for w in workloads:
        ref = f"{w.namespace}/{w.name}"
        if (w.namespace, w.name) in wl_by_key:
            problems.append(f"workload {ref} appears twice")
        wl_by_key[(w.namespace, w.name)] = w
        if w.address in addresses:
            problems.append(f"workload {ref} has the address of workload {addresses[w.address]} ({w.address})")
        addresses.setdefault(w.address, ref)

    keys = [(s.namespace, s.name) for s in services]
    if keys != sorted(keys):
        problems.append("services are not sorted by namespace/name")
    seen_services: set[tuple[str, str]] = set()
    vips: dict[tuple[str, int], str] = {}
    for s in services:
        ref = f"{s.namespace}/{s.name}"
        if (s.namespace, s.name) in seen_services:
            problems.append(f"service {ref} appears twice")
        seen_services.add((s.namespace, s.name))
        problems.extend(_service_problems(s, ref, wl_by_key, vips))

    keys = [(c.kind, c.namespace, c.name) for c in config]
    if keys != sorted(keys):
        problems.append("config objects are not sorted by kind/namespace/name")
    if len(set(keys)) != len(keys):
        problems.append("a config object appears twice")
    meshconfigs = [c for c in config if c.kind == "MeshConfig"]
    if len(meshconfigs) != 1:
        problems.append(f"expected exactly one MeshConfig, found {len(meshconfigs)}")
    for c in config:
        try:
            ok = isinstance(json.loads(c.spec), dict)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"config {c.kind} {c.namespace}/{c.name}: spec is not a JSON object")
    return problems


def _service_problems(s: Service, ref: str, wl_by_key, vips) -> list[str]:
    problems = []
    try:
        ipaddress.IPv4Address(s.cluster_ip)
    except ValueError:
        problems.append(f"service {ref}: cluster_ip {s.cluster_ip!r} is not an IPv4 address")
    if not s.ports:
        problems.append(f"service {ref} has no ports")
    seen_ports = set()
    for p in s.ports:
        if p.port in seen_ports:
            problems.append(f"service {ref}: port {p.port} appears twice")
        seen_ports.add(p.port)
        for what, value in (("port", p.port), ("target_port", p.target_port)):
            if not 1 <= value <= 65535:
                problems.append(f"service {ref}: {what} {value} is not a valid port")
        other = vips.get((s.cluster_ip, p.port))
        if other is not None:
            problems.append(f"service {ref}: {s.cluster_ip}:{p.port} is also service {other}")
        vips[(s.cluster_ip, p.port)] = ref
    targets = {p.target_port for p in s.ports}
    seen_eps = set()
    for e in s.endpoints:
        ep = f"{e.address}:{e.port}"
        if (e.address, e.port) in seen_eps:
            problems.append(f"service {ref}: endpoint {ep} appears twice")
        seen_eps.add((e.address, e.port))
        w = wl_by_key.get((e.namespace, e.workload))
        if w is None:
            problems.append(f"service {ref}: endpoint {ep} names workload {e.namespace}/{e.workload}, "
                            f"which is not in the snapshot")
        elif w.address != e.address or w.node != e.node:
            problems.append(f"service {ref}: endpoint {ep} on {e.node} does not match workload "
                            f"{e.namespace}/{e.workload} ({w.address} on {w.node})")
        if len(s.ports) > 1 and e.port not in targets:
            problems.append(f"service {ref}: endpoint {ep} serves none of the target ports "
                            f"{', '.join(map(str, sorted(targets)))}")
    return problems
