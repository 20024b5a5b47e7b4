"""The inbound capture listener (0.0.0.0:15006): plaintext arriving for local workloads.

Only workloads scheduled on this node are valid destinations (dialed at the port the
client asked for); anything else is refused with RST and response flag ``NR`` — the
inbound side never forwards traffic off the node.
"""

from __future__ import annotations

from nodeagent.proxy.destinations import REPORTER_INBOUND, Decision
from nodeagent.proxy.listener import INBOUND_PORT, ProxyInputs, ProxyListener
from nodeagent.state import NodeSnapshot


class InboundProxy(ProxyListener):
    direction = "inbound"
    reporter = REPORTER_INBOUND

    def __init__(self, inputs: ProxyInputs, host: str = "0.0.0.0", port: int = INBOUND_PORT) -> None:
        super().__init__(inputs, host, port)

    def decide(self, snapshot: NodeSnapshot, dst_ip: str, dst_port: int) -> Decision:
        return self.destinations.inbound(snapshot, dst_ip, dst_port)
