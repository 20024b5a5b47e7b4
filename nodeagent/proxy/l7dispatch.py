"""L7 on the outbound listener: which connections are detected, and who serves them.

The outbound listener (the client's node, where Istio's ztunnel+waypoint or Cilium's
per-node Envoy make routing decisions) asks ``L7Dispatch.detector`` after its L4 decision.

When detection runs (decided per snapshot, one dict lookup per connection):

* a Service VIP:port whose ``appProtocol`` is HTTP-family (``http``, ``http2``, ``grpc``,
  ... see ``detect.detector_for``) — always, choosing between the HTTP/2 preface and
  HTTP/1.x on the first bytes (never TCP): an HTTP/1.1 client of an ``http2``/``h2c``/
  ``grpc`` port is served by the HTTP/1.1 driver, which speaks HTTP/2 to the upstream
  (Envoy's ``codec_type: AUTO`` in front of an HTTP/2 cluster);
* a Service VIP:port without an ``appProtocol`` that has an HTTPRoute/GRPCRoute attached
  or a TrafficPolicy targeting its Service — auto-detection with the detection timeout
  (``ProxyLimits.detect_timeout``; server-speaks-first protocols get TCP after it);
The same holds for such a VIP whose Service has no endpoint (the L4 decision is a
refusal): HTTP gets the driver's 503 ``UH`` with ``x-hostmesh-flags``, anything else the
refusal (RST).

Everything else — no routes, no policy, ``appProtocol`` tcp/tls/mysql/..., workload
(pod IP) destinations, passthrough destinations, refusals — never enters this module: the listener's L4 path runs exactly as
without L7 and pays no detection delay.
Workload-addressed traffic stays L4 as in Istio ambient (a waypoint serves
service-addressed traffic): GAMMA routes and TrafficPolicies attach to Services, and a
client that dials a pod chose its endpoint itself.

After detection, ``SERVE`` (protocol -> ``serve(transport, first_bytes, ctx, inputs)``)
picks the driver (HTTP/1.x -> ``serve_http1``, HTTP/2 prior knowledge -> ``serve_http2``,
gRPC included); a protocol without an entry (TLS, anything else) goes back to the L4 relay with the bytes read so far forwarded
unchanged (and a half-close seen during detection passed on).

An L7 connection stays in the listener's connection set as its ``Relay`` (``relay.driver``
set): ``relay.abort()`` aborts the driver, listener drain calls ``driver.drain()`` first,
and ``on_done`` records the connection's TCP metrics (opened at hand-over, closed at the
end) and calls ``relay_done``. Bytes (the driver's ``rx``/``tx``) are published every
listener tick while the connection is open, as the L4 relay does, so a long-lived gRPC
stream or WebSocket is not invisible until it closes; one timer per dispatch, not per
connection.

Upstream dials (``connect``, the pool's injected connector): through the mTLS tunnel when
``tunnel_plan`` says the L4 path would tunnel (a pooled tunnel connection, else a new
handshake; one HTTP connection = one tunnel stream), failing closed when the source has no
certificate; plain TCP marked like relay.py otherwise. HTTP connections over tunnel
streams are pooled per client address (``partition``: a stream authenticates its source
workload and carries its address), and an idle one is not reused once its tunnel
connection is past ``tunnel_max_age`` or the source's certificate rotated.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any, Callable

from nodeagent.proxy.destinations import Forward, Refuse
from nodeagent.proxy.l7.context import ConnContext, L7Inputs, L7Limits
from nodeagent.proxy.l7.detect import (_FIXED, _HTTP, HTTP1, HTTP2_PRIOR_KNOWLEDGE, NEED_MORE, OPAQUE, TLS, Detected,
                                       Detector, detector_for)
from nodeagent.proxy.l7.http1_proxy import serve_http1
from nodeagent.proxy.l7.http2_proxy import serve_http2
from nodeagent.proxy.l7.metrics import HttpMetrics
from nodeagent.proxy.authz import AuthzDecision, ConnectionAttrs, authz_epoch
from nodeagent.proxy.jwtauth import RequestAuthn
from nodeagent.proxy.request_policy import RequestGate, RequestPolicy
from nodeagent.proxy.l7.pool import DialContext, UpstreamDenied, dialed_socket, tcp_connector
from nodeagent.proxy.relay import publish_bytes
from nodeagent.proxy.tunnel_plan import TunnelPlan, tunnel_labels
from nodeagent.state import Endpoint, NodeSnapshot
from nodeagent.telemetry import NO_FLAGS, UNKNOWN, TcpLabels

if TYPE_CHECKING:  # pragma: no cover
    from nodeagent.proxy.listener import ProxyListener
    from nodeagent.proxy.relay import Relay
    from nodeagent.proxy.tunnel import TunnelClient

log = logging.getLogger(__name__)

# protocol -> the driver that serves it; protocols without an entry are relayed as TCP
SERVE: dict[Any, Callable] = {HTTP1: serve_http1, HTTP2_PRIOR_KNOWLEDGE: serve_http2}

# appProtocol values that make a port L7 (HTTP/1.x vs HTTP/2 preface detection)
_L7_APP_PROTOCOLS = frozenset(_HTTP) | frozenset(ap for ap, p in _FIXED.items() if p not in (OPAQUE, TLS))

_AUTO = ""  # the mode of a port with routes or a policy but no appProtocol


def admit_local(listener: "ProxyListener", relay: "Relay", snapshot: NodeSnapshot, decision: Forward,
                labels: TcpLabels, peer_ip: str, dst: tuple[str, int], principal: str | None, src_ip: str,
                refuse: Callable[[], None]) -> None:
    """A connection for a workload of this node, from the source the node verified
    (``principal``, ``src_ip``): its AuthorizationPolicies, then relayed, refused
    (``refuse()``, counted as ``authz_denied``), or served as HTTP with every request checked
    (``L7Dispatch.gate_or_forward``; without an L7 side, what needs request checks is refused)."""
    verdict = listener.authz.check(snapshot, decision.workload, principal, src_ip, decision.endpoint.address,
                                   decision.endpoint.port)

    def deny() -> None:
        listener.metrics.rejected(listener.direction, "authz_denied")
        refuse()
    l7 = listener.l7
    if l7 is not None:
        l7.gate_or_forward(relay, snapshot, decision, labels, peer_ip, dst, principal, src_ip, verdict, deny)
    elif verdict.allowed:
        relay.forward(decision.address, labels)
    else:
        deny()


class L7Dispatch:
    """The L7 side of one listener: detection plan (outbound), request-checked connections
    to local workloads (``gate_or_forward``), drivers' inputs, the connector."""

    def __init__(self, listener: "ProxyListener", metrics: HttpMetrics, tunnel: "TunnelClient | None", *,
                 authorize_local: bool = True) -> None:
        self.listener = listener
        self.tunnel = tunnel
        # the outbound side checks same-node destinations' policies when it dials them; the
        # inbound side checked its connections before serving them
        self.authorize_local = authorize_local
        pin = listener.inputs
        self.requests = RequestPolicy(listener.authz, RequestAuthn(pin.jwks_keys), lambda: pin.state.snapshot)
        self._checks_of: tuple[NodeSnapshot | None, bool] = (None, False)
        limits = L7Limits(connect_timeout=pin.limits.connect_timeout, socket_mark=pin.socket_mark,
                          write_buffer_high=pin.limits.write_buffer_high, rate_limit_share=pin.rate_limit_share)
        self.node = pin.node
        self.detect_timeout = pin.limits.detect_timeout
        self.inputs = L7Inputs.create(pin.node, metrics, limits=limits, connector=self.connect,
                                      partition=self.partition)
        metrics.destinations.append(self.inputs.routes.resilience)
        if pin.access_log is not None:
            pin.access_log.attach(self.inputs)
        self._snapshot: NodeSnapshot | None = None
        self._modes: dict[tuple[str, int], str] = {}
        self._served: dict["Relay", Any] = {}  # relay -> its driver, until on_done
        self._epoch_of: tuple[NodeSnapshot | None, int] = (None, 0)  # authz_epoch of the last snapshot asked
        self._flusher: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ when to detect
    def detector(self, snapshot: NodeSnapshot, decision, dst_ip: str, dst_port: int) -> Detector | None:
        """A detector for this connection, or None: the plain L4 path (see the module doc)."""
        t = type(decision)
        if t is not Forward and not (t is Refuse and decision.service is not None):
            return None
        if snapshot is not self._snapshot:
            self._modes = self._plan(snapshot)
            self._snapshot = snapshot
        mode = self._modes.get((dst_ip, dst_port))
        if mode is None:
            return None
        return detector_for(mode, timeout_s=self.detect_timeout)

    def _plan(self, snapshot: NodeSnapshot) -> dict[tuple[str, int], str]:
        table = self.inputs.routes.get(snapshot)
        modes: dict[tuple[str, int], str] = {}
        for svc in snapshot.services:
            policy = table.traffic_policy(svc) is not None or ("Service", svc.namespace, svc.name) in table.faults
            for port in svc.ports:
                ap = port.app_protocol.strip().lower()
                if ap in _L7_APP_PROTOCOLS:
                    modes[(svc.cluster_ip, port.port)] = ap
                    continue
                if ap:  # tcp, tls, mysql, an unknown name: not ours to parse
                    continue
                router = table.routers.get((svc.namespace, svc.name, port.port))
                if policy or (router is not None and (router.producer is not None or router.consumers)):
                    modes[(svc.cluster_ip, port.port)] = _AUTO
        return modes

    # ------------------------------------------------------------------ per connection
    def start(self, relay: "Relay", detector: Detector, snapshot: NodeSnapshot, decision: Forward | Refuse,
              labels: TcpLabels, peer_ip: str, dst: tuple[str, int], gate: RequestGate | None = None,
              fallback: Callable[[], None] | None = None) -> None:
        """Detect (unless the port's appProtocol already decided), then serve or relay.
        With ``gate``: serve to ``decision``'s endpoint, every request through the gate;
        ``fallback()`` takes a connection that is not HTTP."""
        conn = _Conn(self, relay, detector, snapshot, decision, labels, peer_ip, dst, gate, fallback)
        if detector.decision is not None:
            conn.decided(detector.decision, False)
            return
        relay.transport.set_protocol(conn)
        conn.timer = relay.loop.call_later(detector.timeout_s, conn.timed_out)

    def serve(self, conn: "_Conn", serve: Callable, data: bytes, eof: bool) -> None:
        relay = conn.relay
        ctx = ConnContext.for_connection(self.inputs, conn.snapshot, src_ip=conn.peer_ip, dst_ip=conn.dst[0],
                                         dst_port=conn.dst[1], reporter=self.listener.reporter,
                                         on_done=lambda driver: self._done(relay, driver),
                                         secure_labels=self.secure_labels if self.tunnel is not None else None)
        gate = conn.gate
        if gate is not None:  # no routing: the workload the connection was for, each request checked
            ctx.table = ctx.router = None
            ctx.endpoint = conn.decision.endpoint
            ctx.gate_for = lambda endpoint: gate
        elif self._request_checks(conn.snapshot):
            ctx.gate_for = lambda endpoint: self._local_gate(ctx, endpoint)
        # the L4 pick is not where requests go: the driver balances per request (unless gated)
        labels = conn.labels if gate is not None else conn.labels._replace(destination_workload=UNKNOWN)
        relay.labels = labels
        self.listener.metrics.tcp(labels, NO_FLAGS).opened.inc()
        transport = relay.transport
        if not self.listener.nodelay_by_loop:  # uvloop sets it on every TCP transport already
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        relay.driver = driver = serve(transport, data, ctx, self.inputs)
        if not relay.torn_down:  # (a driver may finish at once: a bad first request)
            self._served[relay] = driver
            if self._flusher is None:
                self._flusher = relay.loop.call_later(self.listener.tick_interval, self._flush_bytes)
        if eof and not driver.eof_received():
            transport.close()

    # ------------------------------------------------------------------ request checks
    def gate_or_forward(self, relay: "Relay", snapshot: NodeSnapshot, decision: Forward, labels: TcpLabels,
                        peer_ip: str, dst: tuple[str, int], principal: str | None, src_ip: str,
                        verdict: AuthzDecision, deny: Callable[[], None]) -> None:
        """A connection to a local workload after its AuthorizationPolicy ``verdict``
        (``principal``/``src_ip``: what the node verified of the source): relayed, denied,
        or — when requests must be checked (``request_policy``) — parsed as HTTP."""
        workload = decision.workload
        gate = self.requests.gate(snapshot, workload, ConnectionAttrs(principal, src_ip, decision.endpoint.address,
                                                                      decision.endpoint.port), verdict)
        if gate is None:
            if verdict.allowed:
                relay.authz_key = (decision.endpoint.address, decision.endpoint.port, principal, src_ip)
                relay.forward(decision.address, labels)
            else:
                deny()
            return

        def not_http() -> None:
            if self.requests.fallback(gate, verdict):
                relay.forward(decision.address, labels)
            else:
                deny()
        self.start(relay, detector_for(_AUTO, timeout_s=self.detect_timeout), snapshot, decision, labels, peer_ip,
                   dst, gate, not_http)

    def _request_checks(self, snapshot: NodeSnapshot | None) -> bool:
        """Whether any request to this node's workloads may need a gate (memoized per snapshot):
        an AuthorizationPolicy with request attributes, or a RequestAuthentication."""
        if snapshot is None:
            return False
        if snapshot is not self._checks_of[0]:
            found = (any(c.kind == "RequestAuthentication" for c in snapshot.config)
                     or self.listener.authz.authorizer.uses_request(snapshot))
            self._checks_of = (snapshot, found)
        return self._checks_of[1]

    def _local_gate(self, ctx: ConnContext, endpoint: Endpoint) -> RequestGate | None:
        """The gate of a request routed to a workload of this node (it never passes an
        inbound listener): that workload's checks, for this client."""
        snapshot = ctx.snapshot
        if snapshot is None or endpoint.node != self.node:
            return None
        workload = snapshot.workload_by_ip(endpoint.address)
        if workload is None:
            return None
        authz = self.listener.authz
        principal = authz.local_principal(snapshot, ctx.src_ip)
        conn = ConnectionAttrs(principal, ctx.src_ip, endpoint.address, endpoint.port)
        # not authz.check: the connection's decision was counted when it was dialed
        # (_authorize_local); per request only the gate counts
        return self.requests.gate(snapshot, workload, conn, authz.authorizer.decide(snapshot, workload, conn))

    def _done(self, relay: "Relay", driver) -> None:
        """The driver's on_done: the connection's TCP metrics, then the listener forgets it."""
        if relay.torn_down:
            return
        relay.torn_down = relay.closing = relay.d_lost = True
        self._served.pop(relay, None)
        series = self.listener.metrics.tcp(relay.labels, NO_FLAGS)
        publish_bytes(relay, series, driver.rx, driver.tx)
        series.closed.inc()
        self.listener.relay_done(relay)

    def _flush_bytes(self) -> None:
        """Every tick while L7 connections are open: their TCP byte counters move as the L4
        relay's do, not only when a long-lived connection (gRPC stream, WebSocket) closes."""
        self._flusher = None
        if not self._served:
            return
        metrics = self.listener.metrics
        for relay, driver in list(self._served.items()):
            publish_bytes(relay, metrics.tcp(relay.labels, NO_FLAGS), driver.rx, driver.tx)
        loop = next(iter(self._served)).loop
        self._flusher = loop.call_later(self.listener.tick_interval, self._flush_bytes)

    def secure_labels(self, ctx: ConnContext, labels, endpoint: Endpoint):
        """A request's labels with the principals when its connection to ``endpoint`` is a
        tunnel stream (the connector takes the same decision, from the same snapshot)."""
        snapshot = ctx.snapshot
        if snapshot is None:
            return labels
        plan = self.tunnel.planner.outbound(snapshot, Forward(endpoint, None, snapshot.workload_by_ip(endpoint.address)),
                                            ctx.src_ip)
        return tunnel_labels(labels, plan) if isinstance(plan, TunnelPlan) else labels

    # ------------------------------------------------------------------ upstream dials
    def partition(self, endpoint: Endpoint, ctx: Any) -> str:
        """Pool key part: the client address for mesh workloads (a tunnel connection carries
        the client's identity; a same-node one was authorized for that client), else shared."""
        if ctx is None or not endpoint.node:
            return ""
        return ctx.src_ip

    def _authorize_local(self, ctx: Any, endpoint: Endpoint) -> None:
        """A same-node upstream never passes an inbound listener: its AuthorizationPolicies
        are checked here, for the client the (partitioned) connection will serve."""
        workload = ctx.snapshot.workload_by_ip(endpoint.address)
        if workload is None:
            return
        listener = self.listener
        verdict = listener.authz.check_local_source(ctx.snapshot, workload, ctx.src_ip, endpoint.address,
                                                    endpoint.port)
        if not verdict.allowed and not verdict.needs_request:  # (needs_request: each request is gated)
            listener.metrics.rejected(listener.direction, "authz_denied")
            raise UpstreamDenied()

    async def connect(self, endpoint: Endpoint, dial: DialContext, factory: Callable[[], asyncio.Protocol]):
        """The pool's connector (see ``_connect``). An upstream connection to a mesh workload
        was authorized once, for its client (here or at the destination); it is reused only
        while the AuthorizationPolicies and identities stay as they were then, so that a
        policy change applies to the client's next connection even through the pool."""
        transport, proto = await self._connect(endpoint, dial, factory)
        ctx = dial.conn
        if endpoint.node and ctx is not None and ctx.snapshot is not None:
            state, epoch, earlier = self.listener.inputs.state, self._authz_epoch(ctx.snapshot), proto.reuse_ok
            proto.reuse_ok = lambda: (self._authz_epoch(state.snapshot) == epoch and (earlier is None or earlier()))
        return transport, proto

    def _authz_epoch(self, snapshot: NodeSnapshot | None) -> int:
        if snapshot is not self._epoch_of[0]:
            self._epoch_of = (snapshot, authz_epoch(snapshot))
        return self._epoch_of[1]

    async def _connect(self, endpoint: Endpoint, dial: DialContext, factory: Callable[[], asyncio.Protocol]):
        """The mTLS tunnel when the L4 path would tunnel, else plain TCP."""
        tunnel = self.tunnel
        ctx = dial.conn
        if self.authorize_local and ctx is not None and ctx.snapshot is not None and endpoint.node == self.node:
            self._authorize_local(ctx, endpoint)
        if tunnel is None or ctx is None or ctx.snapshot is None:
            return await tcp_connector(endpoint, dial, factory)
        snapshot = ctx.snapshot
        plan = tunnel.planner.outbound(snapshot, Forward(endpoint, None, snapshot.workload_by_ip(endpoint.address)),
                                       ctx.src_ip)
        if plan is None:
            return await tcp_connector(endpoint, dial, factory)
        if isinstance(plan, Refuse):
            self.listener.metrics.rejected(self.listener.direction, "no_identity")
            raise OSError(f"no mTLS identity for {ctx.src_ip} -> {endpoint.address}: {plan.reason}")
        identities = tunnel.identities
        context = identities.client_context(plan.source)
        if context is None:  # no valid certificate for the source: fail closed, never plaintext
            self.listener.metrics.rejected(self.listener.direction, "no_client_certificate")
            raise OSError(f"no valid certificate for {plan.source.uri}")
        conn = tunnel.take(plan, context)
        if conn is None:
            sock = await dialed_socket(plan.dial, dial)
            conn, reason = await tunnel.handshake(sock, plan, context)
            if conn is None:
                raise OSError(f"mTLS tunnel to {plan.dial[0]}:{plan.dial[1]}: {reason}")
        proto = factory()
        stream = _StreamTransport(conn.open_stream(plan, proto))
        proto.connection_made(stream)
        loop, max_age, source = tunnel.loop, tunnel.limits.tunnel_max_age, plan.source
        proto.reuse_ok = lambda: (not conn.lost and conn.reusable and not tunnel.draining
                                  and loop.time() - conn.created < max_age
                                  and identities.client_context(source) is conn.context)
        return stream, proto

    # ------------------------------------------------------------------ admin / lifecycle
    def routes_view(self, snapshot: NodeSnapshot | None) -> list[dict]:
        """The HTTP routes in force per Service port (admin ``/routes``)."""
        if snapshot is None:
            return []
        table = self.inputs.routes.get(snapshot)
        modes = self._plan(snapshot) if snapshot is not self._snapshot else self._modes
        out = []
        for router in (table.routers[k] for k in sorted(table.routers)):
            d = router.describe()
            mode = modes.get((router.service.cluster_ip, router.port.port))
            d["l7"] = "tcp" if mode is None else (mode or "detect")
            out.append(d)
        if table.errors:
            out.append({"errors": list(table.errors)})
        return out

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.inputs.pool.close()
        self.inputs.h2pool.close()


