"""The inbound capture listener (0.0.0.0:15006): traffic arriving for local workloads.

Only workloads scheduled on this node are valid destinations (dialed at the port the
client asked for); anything else is refused with RST and response flag ``NR`` — the
inbound side never forwards traffic off the node.

Plaintext arriving for a workload and port whose PeerAuthentication mode is STRICT is
refused (``NR``, reason ``mtls_required``). Every connection that may reach a local
workload — plaintext here, tunnel streams in ``tunnel.TunnelServer.open`` — then passes
the workload's AuthorizationPolicies (``authz``) on what this node verified itself: the
principal the mTLS handshake proved (none for plaintext), the source address, the
destination port. A denial is a reset (flag ``RBAC``, reason ``authz_denied``) before one
byte reaches the pod. With workload certificates
(``ProxyInputs.identities``), a connection whose original destination is a local pod's
tunnel port (15008) is an mTLS tunnel connection from another node proxy: it is handed
to ``tunnel.TunnelServer`` presenting that pod's identity.
"""

from __future__ import annotations

from nodeagent.proxy.authz import AuthzGate
from nodeagent.proxy.destinations import REPORTER_INBOUND, Decision, Forward, Refuse
from nodeagent.proxy.l7dispatch import L7Dispatch, admit_local
from nodeagent.proxy.listener import INBOUND_PORT, ProxyInputs, ProxyListener
from nodeagent.proxy.peerauth import STRICT, PeerAuthn
from nodeagent.proxy.relay import Relay
from nodeagent.proxy.tunnel import TunnelServer
from nodeagent.state import NodeSnapshot
from nodeagent.telemetry import TcpLabels


class InboundProxy(ProxyListener):
    direction = "inbound"
    reporter = REPORTER_INBOUND

    def __init__(self, inputs: ProxyInputs, host: str = "0.0.0.0", port: int = INBOUND_PORT) -> None:
        super().__init__(inputs, host, port)
        self.peerauth = PeerAuthn()
        self.authz = AuthzGate(self.metrics, self.direction)
        # requests checked here (L7 AuthorizationPolicy, RequestAuthentication); None: no L7,
        # so a connection whose requests would need checking is denied
        self.l7 = L7Dispatch(self, inputs.http_metrics, None, authorize_local=False) \
            if inputs.http_metrics is not None else None
        self.tunnel = TunnelServer(self, inputs.identities) if inputs.identities is not None else None

    def decide(self, snapshot: NodeSnapshot, dst_ip: str, dst_port: int) -> Decision:
        return self.destinations.inbound(snapshot, dst_ip, dst_port)

    def intercept(self, relay: Relay, snapshot: NodeSnapshot, dst_ip: str, dst_port: int) -> bool:
        tunnel = self.tunnel
        if tunnel is None or dst_port != self.inputs.tunnel_port:
            return False
        why = tunnel.full()
        if why:
            self.metrics.rejected(self.direction, why)
            relay.refuse(None, "NR")
            return True
        found = tunnel.planner.server_identity(snapshot, dst_ip)
        if isinstance(found, Refuse):
            self.metrics.rejected(self.direction, found.metric_reason)
            relay.refuse(None, found.response_flags)
            return True
        _, identity = found
        context = tunnel.identities.server_context(identity)
        if context is None:  # no valid certificate for the pod: refuse, never plaintext
            self.metrics.rejected(self.direction, "no_server_certificate")
            relay.refuse(None, "NR")
            return True
        relay.hand_off()
        tunnel.adopt(relay.transport, identity, context)
        return True

    def dispatch(self, relay: Relay, snapshot: NodeSnapshot, decision: Decision, labels: TcpLabels,
                 peer_ip: str, dst: tuple[str, int]) -> None:
        if isinstance(decision, Forward) and decision.workload is not None \
                and self.peerauth.mode(snapshot, decision.workload, decision.endpoint.port) == STRICT:
            self.metrics.rejected(self.direction, "mtls_required")
            relay.refuse(labels, "NR")
            return
        if isinstance(decision, Forward) and decision.workload is not None:
            self.admit_local(relay, snapshot, decision, labels, peer_ip, dst, None, peer_ip,
                             lambda: relay.refuse(labels, "RBAC"))
            return
        relay.forward(decision.address, labels)

    def admit_local(self, relay: Relay, snapshot: NodeSnapshot, decision: Forward, labels: TcpLabels, peer_ip: str,
                    dst: tuple[str, int], principal: str | None, src_ip: str, refuse) -> None:
        """A connection for a local workload (``l7dispatch.admit_local``)."""
        admit_local(self, relay, snapshot, decision, labels, peer_ip, dst, principal, src_ip, refuse)

    async def drain(self, grace: float) -> int:
        if self.tunnel is not None:
            self.tunnel.draining = True
            self.tunnel.close_idle()
        aborted = await super().drain(grace)
        if self.tunnel is not None:
            self.tunnel.abort_all()
        if self.l7 is not None:
            self.l7.close()
        return aborted

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.draining = True
            self.tunnel.abort_all()
        super().close()
        if self.l7 is not None:
            self.l7.close()
