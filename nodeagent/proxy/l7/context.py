"""What an L7 driver needs, passed in: limits, per-proxy inputs, per-connection context.

* ``L7Limits`` — every limit an attacker or a slow peer could push, with safe defaults.
* ``RouteTables`` — the compiled ``RouteTable`` of the current snapshot, built once per
  snapshot object (snapshots are immutable; identity is the cache key) and the upstream
  pool limits of each backend (TrafficPolicy ``connectionPool``). Keeps ``LbState`` in step.
* ``L7Inputs`` — one per proxy (shared by the connections of all listeners of one loop):
  route tables, LB state, the upstream pools (HTTP/1.1 ``pool``, HTTP/2 ``h2pool``),
  metrics, limits.
* ``ConnContext`` — one per accepted connection: where it was going, who sent it, the
  metric labels, the router of its destination and the callback that reports completion.

No module-level mutable state; nothing here does I/O.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from nodeagent.proxy.l7.headers import RequestIds
from nodeagent.proxy.l7.lb import LbState
from nodeagent.proxy.l7.metrics import UNKNOWN, HttpLabels, HttpMetrics, http_labels
from nodeagent.proxy.l7.resilience import DestinationPolicy, DestinationState, ResilienceState
from nodeagent.proxy.l7.routing import Backend, RouteTable, ServiceRouter, parse_duration
from nodeagent.state import Endpoint, NodeSnapshot

if TYPE_CHECKING:  # pragma: no cover
    from nodeagent.proxy.l7.pool import UpstreamPool


@dataclass(frozen=True)
class L7Limits:
    """Limits of the HTTP drivers (seconds and bytes); each has a safe default."""

    header_timeout: float = 10.0  # a request head must arrive within this (slowloris)
    idle_timeout: float = 300.0  # keep-alive: close a client connection idle this long
    stream_idle_timeout: float = 300.0  # a request (or upgraded connection) with no bytes either way
    write_buffer_high: int = 256 * 1024  # per transport; low water = high / 4
    connect_timeout: float = 5.0  # upstream connect (TrafficPolicy connectionPool.connectTimeout wins)
    pool_idle_timeout: float = 60.0  # close pooled upstream connections unused this long
    max_connections_per_endpoint: int = 1024  # TrafficPolicy connectionPool.maxConnections wins
    max_pending_per_endpoint: int = 1024  # queued requests when all connections are busy
    mirror_timeout: float = 30.0  # a mirrored request is abandoned after this
    mirror_buffer: int = 256 * 1024  # request bytes held for a mirror still connecting
    socket_mark: int = 0  # SO_MARK on upstream sockets (0: not set)
    # this process's share of each local rate limit: 1 / the worker processes sharing the
    # listeners (SO_REUSEPORT spreads connections about evenly), so the node keeps the rate
    rate_limit_share: float = 1.0

    def __post_init__(self) -> None:
        for name in ("header_timeout", "connect_timeout", "pool_idle_timeout", "mirror_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"L7Limits.{name}: must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.rate_limit_share <= 1:
            raise ValueError(f"L7Limits.rate_limit_share: must be in (0, 1], got {self.rate_limit_share!r}")
        for name in ("idle_timeout", "stream_idle_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"L7Limits.{name}: must be >= 0 (0 disables), got {getattr(self, name)!r}")
        for name in ("write_buffer_high", "max_connections_per_endpoint", "max_pending_per_endpoint",
                     "mirror_buffer"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"L7Limits.{name}: must be >= 1, got {getattr(self, name)!r}")

    @property
    def write_buffer_low(self) -> int:
        return self.write_buffer_high // 4


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """Upstream pool limits of one endpoint."""

    max_connections: int = 1024
    max_pending: int = 1024
    max_requests_per_connection: int = 0  # 0: unlimited
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0


def pool_limits(policy: Any, limits: L7Limits) -> PoolLimits:
    """``PoolLimits`` from a TrafficPolicy spec's ``connectionPool`` (``limits`` as defaults)."""
    cp = (policy or {}).get("connectionPool") or {}
    timeout = limits.connect_timeout
    if cp.get("connectTimeout") is not None:
        try:
            timeout = parse_duration(cp["connectTimeout"]) or timeout
        except ValueError:
            pass  # the control plane validated it; a bad value keeps the default
    return PoolLimits(
        max_connections=int(cp.get("maxConnections") or limits.max_connections_per_endpoint),
        max_pending=int(cp.get("maxPendingRequests") or limits.max_pending_per_endpoint),
        max_requests_per_connection=int(cp.get("maxRequestsPerConnection") or 0),
        connect_timeout=timeout,
        idle_timeout=limits.pool_idle_timeout,
    )


