"""Endpoint health reported by the agents, carried to every agent in the snapshots.

Each agent probes the endpoints of its own node (TrafficPolicy ``healthCheck``,
``nodeagent/healthcheck.py``) and sends the set it finds unhealthy on its discovery stream
(``HealthReport``). ``HealthStore`` keeps the latest set per node, accepting only
addresses of Workloads the model places on that node (a node cannot mark another node's
endpoints down), and turns the sets into config objects ``EndpointHealth
hostmesh-system/<node>`` (spec ``{"unhealthy": [[address, port, "ns/service"], ...]}``) that the builder
adds to every snapshot. The agents' balancers skip those endpoints (with a panic
threshold, ``nodeagent/proxy/l7/lb.py``).

A node's set stays until its agent reports again: an agent that restarts sends a fresh
report after its first update. Each control-plane replica keeps the reports of the agents
connected to it (see docs/ARCHITECTURE.md, Known gaps).
"""

from __future__ import annotations

import json
from typing import Iterable

from controlplane.model.objects import MeshModel
from nodeagent.state import ENDPOINT_HEALTH, HEALTH_NAMESPACE, ConfigObject, unhealthy_endpoints

__all__ = ["ENDPOINT_HEALTH", "HEALTH_NAMESPACE", "HealthStore", "unhealthy_endpoints"]

MAX_REPORTED = 65536  # endpoints per node report


class HealthStore:
    """node -> the endpoints (address, port, "ns/service") its agent reported unhealthy: health
    is per Service (the same pod may pass one Service's check and fail another's)."""

    def __init__(self) -> None:
        self._by_node: dict[str, frozenset[tuple[str, int, str]]] = {}

    def report(self, node: str, unhealthy: Iterable[tuple[str, int, str]], model: MeshModel | None) -> bool:
        """Record ``node``'s report; True when the stored set changed. Endpoints whose
        address is not a Workload on ``node`` are dropped (and so is a report past
        ``MAX_REPORTED``)."""
        local = _addresses_on(model, node)
        keys = frozenset((a, int(p), str(s)) for a, p, s in list(unhealthy)[:MAX_REPORTED]
                         if a in local and 0 < int(p) < 65536)
        if self._by_node.get(node, frozenset()) == keys:
            return False
        if keys:
            self._by_node[node] = keys
        else:
            self._by_node.pop(node, None)
        return True

    def unhealthy(self, node: str) -> frozenset[tuple[str, int, str]]:
        return self._by_node.get(node, frozenset())

    def config_objects(self) -> tuple[ConfigObject, ...]:
        """The ``EndpointHealth`` objects of every node with unhealthy endpoints, sorted."""
        return tuple(ConfigObject(ENDPOINT_HEALTH, HEALTH_NAMESPACE, node,
                                  json.dumps({"unhealthy": sorted([a, p, s] for a, p, s in keys)},
                                             separators=(",", ":")))
                     for node, keys in sorted(self._by_node.items()))

    def describe(self) -> dict[str, list[str]]:
        return {node: sorted(f"{s} {a}:{p}" for a, p, s in keys) for node, keys in sorted(self._by_node.items())}


def _addresses_on(model: MeshModel | None, node: str) -> set[str]:
    if model is None:
        return set()
    return {w.spec_view["address"] for w in model.workloads if w.spec_view.get("node") == node}
