"""Rules across objects: duplicates, the MeshConfig singleton, Workload addresses, Service
clusterIPs (checked and allocated), targetPort names, and every reference between objects.

clusterIP allocation: Services without a clusterIP get one from MeshConfig.spec.serviceCIDR
(default 198.19.0.0/16). Each Service starts probing at an offset derived from a hash of
"namespace/name" and takes the first free address, Services taken in sorted
namespace/name order. That is deterministic (the same objects always get the same
addresses), never collides with explicit clusterIPs, and - unlike handing out addresses
sequentially - adding or removing one Service does not renumber the others (except on a
hash collision, where only the colliding Services are affected).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from controlplane.model.fields import not_supported_yet_message, show, suggest
from controlplane.model.kinds import L7_APP_PROTOCOLS, TCP_POLICY_SECTIONS
from controlplane.model.objects import (
    ConfigIssue,
    MeshObject,
    MeshSettings,
    canonical_json,
)
from controlplane.model.selection import WorkloadIndex, resolve_target_port
from controlplane.model.validate import Checked

MAX_LISTED = 3


class _Report:
    def __init__(self) -> None:
        self.errors: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []

    def error(self, item: Checked, path: tuple, message: str) -> None:
        self.errors.append(item.issue(path, message))

    def warn(self, item: Checked, path: tuple, message: str) -> None:
        self.warnings.append(item.issue(path, message, severity="warning"))


def _listing(items: list[str]) -> str:
    if len(items) <= MAX_LISTED:
        return ", ".join(items)
    return f"{', '.join(items[:MAX_LISTED])} and {len(items) - MAX_LISTED} more"


def cross_check(checked: list[Checked]) -> tuple[list[MeshObject], list[ConfigIssue], list[ConfigIssue]]:
    """Returns (objects with clusterIPs allocated, errors, warnings)."""
    report = _Report()
    items = _unique(checked, report)
    invalid = {c.key for c in checked if c.obj is None and c.key is not None}
    by_kind: dict[str, list[Checked]] = {}
    for it in items:
        by_kind.setdefault(it.obj.kind, []).append(it)

    settings: MeshSettings | None = MeshSettings()
    meshconfigs = by_kind.get("MeshConfig", [])
    if meshconfigs:
        settings = MeshSettings.from_spec(meshconfigs[0].obj.spec_view)
    elif any(k[0] == "MeshConfig" for k in invalid):
        settings = None   # unknown CIDR: skip the checks that depend on it
    cidr = ipaddress.IPv4Network(settings.service_cidr) if settings else None

    workloads = by_kind.get("Workload", [])
    _check_workloads(workloads, cidr, report)
    services = by_kind.get("Service", [])
    allocated = _cluster_ips(services, cidr, bool(meshconfigs), report)
    index = WorkloadIndex(w.obj for w in workloads)
    for svc in services:
        _check_target_ports(svc, index, report)

    svc_by_key = {(s.obj.namespace, s.obj.name): s.obj for s in services}
    routes = {(it.obj.kind, it.obj.namespace, it.obj.name): it.obj
              for kind in ("HTTPRoute", "GRPCRoute") for it in by_kind.get(kind, [])}
    refs = _Refs(svc_by_key, invalid, report, routes)
    for kind in ("HTTPRoute", "GRPCRoute"):
        for it in by_kind.get(kind, []):
            refs.check_route(it)
    for kind in ("TrafficPolicy", "FaultInjection"):
        refs.check_policy_targets(by_kind.get(kind, []))
    _check_telemetries(by_kind.get("Telemetry", []), refs, meshconfigs[0] if meshconfigs else None,
                       any(k[0] == "MeshConfig" for k in invalid), report)
    _check_peer_authentications(by_kind.get("PeerAuthentication", []), report)

    objects = [allocated.get(id(it), it.obj) for it in items]
    return objects, report.errors, report.warnings


def _unique(checked: list[Checked], report: _Report) -> list[Checked]:
    """Drop (and report) second definitions of kind/namespace/name, valid or not."""
    first: dict[tuple[str, str, str], Checked] = {}
    meshconfig: Checked | None = None
    out = []
    for c in checked:
        if c.key is None:
            continue
        if c.key[0] == "MeshConfig":
            if meshconfig is not None:
                report.error(c, (), f"only one MeshConfig is allowed; another is defined at "
                                    f"{meshconfig.doc.file}:{meshconfig.doc.line}")
                continue
            meshconfig = c
        elif c.key in first:
            prev = first[c.key]
            report.error(c, (), f"defined more than once: also at {prev.doc.file}:{prev.doc.line}")
            continue
        first[c.key] = c
        if c.obj is not None:
            out.append(c)
    return out


def _check_workloads(workloads: list[Checked], cidr, report: _Report) -> None:
    by_address: dict[str, Checked] = {}
    for w in workloads:
        addr = w.obj.spec_view["address"]
        if addr in by_address:
            prev = by_address[addr]
            report.error(w, ("spec", "address"), f"{addr} is already the address of {prev.label} "
                                                 f"({prev.doc.file}:{prev.doc.line})")
        else:
            by_address[addr] = w
        if cidr is not None and ipaddress.IPv4Address(addr) in cidr:
            report.error(w, ("spec", "address"), f"{addr} is inside the service CIDR {cidr}; "
                                                 f"workload addresses must not overlap service VIPs")


def _cluster_ips(services: list[Checked], cidr, from_meshconfig: bool, report: _Report) -> dict[int, MeshObject]:
    """Check explicit clusterIPs, allocate the others; returns {id(item): Service with clusterIP}."""
    taken: dict[ipaddress.IPv4Address, Checked] = {}
    where = f"the service CIDR {cidr}" + (" (MeshConfig spec.serviceCIDR)" if from_meshconfig else
                                          " (the default; MeshConfig spec.serviceCIDR changes it)")
    for s in services:
        ip = s.obj.spec_view.get("clusterIP")
        if ip is None:
            continue
        addr = ipaddress.IPv4Address(ip)
        if cidr is not None:
            if addr not in cidr:
                report.error(s, ("spec", "clusterIP"), f"{ip} is outside {where}")
                continue
            if addr in (cidr.network_address, cidr.broadcast_address):
                report.error(s, ("spec", "clusterIP"), f"{ip} is the network or broadcast address of {cidr}")
                continue
        if addr in taken:
            prev = taken[addr]
            report.error(s, ("spec", "clusterIP"), f"{ip} is already used by {prev.label} "
                                                   f"({prev.doc.file}:{prev.doc.line})")
            continue
        taken[addr] = s
    if cidr is None:
        return {}
    out: dict[int, MeshObject] = {}
    first = int(cidr.network_address) + 1
    size = cidr.num_addresses - 2
    pending = sorted((s for s in services if "clusterIP" not in s.obj.spec_view),
                     key=lambda s: (s.obj.namespace, s.obj.name))
    for s in pending:
        if len(taken) >= size:
            report.error(s, ("spec",), f"no free address left in {where} to allocate a clusterIP")
            continue
        start = int.from_bytes(hashlib.sha256(f"{s.obj.namespace}/{s.obj.name}".encode()).digest()[:8], "big") % size
        i = start
        while ipaddress.IPv4Address(first + i) in taken:
            i = (i + 1) % size
        addr = ipaddress.IPv4Address(first + i)
        taken[addr] = s
        spec = dict(s.obj.spec_view)
        spec["clusterIP"] = str(addr)
        obj = replace(s.obj, spec_json=canonical_json(spec))
        object.__setattr__(obj, "_spec", spec)
        out[id(s)] = obj
    return out


def _check_target_ports(svc: Checked, index: WorkloadIndex, report: _Report) -> None:
    spec = svc.obj.spec_view
    selected = index.select(svc.obj.namespace, spec.get("selector") or {})
    if not selected:
        return
    multi = len(spec["ports"]) > 1
    for i, port in enumerate(spec["ports"]):
        target = port["targetPort"]
        if isinstance(target, int):
            continue
        found = {w.name: resolve_target_port(target, w) for w in selected}
        defined = {n: p for n, p in found.items() if p is not None}
        path = ("spec", "ports", i, "targetPort")
        if not defined:
            names = [f"{w.namespace}/{w.name}" for w in selected]
            report.error(svc, path, f"no selected Workload defines a port named {show(target)} "
                                    f"(selected: {_listing(names)})")
            continue
        if multi and len(set(defined.values())) > 1:
            shown = [f"{p} on {svc.obj.namespace}/{n}" for n, p in sorted(defined.items())]
            report.error(svc, path, f"{show(target)} resolves to different ports on the selected Workloads "
                                    f"({_listing(shown)}); a multi-port Service needs one port number per "
                                    f"Service port")
        missing = sorted(n for n, p in found.items() if p is None)
        if missing:
            report.warn(svc, path, f"selected Workload(s) without a port named {show(target)} get no endpoint: "
                                   f"{_listing([f'{svc.obj.namespace}/{n}' for n in missing])}")


class _Refs:
    """References from routes and policies to Services, and from FaultInjections to routes."""

    def __init__(self, services: dict[tuple[str, str], MeshObject], invalid: set, report: _Report,
                 routes: dict[tuple[str, str, str], MeshObject] | None = None) -> None:
        self.services = services
        self.invalid = invalid
        self.report = report
        self.routes = routes or {}

    def route(self, item: Checked, path: tuple, kind: str, namespace: str, name: str) -> MeshObject | None:
        """An HTTPRoute or GRPCRoute in `namespace`; a missing one is an error, as a missing Service."""
        route = self.routes.get((kind, namespace, name))
        if route is None and (kind, namespace, name) not in self.invalid:
            names = [n for k, ns, n in self.routes if k == kind and ns == namespace]
            self.report.error(item, path + ("name",),
                              f"{kind} {namespace}/{name} does not exist{suggest(name, names, cutoff=0.6)}")
        return route

    def service(self, item: Checked, path: tuple, namespace: str, name: str) -> MeshObject | None:
        svc = self.services.get((namespace, name))
        if svc is None and ("Service", namespace, name) not in self.invalid:
            names = [n for ns, n in self.services if ns == namespace]
            self.report.error(item, path + ("name",),
                              f"Service {namespace}/{name} does not exist{suggest(name, names, cutoff=0.6)}")
        return svc

    def port(self, item: Checked, path: tuple, svc: MeshObject, port: int) -> None:
        ports = [p["port"] for p in svc.spec_view["ports"]]
        if port not in ports:
            self.report.error(item, path + ("port",), f"Service {svc.namespace}/{svc.name} has no port {port} "
                                                      f"(ports: {', '.join(map(str, ports))})")

    def backend(self, item: Checked, path: tuple, ref: dict[str, Any]) -> None:
        svc = self.service(item, path, ref["namespace"], ref["name"])
        if svc is not None:
            self.port(item, path, svc, ref["port"])

    def filters(self, item: Checked, path: tuple, filters: list[dict[str, Any]]) -> None:
        for j, f in enumerate(filters):
            if f["type"] == "RequestMirror":
                self.backend(item, path + (j, "requestMirror", "backendRef"), f["requestMirror"]["backendRef"])

    def check_route(self, item: Checked) -> None:
        spec = item.obj.spec_view
        for i, parent in enumerate(spec["parentRefs"]):
            path = ("spec", "parentRefs", i)
            svc = self.service(item, path, parent["namespace"], parent["name"])
            if svc is None:
                continue
            if "port" in parent:
                self.port(item, path, svc, parent["port"])
            if "sectionName" in parent:
                names = [p["name"] for p in svc.spec_view["ports"] if "name" in p]
                if parent["sectionName"] not in names:
                    self.report.error(item, path + ("sectionName",),
                                      f"Service {svc.namespace}/{svc.name} has no port named "
                                      f"{show(parent['sectionName'])} (names: {', '.join(names) or 'none'})")
        for r, rule in enumerate(spec.get("rules", ())):
            base = ("spec", "rules", r)
            self.filters(item, base + ("filters",), rule.get("filters", ()))
            for b, ref in enumerate(rule.get("backendRefs", ())):
                self.backend(item, base + ("backendRefs", b), ref)
                self.filters(item, base + ("backendRefs", b, "filters"), ref.get("filters", ()))

    def check_policy_targets(self, items: Iterable[Checked]) -> None:
        """TrafficPolicy targets a Service; FaultInjection a Service or an HTTPRoute/GRPCRoute (in
        its own namespace). The target must exist and be reached by HTTP; one policy of a kind per target."""
        targeted: dict[tuple[str, str, str], Checked] = {}
        for it in items:
            ref = it.obj.spec_view["targetRef"]
            path = ("spec", "targetRef")
            kind = ref.get("kind", "Service")
            if kind == "Service":
                target = self.service(it, path, it.obj.namespace, ref["name"])
                if target is None:
                    continue
                self._check_policy_reaches_http(it, target, path)
                self._check_health_check_port(it, target)
            else:
                target = self.route(it, path, kind, it.obj.namespace, ref["name"])
                if target is None:
                    continue
            key = (kind, target.namespace, target.name)
            if key in targeted:
                prev = targeted[key]
                self.report.error(it, path, f"{kind} {target.namespace}/{target.name} is already targeted by "
                                            f"{prev.label} ({prev.doc.file}:{prev.doc.line}); "
                                            f"one {it.obj.kind} per {kind}")
            else:
                targeted[key] = it

    _TCP_FALLBACK = {
        "TrafficPolicy": "TCP traffic is balanced round robin with the agent's connect timeout",
        "FaultInjection": "faults are injected into HTTP requests only",
    }

    def _check_health_check_port(self, it: Checked, svc: MeshObject) -> None:
        port = (it.obj.spec_view.get("healthCheck") or {}).get("port")
        ports = [p["port"] for p in svc.spec_view["ports"]]
        if port is not None and port not in ports:
            self.report.error(it, ("spec", "healthCheck", "port"),
                              f"Service {svc.namespace}/{svc.name} has no port {port} "
                              f"(its ports: {', '.join(str(p) for p in ports)})")

    def _check_policy_reaches_http(self, it: Checked, svc: MeshObject, path: tuple) -> None:
        """TrafficPolicy (but for its TCP sections) and FaultInjection act in the L7 drivers
        only: on a Service whose every port is declared non-HTTP they would be accepted and
        never applied."""
        protocols = [p.get("appProtocol") for p in svc.spec_view["ports"]]
        if any(ap is None or ap in L7_APP_PROTOCOLS for ap in protocols):
            return
        kind = it.obj.kind
        relayed = (f"every port of Service {svc.namespace}/{svc.name} is relayed as TCP "
                   f"(appProtocol {', '.join(sorted(set(protocols)))})")
        if kind != "TrafficPolicy":
            self.report.error(it, path, not_supported_yet_message(
                f"{_article(kind)} {kind} acts on HTTP traffic, and {relayed}; {self._TCP_FALLBACK[kind]}"))
            return
        spec = it.obj.spec_view
        http_only = [k for k in spec if k != "targetRef" and k not in TCP_POLICY_SECTIONS]
        for section in http_only:
            self.report.error(it, ("spec", section), not_supported_yet_message(
                f"{section} acts on HTTP traffic, and {relayed}; {self._TCP_FALLBACK[kind]} "
                f"(on TCP ports a TrafficPolicy applies {', '.join(TCP_POLICY_SECTIONS)})"))


def _article(word: str) -> str:
    return "an" if word[:1] in "AEIOU" else "a"


def _check_peer_authentications(items: list[Checked], report: _Report) -> None:
    wide: dict[str, Checked] = {}
    for it in items:
        if "selector" in it.obj.spec_view:
            continue
        ns = it.obj.namespace
        if ns in wide:
            prev = wide[ns]
            report.error(it, ("spec",), f"{prev.label} ({prev.doc.file}:{prev.doc.line}) already applies to the "
                                        f"whole namespace {ns}; only one PeerAuthentication without a selector "
                                        f"per namespace")
        else:
            wide[ns] = it


def _check_telemetries(items: list[Checked], refs: _Refs, meshconfig: Checked | None, meshconfig_invalid: bool,
                       report: _Report) -> None:
    """A Telemetry's target exists; one Telemetry per target and per namespace-wide scope; and
    its accessLogging has somewhere to go (MeshConfig spec.accessLog), or it would be accepted
    and never applied."""
    sink = meshconfig is not None and "accessLog" in meshconfig.obj.spec_view
    targeted: dict[tuple[str, str, str], Checked] = {}
    for it in items:
        spec = it.obj.spec_view
        if "accessLogging" in spec and not sink and not meshconfig_invalid:
            where = (f"{meshconfig.label} ({meshconfig.doc.file}:{meshconfig.doc.line}) has no spec.accessLog"
                     if meshconfig is not None else "there is no MeshConfig with spec.accessLog")
            report.error(it, ("spec", "accessLogging"),
                         f"access logs are off in this mesh: {where}, which says where the lines go; set its "
                         f"output (with samplingPercentage: 0 to log only where a Telemetry turns logging on)")
        ref = spec.get("targetRef")
        if ref is not None:
            path = ("spec", "targetRef")
            kind = ref["kind"]
            target = (refs.service(it, path, it.obj.namespace, ref["name"]) if kind == "Service"
                      else refs.route(it, path, kind, it.obj.namespace, ref["name"]))
            if target is None:
                continue
            key = (kind, target.namespace, target.name)
            what = f"{kind} {target.namespace}/{target.name}"
        elif "selector" not in spec:
            key, path, what = ("Namespace", it.obj.namespace, ""), ("spec",), f"the namespace {it.obj.namespace}"
        else:
            continue
        if key in targeted:
            prev = targeted[key]
            report.error(it, path, f"{what} is already the scope of {prev.label} ({prev.doc.file}:{prev.doc.line}); "
                                   f"one Telemetry per {'target' if ref is not None else 'namespace without a selector'}")
        else:
            targeted[key] = it
