"""The outbound capture listener (0.0.0.0:15001): traffic leaving workloads on this node.

Destinations: service VIP:port -> a round-robin endpoint of the service; a known workload
address -> that workload; anything else -> passthrough (default) or refused, per
``ProxyInputs.unknown_destination``. It binds 0.0.0.0 because iptables REDIRECT in
PREROUTING delivers to the primary address of the interface the packet came in on.
"""

from __future__ import annotations

from nodeagent.proxy.destinations import REPORTER_OUTBOUND, Decision
from nodeagent.proxy.listener import OUTBOUND_PORT, ProxyInputs, ProxyListener
from nodeagent.state import NodeSnapshot


class OutboundProxy(ProxyListener):
    direction = "outbound"
    reporter = REPORTER_OUTBOUND

    def __init__(self, inputs: ProxyInputs, host: str = "0.0.0.0", port: int = OUTBOUND_PORT) -> None:
        super().__init__(inputs, host, port)

    def decide(self, snapshot: NodeSnapshot, dst_ip: str, dst_port: int) -> Decision:
        return self.destinations.outbound(snapshot, dst_ip, dst_port)
