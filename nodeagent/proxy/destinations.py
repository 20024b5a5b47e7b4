"""Where a captured connection goes: pure decision logic, no I/O.

Given the snapshot a connection took at accept, this node's name and the connection's
original destination, return one of:

* ``Forward(endpoint, service, workload)`` — dial ``endpoint.address:endpoint.port``;
* ``Passthrough(ip, port)`` — an address the mesh does not know: dial it unchanged
  (outbound only, the default; ``unknown_destination="refuse"`` turns it into a refusal);
* ``Refuse(reason, response_flags)`` — close the connection (RST) without dialing.

Outbound rules (the proxy on the client's node):
  1. service VIP:port -> one of the service's endpoints for that port, round robin per
     service port, dialed at ``endpoint.port`` (the resolved target port). A single-port
     service is served by all its endpoints; for a multi-port service the endpoints
     serving port *p* are those whose ``port`` equals ``p.target_port``. Endpoints failing
     their active health checks (the snapshot's EndpointHealth objects) are skipped, unless
     fewer than the Service's ``healthCheck.panicThreshold`` (50) percent are healthy:
     then all are used (Envoy's healthy panic threshold, logged), as the L7 balancers do.
     None -> ``Refuse("no healthy upstream", "UH")``.
  2. a known workload (pod) address -> that workload at the same port.
  3. anything else -> ``Passthrough`` or ``Refuse("unknown destination", "NR")``.

Inbound rules (the proxy on the server's node): the destination must be a workload
scheduled on this node, dialed at the same port; anything else is
``Refuse(..., "NR")`` — the inbound listener never forwards off-node.

The round-robin state is per proxy (``RoundRobin``), never in the immutable snapshot.
Decisions are immutable values: swapping the snapshot later changes nothing for a
connection that already decided.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from nodeagent.state import Endpoint, NodeSnapshot, Service, ServicePort, Workload, unhealthy_endpoints
from nodeagent.telemetry import CLUSTER, UNKNOWN, TcpLabels, workload_labels

log = logging.getLogger(__name__)

PASSTHROUGH = "passthrough"
DEFAULT_PANIC_THRESHOLD = 50  # percent, as lb.LbConfig's
REFUSE = "refuse"
UNKNOWN_DESTINATION_POLICIES = (PASSTHROUGH, REFUSE)

REPORTER_OUTBOUND = "source"
REPORTER_INBOUND = "destination"


@dataclass(frozen=True, slots=True)
class Forward:
    endpoint: Endpoint
    service: Service | None = None
    workload: Workload | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.endpoint.address, self.endpoint.port)


@dataclass(frozen=True, slots=True)
class Passthrough:
    ip: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str
    response_flags: str = "NR"
    # the service the connection was meant for, when known (labels of UH refusals)
    service: Service | None = None

    @property
    def metric_reason(self) -> str:
        """The ``reason`` label of hostmesh_agent_connections_rejected_total."""
        return _REFUSE_METRIC_REASONS.get(self.reason, self.reason.replace(" ", "_"))


Decision = Union[Forward, Passthrough, Refuse]

NO_HEALTHY_UPSTREAM = "no healthy upstream"
UNKNOWN_DESTINATION = "unknown destination"
NOT_LOCAL_WORKLOAD = "destination is not a workload on this node"
_REFUSE_METRIC_REASONS = {
    NO_HEALTHY_UPSTREAM: "no_healthy_upstream",
    UNKNOWN_DESTINATION: "no_route",
    NOT_LOCAL_WORKLOAD: "not_local_workload",
}


class RoundRobin:
    """Round-robin choice per key (service + port). Owned by one proxy, one event loop."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next: dict[tuple, int] = {}

    def pick(self, key: tuple, endpoints: Sequence[Endpoint]) -> Endpoint:
        n = len(endpoints)
        i = self._next.get(key, 0) % n
        self._next[key] = i + 1
        return endpoints[i]

    def forget_except(self, keys: set[tuple]) -> None:
        """Drop the state of keys that no longer exist (after a snapshot swap)."""
        for key in [k for k in self._next if k not in keys]:
            del self._next[key]


