"""Who talks mTLS to whom: the tunnel decisions, pure logic over the snapshot.

Outbound (the source node): a ``Forward`` to a workload that the snapshot places on
*another* node, from a downstream address that is a mesh workload on *this* node, goes
through the tunnel: dial ``<destination pod IP>:15008`` (routed to the destination node
and captured there into its inbound listener, so no capture changes are needed), present
the source workload's identity, require the destination workload's identity. Everything
else keeps the plaintext L4 path: same-node destinations, destinations the snapshot
cannot place, and sources that are not mesh workloads here (they have no identity; a
STRICT destination refuses them). A workload whose namespace or service account is not a
valid SPIFFE name cannot be given an identity: connections to or from it are refused
(fail closed), never sent in plaintext.

Inbound (the destination node): a tunnel connection arriving for a pod IP presents the
identity of the workload at that IP, which must be on this node; every stream's target
must be a workload on this node running as exactly the identity the connection presented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from nodeagent.identity import IdentityError, SpiffeId, spiffe_id
from nodeagent.proxy.destinations import NOT_LOCAL_WORKLOAD, Destinations, Forward, Refuse
from nodeagent.proxy.tunnel_wire import sni_for
from nodeagent.state import NodeSnapshot, Workload
from nodeagent.telemetry import UNKNOWN, TcpLabels, source_fields

TUNNEL_PORT = 15008
MUTUAL_TLS = "mutual_tls"

NO_IDENTITY = "workload has no valid identity"
IDENTITY_MISMATCH = "tunnel target runs as another identity"
TUNNEL_LOOP = "tunnel target is the tunnel port"


@dataclass(frozen=True, slots=True)
class TunnelPlan:
    source: SpiffeId  # presented by this proxy (the client pod's identity)
    destination: SpiffeId  # required from the peer
    dial: tuple[str, int]  # destination pod IP, TUNNEL_PORT
    target: tuple[str, int]  # the original destination carried in OPEN
    source_ip: str
    sni: str | None

    @property
    def pool_key(self) -> tuple:
        return (self.source, self.destination, self.dial)


class IdentityIndex:
    """SPIFFE IDs of the snapshot's workloads, computed once per snapshot."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._snapshot: NodeSnapshot | None = None
        self._ids: dict[Workload, SpiffeId | None] = {}

    def of(self, snapshot: NodeSnapshot, workload: Workload) -> SpiffeId | None:
        if snapshot is not self._snapshot:
            self._snapshot, self._ids = snapshot, {}
        try:
            return self._ids[workload]
        except KeyError:
            pass
        try:
            ident = spiffe_id(self.trust_domain, workload.namespace, workload.service_account)
        except IdentityError:
            ident = None
        self._ids[workload] = ident
        return ident


Outbound = Union[TunnelPlan, Refuse, None]


class TunnelPlanner:
    def __init__(self, node: str, trust_domain: str, *, tunnel_port: int = TUNNEL_PORT) -> None:
        self.node = node
        self.tunnel_port = tunnel_port
        self.ids = IdentityIndex(trust_domain)

    def outbound(self, snapshot: NodeSnapshot, decision, src_ip: str) -> Outbound:
        """TunnelPlan, a Refuse (fail closed), or None for the plaintext path."""
        if not isinstance(decision, Forward):
            return None
        dst = decision.workload
        if dst is None or not dst.node or dst.node == self.node:
            return None
        src = snapshot.workload_by_ip(src_ip)
        if src is None or src.node != self.node:
            return None
        src_id = self.ids.of(snapshot, src)
        dst_id = self.ids.of(snapshot, dst)
        if src_id is None or dst_id is None:
            return Refuse(NO_IDENTITY, "UF", decision.service)
        ip, port = decision.address
        return TunnelPlan(src_id, dst_id, (ip, self.tunnel_port), (ip, port), src_ip, sni_for(dst_id))

    def server_identity(self, snapshot: NodeSnapshot, dst_ip: str) -> tuple[Workload, SpiffeId] | Refuse:
        """The identity to present for a tunnel connection captured to ``dst_ip``."""
        workload = snapshot.workload_by_ip(dst_ip)
        if workload is None or workload.node != self.node:
            return Refuse(NOT_LOCAL_WORKLOAD, "NR")
        ident = self.ids.of(snapshot, workload)
        if ident is None:
            return Refuse(NO_IDENTITY, "NR")
        return workload, ident

    def local_identities(self, snapshot: NodeSnapshot) -> dict[str, SpiffeId]:
        """SNI -> identity for the workloads on this node (names several identities would
        share are left out: such a client gets no certificate and fails the handshake)."""
        by_sni: dict[str, SpiffeId] = {}
        clash: set[str] = set()
        for w in snapshot.workloads:
            if w.node != self.node:
                continue
            ident = self.ids.of(snapshot, w)
            name = sni_for(ident) if ident is not None else None
            if name is None:
                continue
            if by_sni.get(name, ident) != ident:
                clash.add(name)
            by_sni[name] = ident
        for name in clash:
            del by_sni[name]
        return by_sni

    def inbound_stream(self, snapshot: NodeSnapshot, destinations: Destinations, presented: SpiffeId,
                       dst_ip: str, dst_port: int) -> Forward | Refuse:
        """Where one tunnel stream goes, given the identity its connection presented."""
        if dst_port == self.tunnel_port:
            return Refuse(TUNNEL_LOOP, "NR")
        decision = destinations.inbound(snapshot, dst_ip, dst_port)
        if not isinstance(decision, Forward):
            return decision
        if self.ids.of(snapshot, decision.workload) != presented:
            return Refuse(IDENTITY_MISMATCH, "NR", decision.service)
        return decision

    def source_labels(self, snapshot: NodeSnapshot, labels: TcpLabels, client: SpiffeId, src_ip: str,
                      presented: SpiffeId) -> TcpLabels:
        """Inbound tunnel labels: the source workload only when its identity is the client's."""
        src = snapshot.workload_by_ip(src_ip)
        if src is not None and self.ids.of(snapshot, src) == client:
            source = source_fields(src)
        else:  # the certificate vouches for the namespace only
            source = source_fields(None, UNKNOWN, client.namespace)
        return labels._replace(**source, source_principal=client.uri, destination_principal=presented.uri,
                               connection_security_policy=MUTUAL_TLS)


def tunnel_labels(labels: TcpLabels, plan: TunnelPlan) -> TcpLabels:
    """Outbound labels of a tunnelled connection."""
    return labels._replace(source_principal=plan.source.uri, destination_principal=plan.destination.uri,
                           connection_security_policy=MUTUAL_TLS)
