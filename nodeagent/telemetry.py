"""Prometheus metrics of the node agent's data plane, on an injected registry.

Nothing here touches the global ``prometheus_client.REGISTRY``: the agent (or a test)
creates a ``CollectorRegistry`` and passes it in, so several agents or tests can live in
one process and the admin endpoint exposes exactly what it was given.

TCP metrics (Istio's names with the ``hostmesh_`` prefix, ARCHITECTURE.md labels):

``hostmesh_tcp_connections_opened_total``, ``hostmesh_tcp_connections_closed_total``,
``hostmesh_tcp_sent_bytes_total``, ``hostmesh_tcp_received_bytes_total`` with labels
``reporter, source_workload, source_namespace, source_principal, destination_service,
destination_workload, destination_namespace, destination_principal, request_protocol,
response_flags, connection_security_policy``.

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

from typing import Callable, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge

UNKNOWN = "unknown"
NO_FLAGS = "-"


class TcpLabels(NamedTuple):
    """The label values of one connection decision, everything but ``response_flags``.

    Computed once per connection (see ``nodeagent.proxy.destinations.connection_labels``);
    hashable, so it keys the per-series cache below.
    """

    reporter: str
    source_workload: str = UNKNOWN
    source_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    request_protocol: str = "tcp"
    connection_security_policy: str = "none"


TCP_LABEL_NAMES: tuple[str, ...] = TcpLabels._fields + ("response_flags",)


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
