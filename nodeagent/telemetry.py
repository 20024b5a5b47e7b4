"""Prometheus metrics of the node agent's data plane, on an injected registry.

Nothing here touches the global ``prometheus_client.REGISTRY``: the agent (or a test)
creates a registry (``MetricsRegistry``: no ``*_created`` series) and passes it in, so
several agents or tests can live in one process and the admin endpoint exposes exactly
what it was given.

TCP metrics (Istio's names with the ``hostmesh_`` prefix, Istio's label names):

``hostmesh_tcp_connections_opened_total``, ``hostmesh_tcp_connections_closed_total``,
``hostmesh_tcp_sent_bytes_total``, ``hostmesh_tcp_received_bytes_total`` with labels
``TCP_LABEL_NAMES``: ``reporter``, ``source_workload``, ``source_workload_namespace``,
``source_principal``, ``source_app``, ``source_version``, ``source_canonical_service``,
``source_canonical_revision``, ``source_cluster``, ``destination_service``,
``destination_service_name``, ``destination_service_namespace``, ``destination_workload``,
``destination_workload_namespace``, ``destination_principal``, ``destination_app``,
``destination_version``, ``destination_canonical_service``,
``destination_canonical_revision``, ``destination_cluster``, ``request_protocol``,
``connection_security_policy``, ``response_flags`` (the HTTP request metrics add
``response_code`` and ``grpc_response_status``: ``nodeagent.proxy.l7.metrics``).

* ``*_app``, ``*_version``, ``*_canonical_*`` come from the Workload's labels, as Istio
  derives them (``workload_labels``): app = ``app``, else ``app.kubernetes.io/name``;
  version = ``version``, else ``app.kubernetes.io/version``; canonical service =
  ``service.istio.io/canonical-name``, else ``app.kubernetes.io/name``, else ``app``,
  else the workload name; canonical revision = ``service.istio.io/canonical-revision``,
  else ``app.kubernetes.io/version``, else ``version``, else ``latest``. ``*_cluster`` is
  ``CLUSTER`` for a workload the mesh knows.
* Cardinality is bounded by the config: no label carries an address, a port or a path
  (an unknown destination is ``unknown``, never its IP).
* ``reporter`` is Istio's: ``source`` for connections seen by the outbound listener (the
  proxy on the client's node), ``destination`` for the inbound listener (the proxy on
  the server's node). A connection between two nodes is therefore counted twice, once
  per reporter, exactly as Istio does; dashboards pick one reporter.
* ``sent`` / ``received`` follow Istio: *received* = bytes received from the downstream
  client (the request direction), *sent* = bytes sent to the downstream client (the
  response direction).
* Unknown values are ``unknown``; principals are ``unknown`` on plaintext connections
  (``connection_security_policy="none"``).
* ``response_flags`` are Envoy's: ``-`` (none), ``UF`` upstream connection failure
  (refused, unreachable or connect timeout, as Envoy's tcp_proxy), ``UH`` no healthy
  upstream, ``NR`` no route (unknown destination refused, inbound to a non-local
  address), ``UC`` upstream connection termination (reset), ``DC`` downstream
  connection termination (reset). ``opened`` carries the flags known at accept time
  (``-`` or the refusal flag); ``closed`` and the byte counters carry the final flags.
  Bytes of long connections are flushed periodically with the flags known then.

Agent internals: ``hostmesh_agent_tcp_connections_active{direction}`` (a gauge read from
the listeners on scrape, no per-connection cost), ``hostmesh_agent_connections_rejected_total
{direction,reason}`` (connections closed right after accept: ``connection_limit``,
``draining``, ``no_original_destination``, ``proxy_loop``, and the refusal reasons
``no_route``, ``no_healthy_upstream``, ``not_local_workload``) and
``hostmesh_agent_connections_terminated_total{direction,reason}`` (connections the
proxy ended: ``connect_timeout``, ``connect_refused``, ``connect_error``,
``idle_timeout``, ``upstream_reset``, ``downstream_reset``, ``drain``).
``LoopLag`` keeps ``hostmesh_agent_event_loop_lag_seconds`` (how late a periodic timer
of the event loop ran: the worst over the last 10 s).

mTLS tunnel (``nodeagent.proxy.tunnel``): tunnelled connections carry
``source_principal``/``destination_principal`` (SPIFFE IDs) and
``connection_security_policy="mutual_tls"``; plaintext ones ``none``.
``hostmesh_agent_tunnel_handshakes_total{direction,result}`` counts full TLS handshakes
(``ok``, ``failed``, ``identity_mismatch`` — the server presented another identity —,
``client_rejected`` — a client certificate that is no mesh leaf), and
``hostmesh_agent_tunnel_streams_total{direction,connection}`` the tunnelled connections
by ``new`` or ``reused`` TLS connection; ``hostmesh_agent_tunnel_pool_idle`` is the number
of idle pooled connections. More rejection reasons: ``no_client_certificate``,
``no_server_certificate``, ``no_identity``, ``mtls_required`` (STRICT refused plaintext,
flag ``NR`` as Envoy reports a connection no filter chain accepts),
``identity_mismatch``, ``authz_denied`` (an AuthorizationPolicy denied the connection,
flag ``RBAC``); termination reasons ``tls_handshake_failed``,
``tls_identity_mismatch``, ``tunnel_peer_connect_failed``, ``tunnel_peer_refused``,
``tunnel_protocol_error``.

AuthorizationPolicy (``nodeagent.proxy.authz``):
``hostmesh_agent_authz_decisions_total{direction,action,result,policy}`` counts the
decisions on connections where at least one policy applied: ``action`` of the deciding
policy (``ALLOW``, ``DENY``, or ``NONE`` for an allow with only AUDIT policies), ``result``
``allow``/``deny``, ``policy`` its ``namespace/name`` (``-`` when the denial came from
several ALLOW policies none of which matched).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import Metric

if TYPE_CHECKING:  # pragma: no cover
    from nodeagent.state import Workload

UNKNOWN = "unknown"
NO_FLAGS = "-"
# the ``source_cluster``/``destination_cluster`` of mesh workloads: Istio's default cluster ID
# (istiod's CLUSTER_ID), so Kiali's single-cluster views find their home cluster
CLUSTER = "Kubernetes"
# the canonical revision of a workload without any version label (Istio's default)
LATEST = "latest"


class TcpLabels(NamedTuple):
    """The label values of one connection decision, everything but ``response_flags``.

    Computed once per connection (see ``nodeagent.proxy.destinations.connection_labels``);
    hashable, so it keys the per-series cache below. The field names are the exposed label
    names (Istio's).
    """

    reporter: str
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    connection_security_policy: str = "none"


TCP_LABEL_NAMES: tuple[str, ...] = TcpLabels._fields + ("response_flags",)


class WorkloadLabels(NamedTuple):
    """What Istio derives from a workload's labels (the ``source_*``/``destination_*`` values)."""

    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN


NO_WORKLOAD = WorkloadLabels()
_CANONICAL_NAME = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
_APP = ("app", "app.kubernetes.io/name")
_VERSION = ("version", "app.kubernetes.io/version")
_CACHE_ATTR = "_telemetry_labels"


def workload_labels(workload: "Workload | None", name: str = UNKNOWN) -> WorkloadLabels:
    """The derived labels of ``workload``; without one, of a workload known only by ``name``
    (an endpoint naming it): canonical service = the name, revision ``latest``.

    Memoized on the (immutable) Workload object, as ``NodeSnapshot`` memoizes its indexes:
    a new snapshot brings new objects, so the memo never outlives the labels it read.
    """
    if workload is None:
        return NO_WORKLOAD if name == UNKNOWN else WorkloadLabels(canonical_service=name, canonical_revision=LATEST)
    memo = workload.__dict__.get(_CACHE_ATTR)
    if memo is None:
        labels = dict(workload.labels)
        memo = WorkloadLabels(
            app=_first(labels, _APP, UNKNOWN),
            version=_first(labels, _VERSION, UNKNOWN),
            canonical_service=_first(labels, _CANONICAL_NAME, workload.name),
            canonical_revision=_first(labels, _CANONICAL_REVISION, LATEST),
        )
        object.__setattr__(workload, _CACHE_ATTR, memo)
    return memo


def _first(labels: dict[str, str], keys: tuple[str, ...], default: str) -> str:
    for key in keys:
        value = labels.get(key)
        if value:
            return value
    return default


def source_fields(workload: "Workload | None", name: str = UNKNOWN, namespace: str = UNKNOWN) -> dict[str, str]:
    """The ``source_*`` labels (but the principal) of a client ``workload``, for ``_replace``;
    without one, of a client known by ``name``/``namespace`` only (or not at all)."""
    if workload is not None:
        name, namespace = workload.name, workload.namespace
    w = workload_labels(workload, name)
    return {"source_workload": name, "source_workload_namespace": namespace, "source_app": w.app,
            "source_version": w.version, "source_canonical_service": w.canonical_service,
            "source_canonical_revision": w.canonical_revision,
            "source_cluster": CLUSTER if name != UNKNOWN else UNKNOWN}


def destination_workload_fields(workload: "Workload | None", name: str = UNKNOWN,
                                namespace: str = UNKNOWN) -> dict[str, str]:
    """The ``destination_workload*``, app, version, canonical and cluster labels (not the
    service ones, not the principal) of a server ``workload``, for ``_replace``."""
    if workload is not None and name == UNKNOWN:
        name, namespace = workload.name, workload.namespace
    w = workload_labels(workload, name)
    return {"destination_workload": name, "destination_workload_namespace": namespace,
            "destination_app": w.app, "destination_version": w.version,
            "destination_canonical_service": w.canonical_service,
            "destination_canonical_revision": w.canonical_revision,
            "destination_cluster": CLUSTER if name != UNKNOWN else UNKNOWN}


class MetricsRegistry(CollectorRegistry):
    """hostmesh's registries (the agent's, the workers', the control plane's): what they
    collect, without the ``*_created`` samples.

    prometheus_client adds ``<name>_created`` to every counter and histogram child unless a
    process-wide switch (``disable_created_metrics()``, ``PROMETHEUS_DISABLE_CREATED_SERIES``)
    is flipped; a registry of our own drops them instead, so nothing global changes and a
    test's registries behave as the agent's. (They double the series count for nothing:
    Prometheus's text-format parser keeps them as gauges, and Istio has none.)
    """

    def collect(self):
        for metric in super().collect():
            yield without_created(metric)


def without_created(metric: Metric) -> Metric:
    """``metric`` itself when it has no ``_created`` sample, else a copy without them."""
    samples = [s for s in metric.samples if not s.name.endswith("_created")]
    if len(samples) == len(metric.samples):
        return metric
    out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
    out.samples = samples
    return out


class TcpSeries:
    """The four counter children of one (labels, response_flags) combination."""

    __slots__ = ("opened", "closed", "sent_bytes", "received_bytes")

    def __init__(self, opened, closed, sent_bytes, received_bytes) -> None:
        self.opened = opened
        self.closed = closed
        self.sent_bytes = sent_bytes
        self.received_bytes = received_bytes


class ProxyMetrics:
    """All data-plane metrics, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        names = TCP_LABEL_NAMES
        self.tcp_connections_opened = Counter(
            "hostmesh_tcp_connections_opened", "TCP connections opened through the proxy.",
            names, registry=registry)
        self.tcp_connections_closed = Counter(
            "hostmesh_tcp_connections_closed", "TCP connections closed through the proxy.",
            names, registry=registry)
        self.tcp_sent_bytes = Counter(
            "hostmesh_tcp_sent_bytes", "Bytes sent to the downstream client (response direction).",
            names, registry=registry)
        self.tcp_received_bytes = Counter(
            "hostmesh_tcp_received_bytes", "Bytes received from the downstream client (request direction).",
            names, registry=registry)
        self.connections_active = Gauge(
            "hostmesh_agent_tcp_connections_active", "Connections currently held by a proxy listener.",
            ["direction"], registry=registry)
        self.connections_rejected = Counter(
            "hostmesh_agent_connections_rejected", "Connections closed right after accept, by reason.",
            ["direction", "reason"], registry=registry)
        self.connections_terminated = Counter(
            "hostmesh_agent_connections_terminated", "Relayed connections ended by the proxy, by reason.",
            ["direction", "reason"], registry=registry)
        self.tunnel_handshakes = Counter(
            "hostmesh_agent_tunnel_handshakes", "Full TLS handshakes of the node-to-node tunnel, by result.",
            ["direction", "result"], registry=registry)
        self.tunnel_streams = Counter(
            "hostmesh_agent_tunnel_streams", "Connections carried by the tunnel, on a new or a reused TLS connection.",
            ["direction", "connection"], registry=registry)
        self.tunnel_pool_idle = Gauge(
            "hostmesh_agent_tunnel_pool_idle", "Idle pooled tunnel connections (source node).", registry=registry)
        self._series: dict[tuple[TcpLabels, str], TcpSeries] = {}
        self.authz_decisions = Counter(
            "hostmesh_agent_authz_decisions_total",
            "AuthorizationPolicy decisions on connections where a policy applied, by the deciding policy.",
            ["direction", "action", "result", "policy"], registry=registry)
        self._reasons: dict[tuple[Counter, str, str], object] = {}
        self._authz: dict[tuple[str, str, str, str], object] = {}

    def tcp(self, labels: TcpLabels, response_flags: str = NO_FLAGS) -> TcpSeries:
        """The counter children for one connection's labels (cached: one dict lookup)."""
        key = (labels, response_flags)
        series = self._series.get(key)
        if series is None:
            values = (*labels, response_flags)
            series = TcpSeries(
                self.tcp_connections_opened.labels(*values),
                self.tcp_connections_closed.labels(*values),
                self.tcp_sent_bytes.labels(*values),
                self.tcp_received_bytes.labels(*values),
            )
            self._series[key] = series
        return series

    def rejected(self, direction: str, reason: str) -> None:
        self._reason_child(self.connections_rejected, direction, reason).inc()

    def terminated(self, direction: str, reason: str) -> None:
        self._reason_child(self.connections_terminated, direction, reason).inc()

    def authz_decision(self, direction: str, decision) -> None:
        """``decision``: an ``authz.AuthzDecision``; the policy label is bounded by the policies."""
        key = (direction, decision.action or "NONE", decision.metric_result, decision.policy or "-")
        child = self._authz.get(key)
        if child is None:
            child = self._authz[key] = self.authz_decisions.labels(*key)
        child.inc()

    def tunnel_handshake(self, direction: str, result: str) -> None:
        self._reason_child(self.tunnel_handshakes, direction, result).inc()

    def tunnel_stream(self, direction: str, reused: bool) -> None:
        self._reason_child(self.tunnel_streams, direction, "reused" if reused else "new").inc()

    def track_tunnel_idle(self, count: Callable[[], int]) -> None:
        self.tunnel_pool_idle.set_function(count)

    def track_active(self, direction: str, count: Callable[[], int]) -> None:
        """Read the active-connection gauge from ``count()`` at scrape time."""
        self.connections_active.labels(direction).set_function(count)

    def _reason_child(self, counter: Counter, direction: str, reason: str):
        key = (counter, direction, reason)
        child = self._reasons.get(key)
        if child is None:
            child = self._reasons[key] = counter.labels(direction, reason)
        return child


class LoopLag:
    """``hostmesh_agent_event_loop_lag_seconds``: how late a periodic timer of the event loop
    fires, the worst over the last ``window`` seconds.

    A loop busy with a long callback (a blocking call, a big snapshot parse) delays every
    connection it serves by as much; this timer is delayed by the same amount, at the cost of
    one wake-up per ``interval``. The worst of two half-windows is kept, so a spike stays
    visible for at least half a window whatever the scrape interval.
    """

    def __init__(self, registry: CollectorRegistry, *, interval: float = 0.25, window: float = 10.0) -> None:
        self.interval = interval
        self._ticks = max(1, round(window / interval / 2))  # ticks per half-window
        self._current = self._previous = 0.0
        self._count = 0
        Gauge("hostmesh_agent_event_loop_lag_seconds",
              f"How late the event loop ran a {interval:g}s timer: the worst over the last {window:g}s "
              "(with worker processes, the worst of the agent's and the workers' loops).",
              registry=registry).set_function(self.value)

    def value(self) -> float:
        return max(self._current, self._previous)

    def observe(self, late: float) -> None:
        if late > self._current:
            self._current = late
        self._count += 1
        if self._count >= self._ticks:
            self._previous, self._current, self._count = self._current, 0.0, 0

    async def run(self) -> None:
        """Until cancelled: sleep ``interval``, record how much later than asked it woke."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.observe(max(0.0, loop.time() - due))
