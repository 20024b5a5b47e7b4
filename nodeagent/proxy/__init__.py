"""The node proxy's data plane.

L4 today: ``OutboundProxy`` (15001) and ``InboundProxy`` (15006) accept captured
connections, decide where they go (``destinations``, pure logic) and relay bytes
(``relay``, asyncio protocols). With workload certificates, cross-node traffic goes
through the node-to-node mTLS tunnel (``tunnel_plan`` decides, ``tunnel_wire`` is the
frame format, ``tunnel`` the TLS connections, pool and server, 15008), and inbound
plaintext is subject to PeerAuthentication (``peerauth``). ``NodeProxy`` runs the
listeners. Inputs come from one ``ProxyInputs`` object; metrics go to an injected
``nodeagent.telemetry.ProxyMetrics``.
"""

from nodeagent.proxy.destinations import (Decision, Destinations, Forward, Passthrough, Refuse,
                                          RoundRobin, connection_labels)
from nodeagent.proxy.inbound import InboundProxy
from nodeagent.proxy.listener import (INBOUND_PORT, OUTBOUND_PORT, TUNNEL_PORT, ProxyInputs, ProxyLimits,
                                      ProxyListener)
from nodeagent.proxy.outbound import OutboundProxy
from nodeagent.proxy.relay import Relay
from nodeagent.proxy.server import NodeProxy

__all__ = [
    "Decision", "Destinations", "Forward", "Passthrough", "Refuse", "RoundRobin", "connection_labels",
    "InboundProxy", "OutboundProxy", "NodeProxy", "ProxyInputs", "ProxyLimits", "ProxyListener",
    "Relay", "INBOUND_PORT", "OUTBOUND_PORT", "TUNNEL_PORT",
]
