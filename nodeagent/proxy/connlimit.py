"""TrafficPolicy ``connectionRateLimit``: a token bucket of new connections per Service port.

The outbound listener takes a token for every connection to a Service VIP whose
TrafficPolicy sets ``connectionRateLimit``, right after the L4 decision and before
protocol detection, so it applies to TCP and HTTP ports alike (the request limit,
``rateLimit``, is the HTTP drivers'). A connection past the limit is reset at once: it
is counted as ``hostmesh_agent_connections_rejected_total{reason="rate_limited"}`` and
its TCP series carries response flag ``RL``. ``perSourceWorkload`` gives each client
workload its own bucket (bounded in number, the oldest dropped first), as ``rateLimit``
does.

As for ``rateLimit``, the limit is local: each agent (and each of its worker processes,
``share`` = 1 / workers) enforces its part, so N client nodes together may open N times
the rate. No I/O: the listener passes the snapshot, the clock and the labels in.
"""

from __future__ import annotations

from typing import Any, Mapping

from nodeagent.proxy.l7.resilience import RateLimiter, RateLimitPolicy, source_key
from nodeagent.proxy.l7.routing import traffic_policy_specs
from nodeagent.state import NodeSnapshot

REJECT_REASON = "rate_limited"  # hostmesh_agent_connections_rejected_total{reason}
RESPONSE_FLAG = "RL"


def connection_rate_policy(spec: Mapping[str, Any] | None, share: float = 1.0) -> RateLimitPolicy | None:
    """The bucket of a ``connectionRateLimit`` (``share``: this process's part of it)."""
    return RateLimitPolicy.from_spec(spec, share, count="connectionsPerUnit")


class _PortLimit:
    """The live buckets of one Service port, kept across snapshots while its policy holds."""

    __slots__ = ("policy", "limiter", "rejected")

    def __init__(self, policy: RateLimitPolicy) -> None:
        self.policy = policy
        self.limiter = RateLimiter(policy)
        self.rejected = 0

    def take(self, labels: Any, now: float) -> bool:
        if self.limiter.take(source_key(labels) if self.policy.per_source else "", now):
            self.rejected += 1
            return False
        return True


class ConnectionRateLimits:
    """Per listener: which Service ports are limited (compiled once per snapshot object) and
    their buckets."""

    __slots__ = ("share", "_snapshot", "_policies", "_ports")

    def __init__(self, share: float = 1.0) -> None:
        self.share = share
        self._snapshot: NodeSnapshot | None = None
        self._policies: dict[tuple[str, str], RateLimitPolicy] = {}
        self._ports: dict[tuple[str, str, int], _PortLimit] = {}

    def admit(self, snapshot: NodeSnapshot, service: Any, port: int, labels: Any, now: float) -> bool:
        """False: the connection to ``service``:``port`` is over its limit (reset it)."""
        if snapshot is not self._snapshot:
            self._sync(snapshot)
        policy = self._policies.get((service.namespace, service.name))
        if policy is None:
            return True
        key = (service.namespace, service.name, port)
        limit = self._ports.get(key)
        if limit is None:
            limit = self._ports[key] = _PortLimit(policy)
        return limit.take(labels, now)

    def _sync(self, snapshot: NodeSnapshot) -> None:
        """A new snapshot: the buckets of a port whose policy is unchanged keep their tokens."""
        self._snapshot = snapshot
        policies = {}
        for key, spec in traffic_policy_specs(snapshot).items():
            try:
                policy = connection_rate_policy(spec.get("connectionRateLimit"), self.share)
            except (KeyError, TypeError, ValueError):  # validated by the control plane
                continue
            if policy is not None:
                policies[key] = policy
        self._policies = policies
        self._ports = {k: v for k, v in self._ports.items() if policies.get(k[:2]) == v.policy}

    def view(self) -> dict[str, dict]:
        """``"ns/name/port"`` -> ``{"summary": {"connectionRateLimit": ...}, "endpoints": {}}``,
        the shape of ``resilience.state_view`` (merged with it for /clusters; the token and
        rejection counts are summed over worker processes by ``merge_state_views``)."""
        out = {}
        for (ns, name, port), limit in list(self._ports.items()):
            p = limit.policy
            out[f"{ns}/{name}/{port}"] = {"summary": {"connectionRateLimit": {
                "tokensPerSecond": p.rate, "burst": p.burst, "perSourceWorkload": p.per_source,
                "rateLimited": limit.rejected}}, "endpoints": {}}
        return out


def merge_views(*views: dict[str, dict]) -> dict[str, dict]:
    """One view of several disjoint-section state views of the same process (L7 + L4)."""
    out: dict[str, dict] = {}
    for view in views:
        for key, v in view.items():
            have = out.get(key)
            if have is None:
                out[key] = {"summary": dict(v["summary"]), "endpoints": dict(v["endpoints"])}
                continue
            have["summary"].update(v["summary"])
            have["endpoints"].update(v["endpoints"])
    return out