class _StreamTransport:
    """A tunnel stream as the HTTP codecs' upstream transport: the stream's methods plus
    ``writelines`` (the driver writes a head and body pieces in one call)."""

    __slots__ = ("stream", "write", "pause_reading", "resume_reading", "is_closing", "get_write_buffer_size")

    def __init__(self, stream) -> None:
        self.stream = stream
        # the per-request calls, bound once
        self.write = stream.write
        self.pause_reading = stream.pause_reading
        self.resume_reading = stream.resume_reading
        self.is_closing = stream.is_closing
        self.get_write_buffer_size = stream.get_write_buffer_size

    def writelines(self, chunks) -> None:
        self.stream.write(b"".join(chunks))

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class _Conn(asyncio.Protocol):
    """The protocol of a connection while its first bytes are being detected."""

    __slots__ = ("dispatch", "relay", "detector", "snapshot", "decision", "labels", "peer_ip", "dst", "timer",
                 "done", "gate", "fallback")

    def __init__(self, dispatch: L7Dispatch, relay: "Relay", detector: Detector, snapshot: NodeSnapshot,
                 decision: Forward, labels: TcpLabels, peer_ip: str, dst: tuple[str, int],
                 gate: RequestGate | None = None, fallback: Callable[[], None] | None = None) -> None:
        self.dispatch = dispatch
        self.relay = relay
        self.detector = detector
        self.snapshot = snapshot
        self.decision = decision
        self.labels = labels
        self.peer_ip = peer_ip
        self.dst = dst
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.gate = gate
        self.fallback = fallback

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        r = self.detector.feed(data)
        if r is not NEED_MORE:
            self.decided(r, False)

    def eof_received(self) -> bool:
        if not self.done:
            self.decided(self.detector.eof(), True)
        return True  # the reply may still come (the L4 relay or the driver closes)

    def timed_out(self) -> None:
        self.timer = None
        if not self.done:
            self.decided(self.detector.timeout(), False)

    def connection_lost(self, exc: Exception | None) -> None:
        # gone (or aborted by drain) during detection: the relay accounts for it, no TCP series
        self.done = True
        self._stop_timer()
        self.relay.connection_lost(exc)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def decided(self, detected: Detected, eof: bool) -> None:
        self.done = True
        self._stop_timer()
        relay = self.relay
        if relay.closing:  # aborted (drain) while detecting; connection_lost follows
            return
        serve = SERVE.get(detected.protocol)
        if serve is not None:
            self.dispatch.serve(self, serve, detected.data, eof)
            return
        # TCP: back to the relay, which gets the bytes read so far exactly as they came
        relay.transport.set_protocol(relay)
        if self.fallback is not None:
            self.fallback()
        else:
            self.dispatch.listener.dispatch_l4(relay, self.snapshot, self.decision, self.labels, self.peer_ip)
        if detected.data and not relay.closing:
            relay.data_received(detected.data)
        if eof and not relay.closing:
            relay.eof_received()