def service_endpoints(service: Service, port: ServicePort) -> tuple[Endpoint, ...]:
    """The endpoints serving ``port`` of ``service`` (see the module docstring)."""
    if len(service.ports) == 1:
        return service.endpoints
    return tuple(ep for ep in service.endpoints if ep.port == port.target_port)


def healthy_endpoints(service: Service, endpoints: tuple[Endpoint, ...],
                      unhealthy: frozenset[tuple[str, int, str]], panic_threshold: int
                      ) -> tuple[tuple[Endpoint, ...], bool]:
    """(the endpoints to balance over, panic): those not failing their health checks, or all
    of them when fewer than ``panic_threshold`` percent are healthy."""
    ref = f"{service.namespace}/{service.name}"
    healthy = tuple(ep for ep in endpoints if (ep.address, ep.port, ref) not in unhealthy)
    if len(healthy) == len(endpoints):
        return endpoints, False
    if not healthy or len(healthy) * 100 < panic_threshold * len(endpoints):
        return endpoints, True
    return healthy, False


def _panic_threshold(spec: Mapping | None) -> int:
    hc = (spec or {}).get("healthCheck") or {}
    try:
        return int(hc.get("panicThreshold", DEFAULT_PANIC_THRESHOLD))
    except (TypeError, ValueError):
        return DEFAULT_PANIC_THRESHOLD


class Destinations:
    """The decision functions plus per-snapshot lookup caches and the LB state.

    One instance per proxy listener. The caches are rebuilt when a connection brings
    a different snapshot object than the previous one (snapshots are immutable), so
    the cost per connection is a few dict lookups.
    """

    def __init__(self, node: str, *, unknown_destination: str = PASSTHROUGH,
                 lb: RoundRobin | None = None) -> None:
        if unknown_destination not in UNKNOWN_DESTINATION_POLICIES:
            raise ValueError(f"unknown_destination: must be one of {', '.join(UNKNOWN_DESTINATION_POLICIES)}, "
                             f"got {unknown_destination!r}")
        self.node = node
        self.unknown_destination = unknown_destination
        self.lb = lb if lb is not None else RoundRobin()
        self._snapshot: NodeSnapshot | None = None
        self._endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
        self._service_of: dict[tuple[str, int], Service] = {}
        self._panicking: set[tuple] = set()  # service ports in panic mode (logged on change)

    # ------------------------------------------------------------------ decisions
    def outbound(self, snapshot: NodeSnapshot, dst_ip: str, dst_port: int) -> Decision:
        self._use(snapshot)
        hit = snapshot.service_by_vip(dst_ip, dst_port)
        if hit is not None:
            service, port = hit
            endpoints = self._endpoints[(dst_ip, dst_port)]
            if not endpoints:
                return Refuse(NO_HEALTHY_UPSTREAM, "UH", service)
            ep = self.lb.pick((service.namespace, service.name, port.port), endpoints)
            return Forward(ep, service, snapshot.workload_by_ip(ep.address))
        workload = snapshot.workload_by_ip(dst_ip)
        if workload is not None:
            return self._to_workload(workload, dst_ip, dst_port)
        if self.unknown_destination == REFUSE:
            return Refuse(UNKNOWN_DESTINATION, "NR")
        return Passthrough(dst_ip, dst_port)

    def inbound(self, snapshot: NodeSnapshot, dst_ip: str, dst_port: int) -> Decision:
        self._use(snapshot)
        workload = snapshot.workload_by_ip(dst_ip)
        if workload is None or workload.node != self.node:
            return Refuse(NOT_LOCAL_WORKLOAD, "NR")
        return self._to_workload(workload, dst_ip, dst_port)

    def _to_workload(self, workload: Workload, ip: str, port: int) -> Forward:
        ep = Endpoint(address=ip, port=port, node=workload.node, workload=workload.name,
                      namespace=workload.namespace)
        return Forward(ep, self._service_of.get((ip, port)), workload)

    # --------------------------------------------------------------------- caches
    def _use(self, snapshot: NodeSnapshot) -> None:
        if snapshot is self._snapshot:
            return
        endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
        service_of: dict[tuple[str, int], Service] = {}
        keys: set[tuple] = set()
        unhealthy = unhealthy_endpoints(snapshot.config)
        policies = _traffic_policy_specs(snapshot) if unhealthy else {}
        panicking: set[tuple] = set()
        for service in snapshot.services:
            for port in service.ports:
                eps = service_endpoints(service, port)
                key = (service.namespace, service.name, port.port)
                for ep in eps:
                    service_of.setdefault((ep.address, ep.port), service)
                if unhealthy:
                    eps, panic = healthy_endpoints(service, eps, unhealthy, _panic_threshold(
                        policies.get((service.namespace, service.name))))
                    if panic:
                        panicking.add(key)
                endpoints[(service.cluster_ip, port.port)] = eps
                keys.add(key)
        self._log_panic_changes(panicking)
        self._snapshot, self._endpoints, self._service_of = snapshot, endpoints, service_of
        self.lb.forget_except(keys)

    def _log_panic_changes(self, panicking: set[tuple]) -> None:
        for ns, name, port in sorted(panicking - self._panicking):
            log.warning("service %s/%s port %d: too few endpoints pass their health checks (panic "
                        "threshold), connections go to all of them", ns, name, port)
        for ns, name, port in sorted(self._panicking - panicking):
            log.info("service %s/%s port %d left health-check panic mode", ns, name, port)
        self._panicking = panicking


