"""The L7 data plane: HTTP/1.1, HTTP/2 and gRPC proxying as plain, I/O-free logic.

Each module is a pure decision layer fed inputs and returning decisions; one driver turns
them into asyncio transports. Routing and load balancing:

* ``routing`` — ``RouteTable.from_snapshot(snapshot)`` compiles the Gateway API HTTPRoutes
  and GRPCRoutes attached to Services (GAMMA) once per snapshot; ``match(RequestInfo)``
  returns a ``RouteDecision`` (backend, filters, mirrors, timeouts), a ``DirectResponse``
  (redirect, 500) or ``NoRoute``.
* ``filters`` — RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect,
  RequestMirror.
* ``lb`` — round robin, least request (P2C), ring hash (Ketama), random; ``LbState`` keeps
  the balancers across snapshot swaps.
"""

from nodeagent.proxy.l7.filters import (DirectResponse, FilterChain, HeaderModifier, RequestRedirect, UrlRewrite,
                                        replace_prefix_match)
from nodeagent.proxy.l7.lb import (Balancer, LbConfig, LbState, LeastRequest, Random, RingHash, RoundRobin,
                                   balancer_for)
from nodeagent.proxy.l7.routing import (Backend, NoRoute, RequestInfo, RouteDecision, RouteRef, RouteTable,
                                        ServiceRouter, Timeouts, parse_duration)

__all__ = [
    "Backend", "Balancer", "DirectResponse", "FilterChain", "HeaderModifier", "LbConfig", "LbState",
    "LeastRequest", "NoRoute", "Random", "RequestInfo", "RequestRedirect", "RingHash", "RoundRobin",
    "RouteDecision", "RouteRef", "RouteTable", "ServiceRouter", "Timeouts", "UrlRewrite", "balancer_for",
    "parse_duration", "replace_prefix_match",
]
