"""Endpoint health reported by the agents, carried to every agent in the snapshots.

Each agent probes the endpoints of its own node (TrafficPolicy ``healthCheck``,
``nodeagent/healthcheck.py``) and sends the set it finds unhealthy on its discovery stream
(``HealthReport``): once after a new stream's first update when the set is not empty, then
on every change. ``HealthStore`` (no I/O) keeps the latest set per node and turns the sets
into config objects ``EndpointHealth hostmesh-system/<node>`` (spec ``{"unhealthy":
[[address, port, "ns/service"], ...]}``) that the builder adds to every snapshot. The agents'
balancers skip those endpoints (with a panic threshold, ``nodeagent/proxy/l7/lb.py``).

Where a node's set comes from:

* **local**: the agent is connected to this replica. The report stands while the stream
  that carried it is open, and for ``disconnect_grace`` (30 s) after it ends, so an agent
  restart (hand-off) or a failover to another replica does not flap the endpoints back to
  healthy. After the grace it is dropped (fail open, as Envoy treats a host without health
  information): an agent that still has unhealthy endpoints resends them as soon as its new
  stream is up, so a connected agent that has not reported on its current stream has none.
* **etcd** (``controlplane/healthsync.py``): with several replicas, each one writes its
  agents' reports to etcd and reads everyone's back; ``set_shared`` feeds those here.

Merge, per node: a report on an open local stream wins (this replica talks to the agent
now); else another replica's etcd entry (it overwrote ours, so it is newer); else a local
report within its grace; else this replica's own etcd entry (written by a previous process
of the same name, gone when its lease expires).

Validation: a local report keeps only addresses of Workloads the model places on the
reporting node (a node cannot mark another node's endpoints down), and every set is checked
again against the current model when the objects are made (``config_objects(model)``): an
address that is not a Workload on that node, or a Service that does not exist, is ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from controlplane.model.objects import MeshModel
from nodeagent.state import ENDPOINT_HEALTH, HEALTH_NAMESPACE, ConfigObject, unhealthy_endpoints

__all__ = ["DEFAULT_DISCONNECT_GRACE", "ENDPOINT_HEALTH", "HEALTH_NAMESPACE", "HealthStore", "LocalReport",
           "SharedReport", "unhealthy_endpoints"]

MAX_REPORTED = 65536  # endpoints per node report
#: how long a report outlives the agent stream that carried it: the default time a health
#: check takes to find an endpoint down again (unhealthyThreshold 3 x interval 10 s)
DEFAULT_DISCONNECT_GRACE = 30.0

EndpointKey = tuple[str, int, str]


@dataclass(frozen=True, slots=True)
class LocalReport:
    """A report from an agent connected to this replica."""

    keys: frozenset[EndpointKey]
    stream: int                    # the discovery stream that carried it
    received_at: float             # wall clock (written to etcd, shown in /debug/health)
    ended_at: float | None = None  # monotonic: when that stream ended (the grace runs from here)

    @property
    def live(self) -> bool:
        return self.ended_at is None


@dataclass(frozen=True, slots=True)
class SharedReport:
    """A node's entry in etcd, as some replica wrote it (``controlplane/healthsync.py``)."""

    keys: frozenset[EndpointKey]
    replica: str
    reported_at: str   # as the writing replica stamped it (ISO 8601, for people)
    revision: int      # its etcd mod revision