def _traffic_policy_specs(snapshot: NodeSnapshot) -> dict:
    from nodeagent.proxy.l7.routing import traffic_policy_specs  # routing imports this module
    return traffic_policy_specs(snapshot)


# ---------------------------------------------------------------------- labels

def connection_labels(snapshot: NodeSnapshot, decision: Decision, src_ip: str, reporter: str) -> TcpLabels:
    """The metric labels of one connection (computed once, at accept; one tuple).

    Source: the workload at ``src_ip``. Destination: the Service the decision went to (or
    was refused for) and the workload of the picked endpoint; the app, version, canonical
    and cluster labels derive from those Workload objects (``telemetry.workload_labels``,
    memoized per object). Nothing unknown is named by its address: it is ``unknown``.
    """
    src = snapshot.workload_by_ip(src_ip)
    service = getattr(decision, "service", None)
    dst = None
    dst_workload = dst_namespace = UNKNOWN
    if isinstance(decision, Forward):
        ep = decision.endpoint
        dst = decision.workload
        if ep.workload:  # the endpoint names its workload: authoritative
            dst_workload, dst_namespace = ep.workload, ep.namespace
        elif dst is not None:
            dst_workload, dst_namespace = dst.name, dst.namespace
    if service is not None and dst_namespace == UNKNOWN:
        dst_namespace = service.namespace
    s, d = workload_labels(src), workload_labels(dst, dst_workload)
    return TcpLabels(
        reporter=reporter,
        source_workload=src.name if src is not None else UNKNOWN,
        source_workload_namespace=src.namespace if src is not None else UNKNOWN,
        source_app=s.app, source_version=s.version,
        source_canonical_service=s.canonical_service, source_canonical_revision=s.canonical_revision,
        source_cluster=CLUSTER if src is not None else UNKNOWN,
        destination_service=service.hostname if service is not None else UNKNOWN,
        destination_service_name=service.name if service is not None else UNKNOWN,
        destination_service_namespace=service.namespace if service is not None else UNKNOWN,
        destination_workload=dst_workload,
        destination_workload_namespace=dst_namespace,
        destination_app=d.app, destination_version=d.version,
        destination_canonical_service=d.canonical_service, destination_canonical_revision=d.canonical_revision,
        destination_cluster=CLUSTER if dst_workload != UNKNOWN else UNKNOWN,
    )