class RouteTables:
    """The route table of the current snapshot, compiled once per snapshot object."""

    __slots__ = ("lb", "limits", "rand", "resilience", "_snapshot", "_table", "_pool_limits", "_default_limits",
                 "_policies")

    def __init__(self, lb: LbState, limits: L7Limits, *, rand: Any = None,
                 resilience: ResilienceState | None = None) -> None:
        self.lb = lb
        self.limits = limits
        self.rand = rand
        self.resilience = resilience if resilience is not None else ResilienceState()
        self._policies: dict[int, tuple[Backend, DestinationState | None]] = {}
        self._snapshot: NodeSnapshot | None = None
        self._table: RouteTable | None = None
        self._pool_limits: dict[int, tuple[Backend, PoolLimits]] = {}
        self._default_limits = pool_limits(None, limits)

    def get(self, snapshot: NodeSnapshot) -> RouteTable:
        if snapshot is self._snapshot and self._table is not None:
            return self._table
        table = RouteTable.from_snapshot(snapshot, rand=self.rand)
        self._snapshot, self._table = snapshot, table
        self._pool_limits = {}
        self._policies = {}
        self.lb.sync(table)
        self.resilience.retain(table.backend_keys())
        return table

    def pool_limits(self, table: RouteTable, backend: Backend) -> PoolLimits:
        """The pool limits of ``backend`` (cached per backend object, i.e. per snapshot)."""
        hit = self._pool_limits.get(id(backend))
        if hit is not None and hit[0] is backend:
            return hit[1]
        pl = pool_limits(table.traffic_policy(backend.service), self.limits)
        self._pool_limits[id(backend)] = (backend, pl)
        return pl

    def destination(self, table: RouteTable, backend: Backend) -> DestinationState | None:
        """The live resilience state of ``backend`` when its TrafficPolicy has retries, outlier
        detection, a rate limit or request limits; None otherwise (cached per backend object)."""
        hit = self._policies.get(id(backend))
        if hit is not None and hit[0] is backend:
            return hit[1]
        policy = DestinationPolicy.from_traffic_policy(table.traffic_policy(backend.service),
                                                       self.limits.rate_limit_share)
        st = None if policy is None else self.resilience.get(backend.key, policy)
        self._policies[id(backend)] = (backend, st)
        return st

    def default_pool_limits(self) -> PoolLimits:
        """The pool limits without a TrafficPolicy (from ``limits`` alone: computed once)."""
        return self._default_limits


@dataclass
class L7Inputs:
    """Per-proxy dependencies of the HTTP drivers (one instance per event loop)."""

    node: str
    metrics: HttpMetrics
    pool: "UpstreamPool"
    lb: LbState
    routes: RouteTables
    limits: L7Limits = field(default_factory=L7Limits)
    h2pool: Any = None  # pool_h2.H2Pool: HTTP/2 upstreams (created on first use when None)
    request_ids: Callable[[], bytes] = field(default_factory=RequestIds)  # new x-request-id values
    # uniform draws in [0, 1) for fault percentages and retry jitter (tests pass a seeded one)
    random: Callable[[], float] = field(default_factory=lambda: _random.Random().random)
    # nodeagent.accesslog.AccessLog while the snapshot asks for access log lines, else None
    # (set by AccessLog.attach); the drivers call it as each request finishes
    access_log: Any = None

    @classmethod
    def create(cls, node: str, metrics: HttpMetrics, *, limits: L7Limits | None = None, connector=None,
               partition=None, rand: Any = None) -> "L7Inputs":
        """The usual wiring: a fresh LB state, route-table cache and pools (``connector``: see pool.py;
        ``partition``: see pool_h2.py)."""
        from nodeagent.proxy.l7.pool import UpstreamPool, tcp_connector
        from nodeagent.proxy.l7.pool_h2 import H2Pool
        limits = limits or L7Limits()
        lb = LbState(node, rng=rand)
        connector = connector or tcp_connector
        draw = (rand.random if hasattr(rand, "random") else rand) if rand is not None else _random.Random().random
        return cls(node, metrics, UpstreamPool(connector, limits, partition=partition), lb,
                   RouteTables(lb, limits, rand=rand), limits, H2Pool(connector, limits, partition=partition),
                   random=draw)


@dataclass(slots=True)
class ConnContext:
    """One accepted connection: everything the driver needs to know about it.

    ``table``/``router``: routing for the destination Service port (``router`` None and
    ``endpoint`` set: no routing, forward to ``endpoint`` — the inbound side, or a workload
    address; both None: answer 404 NR). ``labels``: metric labels of the connection
    (``destination_*`` are filled per request from the chosen backend). ``on_done(driver)``
    is called exactly once, when the client connection and every upstream exchange of it
    are finished. ``snapshot``: the snapshot the connection took at accept (the connector
    plans the mTLS tunnel from it). ``secure_labels(ctx, labels, endpoint)``: the labels of
    a request to ``endpoint`` with the principals when it goes through the mTLS tunnel
    (None: no tunnel, plaintext labels). ``gate_for(endpoint)``: the ``RequestGate`` every
    request to that endpoint passes first (``request_policy``: path normalization, JWT,
    request-level AuthorizationPolicy), or None; unset where no request needs one.
    """

    table: RouteTable | None
    router: ServiceRouter | None
    src_ip: str
    dst_ip: str
    dst_port: int
    labels: HttpLabels
    on_done: Callable[[Any], None] = lambda driver: None
    endpoint: Endpoint | None = None
    source_namespace: str = ""
    scheme: bytes = b"http"
    snapshot: NodeSnapshot | None = None
    secure_labels: Callable[["ConnContext", HttpLabels, Endpoint], HttpLabels] | None = None
    gate_for: Callable[[Endpoint], Any] | None = None

    @classmethod
    def for_connection(cls, inputs: L7Inputs, snapshot: NodeSnapshot, *, src_ip: str, dst_ip: str, dst_port: int,
                       reporter: str, on_done: Callable[[Any], None] = lambda driver: None,
                       endpoint: Endpoint | None = None, secure_labels=None) -> "ConnContext":
        """The context of a captured connection to ``dst_ip:dst_port`` from ``src_ip``."""
        table = inputs.routes.get(snapshot)
        router = table.router_for(dst_ip, dst_port)
        src = snapshot.workload_by_ip(src_ip)
        labels = http_labels(reporter, source=src)
        return cls(table, router, src_ip, dst_ip, dst_port, labels, on_done, endpoint,
                   src.namespace if src else "", snapshot=snapshot, secure_labels=secure_labels)
