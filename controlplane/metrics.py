"""hostmesh_controlplane_* metrics of the snapshot cache and the discovery server.

Registered on an injected ``CollectorRegistry`` (never the global one), so the process,
tests and benchmarks each expose exactly what they created:

``hostmesh_controlplane_agents_connected``        gauge, open agent streams
``hostmesh_controlplane_pushes_total``            updates sent to agents
``hostmesh_controlplane_push_bytes_total``        bytes of those updates (serialized)
``hostmesh_controlplane_push_latency_seconds``    histogram: snapshot published (or agent
                                                  connected, if later) -> agent ACKed it
``hostmesh_controlplane_nacks_total``             updates agents rejected
``hostmesh_controlplane_snapshot_rejections_total`` snapshots the consistency check refused
                                                  (the previous one stays published)
``hostmesh_controlplane_snapshots_published_total`` node snapshots accepted into the cache
``hostmesh_controlplane_certificate_requests_total{result}`` Sign calls by outcome: issued,
                                                  unauthenticated, denied (node authorizer),
                                                  invalid (bad CSR/request), unavailable
``hostmesh_controlplane_authentication_failures_total{rpc}`` calls refused for missing or
                                                  wrong node credentials (sign, discovery)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PUSH_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ControlPlaneMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.agents_connected = Gauge("hostmesh_controlplane_agents_connected",
                                      "Agent discovery streams currently open", registry=r)
        self.pushes = Counter("hostmesh_controlplane_pushes", "Snapshot updates sent to agents", registry=r)
        self.push_bytes = Counter("hostmesh_controlplane_push_bytes",
                                  "Bytes of snapshot updates sent to agents (serialized messages)", registry=r)
        self.push_latency = Histogram("hostmesh_controlplane_push_latency_seconds",
                                      "Time from a snapshot being published (or the agent connecting, "
                                      "if later) to the agent ACKing it", buckets=PUSH_LATENCY_BUCKETS,
                                      registry=r)
        self.nacks = Counter("hostmesh_controlplane_nacks", "Snapshot updates rejected by agents", registry=r)
        self.snapshot_rejections = Counter("hostmesh_controlplane_snapshot_rejections",
                                           "Snapshots refused by the consistency check (previous kept)",
                                           registry=r)
        self.snapshots_published = Counter("hostmesh_controlplane_snapshots_published",
                                           "Node snapshots accepted into the cache", registry=r)
        self.certificate_requests = Counter("hostmesh_controlplane_certificate_requests",
                                            "Certificate signing requests by result (issued, unauthenticated, "
                                            "denied, invalid, unavailable)", ["result"], registry=r)
        self.authentication_failures = Counter("hostmesh_controlplane_authentication_failures",
                                               "Agent calls refused for missing or invalid node credentials",
                                               ["rpc"], registry=r)