class HealthStore:
    """node -> the endpoints (address, port, "ns/service") reported unhealthy: health is per
    Service (the same pod may pass one Service's check and fail another's).

    ``version`` goes up whenever the merged view changes: callers compare it to know whether
    to publish new snapshots."""

    def __init__(self, replica: str = "", *, disconnect_grace: float = DEFAULT_DISCONNECT_GRACE,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        if disconnect_grace < 0:
            raise ValueError("the health report grace must not be negative")
        self.replica = replica   # this replica's name in etcd entries ("" without etcd)
        self.disconnect_grace = disconnect_grace
        self.clock = clock
        self.wall = wall
        self.version = 0
        self.published_endpoints = 0   # endpoints in the last config_objects() (a gauge reads it)
        self._local: dict[str, LocalReport] = {}
        self._shared: dict[str, SharedReport] = {}
        self._merged: dict[str, frozenset[EndpointKey]] = {}
        self._memo: tuple[MeshModel | None, int, tuple[ConfigObject, ...]] | None = None

    # ------------------------------------------------------------------ local reports
    def report(self, node: str, unhealthy: Iterable[EndpointKey], model: MeshModel | None, *,
               stream: int = 0) -> bool:
        """Record ``node``'s report, carried by discovery stream ``stream``; True when the
        merged view changed. Endpoints whose address is not a Workload on ``node`` are
        dropped (and so is a report past ``MAX_REPORTED``)."""
        local = _addresses_by_node(model).get(node, frozenset())
        keys = frozenset((a, int(p), str(s)) for a, p, s in list(unhealthy)[:MAX_REPORTED]
                         if a in local and 0 < int(p) < 65536)
        self._local[node] = LocalReport(keys, stream, self.wall())
        return self._remerge(node)

    def stream_ended(self, node: str, stream: int) -> bool:
        """Discovery stream ``stream`` of ``node`` closed: if it carried the node's report, the
        grace starts. True when the merged view changed (another replica's entry now wins)."""
        rep = self._local.get(node)
        if rep is None or rep.stream != stream or not rep.live:
            return False
        self._local[node] = replace(rep, ended_at=self.clock())
        return self._remerge(node)

    def expire(self) -> list[str]:
        """Drop the local reports whose stream ended more than the grace ago; returns their nodes."""
        now = self.clock()
        gone = [n for n, r in self._local.items()
                if r.ended_at is not None and now - r.ended_at >= self.disconnect_grace]
        for node in gone:
            del self._local[node]
            self._remerge(node)
        return gone

    def local(self, node: str) -> LocalReport | None:
        return self._local.get(node)

    def local_nodes(self) -> list[str]:
        return sorted(self._local)

    # ------------------------------------------------------------------ etcd entries
    def set_shared(self, node: str, report: SharedReport | None) -> bool:
        """A node's etcd entry (None: deleted); True when the merged view changed."""
        if report is None:
            if self._shared.pop(node, None) is None:
                return False
        else:
            self._shared[node] = report
        return self._remerge(node)

    def replace_shared(self, reports: dict[str, SharedReport]) -> bool:
        """Every etcd entry at once (a fresh list of the prefix)."""
        nodes = set(self._shared) | set(reports)
        self._shared = dict(reports)
        changed = False
        for node in nodes:
            changed = self._remerge(node) or changed
        return changed

    def shared(self, node: str) -> SharedReport | None:
        return self._shared.get(node)

    def shared_count(self) -> int:
        return len(self._shared)

    # ------------------------------------------------------------------ the merged view
    def _pick(self, node: str) -> tuple[frozenset[EndpointKey], str]:
        """(the node's set, where it came from: "local", "etcd" or "")."""
        local, shared = self._local.get(node), self._shared.get(node)
        if local is not None and local.live:
            return local.keys, "local"
        if shared is not None and (shared.replica != self.replica or local is None):
            return shared.keys, "etcd"
        if local is not None:
            return local.keys, "local"
        return frozenset(), ""

    def _remerge(self, node: str) -> bool:
        keys, _ = self._pick(node)
        if self._merged.get(node, frozenset()) == keys:
            return False
        if keys:
            self._merged[node] = keys
        else:
            self._merged.pop(node, None)
        self.version += 1
        return True

    def unhealthy(self, node: str) -> frozenset[EndpointKey]:
        return self._merged.get(node, frozenset())

    def config_objects(self, model: MeshModel | None = None) -> tuple[ConfigObject, ...]:
        """The ``EndpointHealth`` objects of every node with unhealthy endpoints, sorted. With
        ``model``, only endpoints it still has: addresses of Workloads on that node, of
        Services that exist."""
        memo = self._memo
        if memo is not None and memo[0] is model and memo[1] == self.version:
            return memo[2]
        by_node = _addresses_by_node(model) if model is not None else None
        services = {f"{s.namespace}/{s.name}" for s in model.services} if model is not None else None
        out, total = [], 0
        for node, keys in sorted(self._merged.items()):
            if by_node is not None:
                local = by_node.get(node, frozenset())
                keys = frozenset(k for k in keys if k[0] in local and k[2] in services)
            if not keys:
                continue
            total += len(keys)
            out.append(ConfigObject(ENDPOINT_HEALTH, HEALTH_NAMESPACE, node,
                                    json.dumps({"unhealthy": sorted([a, p, s] for a, p, s in keys)},
                                               separators=(",", ":"))))
        objects = tuple(out)
        self._memo = (model, self.version, objects)
        self.published_endpoints = total
        return objects

    def counts(self) -> dict[str, int]:
        """Reports held, by source: local (agents of this replica, in the grace too) and etcd
        (entries other replicas wrote)."""
        return {"local": len(self._local),
                "etcd": sum(1 for r in self._shared.values() if r.replica != self.replica)}

    def describe(self) -> dict[str, list[str]]:
        return {node: sorted(f"{s} {a}:{p}" for a, p, s in keys) for node, keys in sorted(self._merged.items())}

    def describe_sources(self) -> dict[str, dict]:
        """Per node: the merged set, where it came from, and both inputs (``/debug/health?detail=1``)."""
        now = self.clock()
        out = {}
        for node in sorted(set(self._local) | set(self._shared)):
            keys, source = self._pick(node)
            entry: dict = {"unhealthy": sorted(f"{s} {a}:{p}" for a, p, s in keys), "source": source or None}
            if (rep := self._local.get(node)) is not None:
                entry["local"] = {"stream": rep.stream, "receivedAt": iso(rep.received_at), "connected": rep.live,
                                  "count": len(rep.keys)}
                if not rep.live:
                    entry["local"]["expiresIn"] = round(max(0.0, rep.ended_at + self.disconnect_grace - now), 1)
            if (sh := self._shared.get(node)) is not None:
                entry["etcd"] = {"replica": sh.replica, "reportedAt": sh.reported_at, "revision": sh.revision,
                                 "count": len(sh.keys)}
            out[node] = entry
        return out


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _addresses_by_node(model: MeshModel | None) -> dict[str, frozenset[str]]:
    if model is None:
        return {}
    out: dict[str, set[str]] = {}
    for w in model.workloads:
        node, address = w.spec_view.get("node"), w.spec_view.get("address")
        if node and address:
            out.setdefault(node, set()).add(address)
    return {n: frozenset(a) for n, a in out.items()}
