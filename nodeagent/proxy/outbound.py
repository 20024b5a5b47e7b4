"""The outbound capture listener (0.0.0.0:15001): traffic leaving workloads on this node.

Destinations: service VIP:port -> a round-robin endpoint of the service; a known workload
address -> that workload; anything else -> passthrough (default) or refused, per
``ProxyInputs.unknown_destination``. It binds 0.0.0.0 because iptables REDIRECT in
PREROUTING delivers to the primary address of the interface the packet came in on.

With workload certificates (``ProxyInputs.identities``), a connection from a mesh
workload here to a workload on another node goes through the mTLS tunnel
(``tunnel_plan`` decides, ``tunnel.TunnelClient`` dials and pools); without a valid
certificate for the source it is refused, never sent in plaintext. A connection to a
workload on this node never reaches an inbound listener, so the destination's
AuthorizationPolicies are checked here (``authz``), with the source identity the snapshot
gives the client pod.

With ``ProxyInputs.http_metrics`` set, connections to destinations with an L7 need
(``l7dispatch`` says exactly which) are protocol-detected and HTTP/1.1 is served by the
L7 driver (routing, LB, filters, request metrics; its upstream dials take the same tunnel
decision); every other connection takes the TCP path above unchanged. Before either, a Service's
``connectionRateLimit`` (``connlimit``) may reset a new connection.
"""

from __future__ import annotations

import time

from nodeagent.proxy import connlimit
from nodeagent.proxy.authz import AuthzGate
from nodeagent.proxy.destinations import REPORTER_OUTBOUND, Decision, Refuse
from nodeagent.proxy.l7.resilience import state_view
from nodeagent.proxy.l7dispatch import L7Dispatch, admit_local
from nodeagent.proxy.listener import OUTBOUND_PORT, ProxyInputs, ProxyListener
from nodeagent.proxy.relay import Relay
from nodeagent.proxy.tunnel import TunnelClient
from nodeagent.proxy.tunnel_plan import tunnel_labels
from nodeagent.state import NodeSnapshot
from nodeagent.telemetry import TcpLabels


class OutboundProxy(ProxyListener):
    direction = "outbound"
    reporter = REPORTER_OUTBOUND

    def __init__(self, inputs: ProxyInputs, host: str = "0.0.0.0", port: int = OUTBOUND_PORT) -> None:
        super().__init__(inputs, host, port)
        self.tunnel = TunnelClient(self, inputs.identities) if inputs.identities is not None else None
        self.authz = AuthzGate(self.metrics, self.direction)  # same-node destinations (see dispatch_l4)
        self.l7 = L7Dispatch(self, inputs.http_metrics, self.tunnel) if inputs.http_metrics is not None else None
        self.connection_limits = connlimit.ConnectionRateLimits(inputs.rate_limit_share)

    def decide(self, snapshot: NodeSnapshot, dst_ip: str, dst_port: int) -> Decision:
        return self.destinations.outbound(snapshot, dst_ip, dst_port)

    def dispatch(self, relay: Relay, snapshot: NodeSnapshot, decision: Decision, labels: TcpLabels,
                 peer_ip: str, dst: tuple[str, int]) -> None:
        service = getattr(decision, "service", None)
        if service is not None and not self.connection_limits.admit(snapshot, service, dst[1], labels,
                                                                    time.monotonic()):
            self.metrics.rejected(self.direction, connlimit.REJECT_REASON)
            relay.refuse(labels, connlimit.RESPONSE_FLAG)
            return
        l7 = self.l7
        if l7 is not None:
            detector = l7.detector(snapshot, decision, dst[0], dst[1])
            if detector is not None:
                l7.start(relay, detector, snapshot, decision, labels, peer_ip, dst)
                return
        self.dispatch_l4(relay, snapshot, decision, labels, peer_ip)

    def resilience_view(self) -> dict[str, dict]:
        """The live retry / outlier / rate-limit state of this process's destinations
        (``resilience.state_view`` plus the connection rate limits), for /clusters."""
        l7 = self.l7
        http = state_view(l7.inputs.routes.resilience, time.perf_counter()) if l7 is not None else {}
        return connlimit.merge_views(http, self.connection_limits.view())

    def answer_refusal(self, relay: Relay, snapshot: NodeSnapshot, decision: Refuse, labels: TcpLabels,
                       peer_ip: str, dst: tuple[str, int]) -> bool:
        # a Service without endpoints: HTTP clients get a 503 UH from the driver, not a reset
        l7 = self.l7
        if l7 is None or decision.service is None:
            return False
        detector = l7.detector(snapshot, decision, dst[0], dst[1])
        if detector is None:
            return False
        l7.start(relay, detector, snapshot, decision, labels, peer_ip, dst)
        return True

    def dispatch_l4(self, relay: Relay, snapshot: NodeSnapshot, decision: Decision, labels: TcpLabels,
                    peer_ip: str) -> None:
        """The TCP path: the mTLS tunnel when the plan says so, else a plaintext relay (a
        refusal L7 detection took, when the connection turned out not to be HTTP: refused)."""
        if isinstance(decision, Refuse):
            self.metrics.rejected(self.direction, decision.metric_reason)
            relay.refuse(labels, decision.response_flags)
            return
        tunnel = self.tunnel
        plan = tunnel.planner.outbound(snapshot, decision, peer_ip) if tunnel is not None else None
        if plan is None:
            local = getattr(decision, "workload", None)  # a Passthrough has none
            if local is not None and local.node == self.inputs.node:
                self._admit_same_node(relay, snapshot, decision, labels, peer_ip)
                return
            relay.forward(decision.address, labels)
            return
        if isinstance(plan, Refuse):
            self.metrics.rejected(self.direction, "no_identity")
            relay.refuse(labels, plan.response_flags)
            return
        labels = tunnel_labels(labels, plan)
        context = tunnel.identities.client_context(plan.source)
        if context is None:  # no valid certificate for the source: fail closed
            self.metrics.rejected(self.direction, "no_client_certificate")
            relay.refuse(labels, "UF")
            return
        relay.forward_tunnel(plan, context, labels, tunnel)

    def _admit_same_node(self, relay: Relay, snapshot: NodeSnapshot, decision, labels: TcpLabels,
                         peer_ip: str) -> None:
        """A workload of this node is the destination: its AuthorizationPolicies (and request
        checks, served here as the inbound side would) with the client pod's identity."""
        admit_local(self, relay, snapshot, decision, labels, peer_ip, (decision.endpoint.address, decision.endpoint.port),
                    self.authz.local_principal(snapshot, peer_ip), peer_ip, lambda: relay.refuse(labels, "RBAC"))

    async def drain(self, grace: float) -> int:
        if self.tunnel is not None:
            self.tunnel.draining = True
            self.tunnel.close_idle()
        aborted = await super().drain(grace)
        if self.l7 is not None:
            self.l7.close()
        return aborted

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.draining = True
            self.tunnel.close_idle()
        super().close()
        if self.l7 is not None:
            self.l7.close()
