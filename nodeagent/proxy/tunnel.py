"""The node-to-node mTLS tunnel (port 15008): connections, streams, the pool, the server.

The wire format and its state checks are ``tunnel_wire`` (sans-I/O); the decisions
(who tunnels, which identity, which target is allowed) are ``tunnel_plan``. This module
is the thin asyncio layer.

* ``TunnelConnection`` is the protocol of one TLS connection (either role). It feeds
  decrypted bytes to a ``FrameReceiver`` and dispatches the events to the current
  stream's protocol.
* ``TunnelStream`` is what the L4 relay sees as a transport: ``write`` sends one DATA
  frame (a 4-byte header + the chunk, one ``write``), ``write_eof`` sends EOF,
  ``abort`` sends RESET and closes the connection, ``close`` after both EOFs ends the
  stream and leaves the connection idle for reuse. Flow control is the TLS transport's:
  its ``pause_writing`` reaches the stream's protocol, ``pause_reading`` pauses the TLS
  connection. So a tunnelled connection is the ordinary ``relay.Relay`` with a
  ``TunnelStream`` as its upstream (source node) or its downstream (destination node).
* ``TunnelClient`` (source node) makes connections (``create_connection(ssl=...)`` with
  the source workload's client context, SNI naming the destination identity), checks
  that the server presented exactly the destination identity, and pools idle
  connections by (source identity, destination identity, dial address): at most
  ``tunnel_pool_max_idle`` per key, closed after ``tunnel_pool_idle_timeout``, never
  reused past ``tunnel_max_age`` or once the identity's certificate context changed
  (rotation), so a pooled connection never outlives the certificate it was made with
  by more than the age bound.
* ``TunnelServer`` (destination node) takes TLS connections from two places: ones the
  inbound capture delivered to 15006 with original destination ``<pod IP>:15008``
  (``adopt``: the certificate is chosen by that pod's identity) and ones dialed to the
  node on the 15008 listener (``TunnelListener``: chosen by SNI through an
  ``sni_callback`` on a certificate-less dispatch context, which uvloop's TLS layer honours
  since it drives ``SSLContext.wrap_bio`` like asyncio's; the swapped-in context's trust
  store verifies the client, CERT_REQUIRED comes from the dispatch context). The TLS layer is
  installed on the accepted plain transport *inside* ``connection_made``, before the
  loop reads anything, with the same ``SSLProtocol`` class ``loop.start_tls`` uses
  (uvloop's under uvloop) — ``start_tls`` itself is a coroutine and would run only
  after the ClientHello had been read by the plain protocol. The client certificate is
  verified by OpenSSL (chain, validity) and by ``leaf_identity_der`` (trust domain, one
  URI SAN, CA:FALSE, EKU); each stream's target is checked by ``TunnelPlanner``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import weakref
from typing import TYPE_CHECKING

from nodeagent.identity import IdentityError, SpiffeId, leaf_identity_der
from nodeagent.proxy import tunnel_wire as wire
from nodeagent.proxy.authz import principal_of
from nodeagent.proxy.destinations import REPORTER_INBOUND, Destinations, Refuse, connection_labels
from nodeagent.proxy.listener import listen_socket, serve_sockets
from nodeagent.proxy.relay import Relay
from nodeagent.proxy.tunnel_plan import TunnelPlan, TunnelPlanner

if TYPE_CHECKING:  # pragma: no cover
    from nodeagent.identity import WorkloadIdentities
    from nodeagent.proxy.listener import ProxyListener

log = logging.getLogger(__name__)

# after a GOAWAY the client closes at once; one that does not (or a stale peer) is closed by us
GOAWAY_CLOSE_AFTER = 5.0

try:  # the class uvloop's own start_tls uses; asyncio's otherwise
    from uvloop.loop import SSLProtocol as _UvSSLProtocol
except ImportError:  # pragma: no cover
    _UvSSLProtocol = None
from asyncio.sslproto import SSLProtocol as _AioSSLProtocol


class TunnelReset(ConnectionResetError):
    """The tunnel peer reset the stream; carries how the relay should report it."""

    def __init__(self, message: str, terminated_reason: str = "upstream_reset", response_flags: str = "UC") -> None:
        super().__init__(message)
        self.terminated_reason = terminated_reason
        self.response_flags = response_flags


def _reset_error(code: int) -> TunnelReset:
    what = wire.RESET_CODES.get(code, f"code {code}")
    if code == wire.RESET_CONNECT_FAILED:
        return TunnelReset(f"tunnel peer could not connect: {what}", "tunnel_peer_connect_failed", "UF")
    if code == wire.RESET_NOT_ALLOWED:
        return TunnelReset(f"tunnel peer refused the stream: {what}", "tunnel_peer_refused", "UF")
    if code == wire.RESET_DENIED:
        return TunnelReset(f"tunnel peer refused the stream: {what}", "tunnel_peer_denied", "RBAC")
    return TunnelReset(f"tunnel peer reset the stream: {what}")


class TunnelStream:
    """One stream on a ``TunnelConnection``, with the transport methods the relay uses."""

    __slots__ = ("conn", "t", "protocol", "sent_eof", "closed", "reset_code")

    def __init__(self, conn: "TunnelConnection", protocol: asyncio.BaseProtocol) -> None:
        self.conn = conn
        self.t = conn.transport
        self.protocol = protocol
        self.sent_eof = False
        self.closed = False
        self.reset_code: int | None = None

    # the hot path: one header, one write
    def write(self, data: bytes) -> None:
        if self.closed or self.sent_eof:
            raise RuntimeError("tunnel stream is closed for writing")
        n = len(data)
        if not n:
            return
        if n <= wire.MAX_DATA:
            self.t.write(wire.data_header(n) + data)
        else:
            self.t.write(wire.data_frames(data))

    def write_eof(self) -> None:
        if self.closed or self.sent_eof:
            return
        self.sent_eof = True
        self.t.write(wire.EOF_FRAME)

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return True

    # an L7 driver takes the stream over from the relay (requests checked at the destination)
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def close(self) -> None:
        if self.closed:
            return
        self.conn.close_stream(self)

    def abort(self) -> None:
        if self.closed:
            return
        self.conn.reset_stream(self, self.reset_code if self.reset_code is not None else self._default_code())

    def _default_code(self) -> int:
        # on the destination node, a relay that never reached the pod failed to connect
        up = getattr(self.protocol, "up", None)
        if self.conn.role == wire.SERVER and up is not None and up.transport is None:
            return wire.RESET_CONNECT_FAILED
        return wire.RESET_RESET

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        if not self.closed:
            self.t.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed:
            self.t.resume_reading()

    def is_reading(self) -> bool:
        return self.t.is_reading()

    def get_write_buffer_size(self) -> int:
        return self.t.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.t.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default=None):
        if name == "socket":  # not for SO_LINGER games: a reset is a RESET frame
            return default
        return self.t.get_extra_info(name, default)


class TunnelConnection(asyncio.Protocol):
    """One TLS connection between two node proxies; carries one stream at a time."""

    def __init__(self, owner: "TunnelClient | TunnelServer", role: str, *, local: SpiffeId | None = None,
                 peer: SpiffeId | None = None, context: ssl.SSLContext | None = None, key: tuple = ()) -> None:
        self.owner = owner
        self.role = role
        self.loop = owner.loop
        self.receiver = wire.FrameReceiver(role)
        self.transport: asyncio.Transport | None = None
        self.stream: TunnelStream | None = None
        self.local = local  # the identity this side presented
        self.peer = peer  # the identity the peer presented (verified)
        self.context = context
        self.key = key
        self.created = self.loop.time()
        self.streams = 0
        self.reusable = True
        self.lost = False
        self.write_paused = False  # a new stream could not learn it: such a connection is not reused
        self.idle_timer: asyncio.TimerHandle | None = None
        self.goaway_sent = False  # server: told the client to stop opening streams here

    # ------------------------------------------------------------ TLS events
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.role == wire.SERVER:
            self.owner.verified(self)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.receiver.feed(data)
        except wire.TunnelProtocolError as exc:
            return self.protocol_error(str(exc))
        for kind, value in events:
            stream = self.stream
            if kind == wire.DATA:
                if stream is not None:
                    stream.protocol.data_received(value)
            elif kind == wire.EOF:
                if stream is not None:
                    stream.protocol.eof_received()
            elif kind == wire.OPEN:
                self.owner.open(self, *value)
            elif kind == wire.GOAWAY:  # client: no new stream here; close once idle
                self.reusable = False
                if stream is None:
                    self.owner.gone(self)  # out of the pool now, not at connection_lost
                    self.close()
                else:
                    # a pooled upstream on this stream (L7): retire it, so the draining peer is
                    # not held until its grace by a connection that only waits for reuse
                    retire = getattr(stream.protocol, "peer_draining", None)
                    if retire is not None:
                        retire()
            else:  # RESET: the peer closes the connection after it
                self.reusable = False
                if stream is not None:
                    self._end(stream)
                    stream.protocol.connection_lost(_reset_error(value))
                self.transport.close()
                return

    def eof_received(self) -> bool:
        return False  # the peer closed the TLS connection: close ours

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.stream is not None:
            self.stream.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.stream is not None:
            self.stream.protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        stream = self.stream
        if stream is not None:
            self._end(stream)
            if exc is None:  # a TLS close in mid-stream is a truncation, never a clean end
                exc = TunnelReset("tunnel connection closed mid-stream")
            stream.protocol.connection_lost(exc)
        self.owner.gone(self)

    # --------------------------------------------------------------- streams
    def open_stream(self, plan: TunnelPlan, protocol: asyncio.BaseProtocol) -> TunnelStream:
        """Client: start a stream to ``plan.target`` (OPEN is written right away)."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.receiver.start_stream()
        self.streams += 1
        stream = self.stream = TunnelStream(self, protocol)
        self.transport.write(wire.encode_open(plan.target[0], plan.target[1], plan.source_ip))
        return stream

    def accept_stream(self, protocol: asyncio.BaseProtocol) -> TunnelStream:
        """Server: the stream an OPEN just started."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.streams += 1
        stream = self.stream = TunnelStream(self, protocol)
        return stream

    def close_stream(self, stream: TunnelStream) -> None:
        """The relay closed the stream (FIN semantics: our EOF, if not sent yet). With the
        peer's EOF already in, the stream is complete and the connection idle again;
        otherwise the connection cannot be reused and is closed."""
        self._end(stream)
        self.loop.call_soon(stream.protocol.connection_lost, None)
        if self.lost:
            return
        if not stream.sent_eof:
            self.transport.write(wire.EOF_FRAME)
        if self.receiver.peer_eof and self.reusable and not self.write_paused:
            self.receiver.end_stream()
            # the stream may have paused the TLS connection (backpressure, or a relay that
            # stops reading after EOF): an idle connection reads, to see the next OPEN or a close
            self.transport.resume_reading()
            self.owner.idle(self)
            return
        self.reusable = False
        self.transport.close()

    def reset_stream(self, stream: TunnelStream, code: int) -> None:
        self._end(stream)
        self.reusable = False
        if not self.lost:
            self.transport.write(wire.encode_reset(code))
            self.transport.close()
        self.loop.call_soon(stream.protocol.connection_lost, None)

    def _end(self, stream: TunnelStream) -> None:
        stream.closed = True
        if self.stream is stream:
            self.stream = None

    def protocol_error(self, message: str) -> None:
        log.info("tunnel %s %s: protocol error: %s", self.role, self.peer or "", message)
        self.owner.metrics.terminated(self.owner.direction, "tunnel_protocol_error")
        self.reusable = False
        stream = self.stream
        if stream is not None:
            self._end(stream)
            stream.protocol.connection_lost(TunnelReset(f"tunnel protocol error: {message}"))
        if not self.lost:
            self.transport.write(wire.encode_reset(wire.RESET_PROTOCOL_ERROR))
            self.transport.close()

    def close(self) -> None:
        if not self.lost and self.transport is not None:
            self.transport.close()

    def go_away(self, close_after: float) -> None:
        """Server: GOAWAY, then close if the client has not within ``close_after`` s."""
        if self.lost or self.transport is None:
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            self.transport.write(wire.GOAWAY_FRAME)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_later(close_after, self.close)


# ------------------------------------------------------------------ client side

class _TunnelEnd:
    """What both ends share: the listener they serve, identities, metrics, the planner."""

    direction = ""

    def __init__(self, listener: "ProxyListener", identities: "WorkloadIdentities") -> None:
        self.listener = listener
        self.identities = identities
        self.metrics = listener.metrics
        self.limits = listener.limits
        self.trust_domain = identities.trust_domain
        self.planner = TunnelPlanner(listener.inputs.node, identities.trust_domain,
                                     tunnel_port=listener.inputs.tunnel_port)
        self.draining = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.listener.loop


class TunnelClient(_TunnelEnd):
    """Makes, verifies and pools tunnel connections for the outbound listener."""

    direction = "outbound"

    def __init__(self, listener: "ProxyListener", identities: "WorkloadIdentities") -> None:
        super().__init__(listener, identities)
        self.pool: dict[tuple, list[TunnelConnection]] = {}
        self.active: set[TunnelConnection] = set()
        self.metrics.track_tunnel_idle(self.idle_count)

    def idle_count(self) -> int:
        return sum(len(v) for v in self.pool.values())

    def take(self, plan: TunnelPlan, context: ssl.SSLContext) -> TunnelConnection | None:
        """A pooled idle connection for this plan made with the current context, or None."""
        idle = self.pool.get(plan.pool_key)
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if not idle:
                del self.pool[plan.pool_key]
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if (conn.lost or not conn.reusable or conn.context is not context
                    or now - conn.created >= self.limits.tunnel_max_age):
                conn.close()
                continue
            self.active.add(conn)
            self.metrics.tunnel_stream(self.direction, True)
            return conn
        return None

    async def handshake(self, sock, plan: TunnelPlan, context: ssl.SSLContext) -> tuple[TunnelConnection | None, str]:
        """TLS on a connected socket; (connection, "") or (None, terminated reason)."""
        conn = TunnelConnection(self, wire.CLIENT, local=plan.source, context=context, key=plan.pool_key)
        try:
            transport, _ = await self.loop.create_connection(
                lambda: conn, sock=sock, ssl=context, server_hostname=plan.sni or "",
                ssl_handshake_timeout=self.limits.connect_timeout)
        except Exception as exc:  # TLS alert, reset, timeout: the loop closed the socket
            log.info("tunnel to %s:%d as %s: TLS handshake failed: %s", *plan.dial, plan.source, exc)
            self.metrics.tunnel_handshake(self.direction, "failed")
            return None, "tls_handshake_failed"
        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        try:
            presented = leaf_identity_der(der, self.trust_domain)
        except IdentityError as exc:
            presented, why = None, str(exc)
        else:
            why = f"it presented {presented.uri}"
        if presented != plan.destination:
            log.warning("tunnel to %s:%d: expected %s, refusing: %s", *plan.dial, plan.destination.uri, why)
            self.metrics.tunnel_handshake(self.direction, "identity_mismatch")
            transport.abort()
            return None, "tls_identity_mismatch"
        conn.peer = presented
        self.metrics.tunnel_handshake(self.direction, "ok")
        self.metrics.tunnel_stream(self.direction, False)
        self.active.add(conn)
        return conn, ""

    # owner callbacks from TunnelConnection
    def open(self, conn: TunnelConnection, *args) -> None:  # pragma: no cover - the receiver forbids it
        conn.protocol_error("the server sent an OPEN frame")

    def verified(self, conn: TunnelConnection) -> None:  # pragma: no cover - client role never calls it
        pass

    def idle(self, conn: TunnelConnection) -> None:
        """A stream ended cleanly: pool the connection or close it."""
        self.release(conn)

    def release(self, conn: TunnelConnection) -> None:
        self.active.discard(conn)
        limits = self.limits
        idle = self.pool.get(conn.key, ())
        if (self.draining or conn.lost or not conn.reusable or len(idle) >= limits.tunnel_pool_max_idle
                or self.loop.time() - conn.created >= limits.tunnel_max_age):
            conn.close()
            return
        self.pool.setdefault(conn.key, []).append(conn)
        conn.idle_timer = self.loop.call_later(limits.tunnel_pool_idle_timeout, conn.close)

    def gone(self, conn: TunnelConnection) -> None:
        self.active.discard(conn)
        idle = self.pool.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self.pool[conn.key]

    def close_idle(self) -> None:
        for idle in list(self.pool.values()):
            for conn in list(idle):
                conn.close()


# ------------------------------------------------------------------ server side

class TunnelServer(_TunnelEnd):
    """Terminates tunnel connections on the destination node; streams become inbound relays."""

    direction = "inbound"

    def __init__(self, inbound: "ProxyListener", identities: "WorkloadIdentities") -> None:
        super().__init__(inbound, identities)
        self.state = inbound.inputs.state
        self.destinations = Destinations(inbound.inputs.node)
        self.connections: set[TunnelConnection] = set()
        self._sni_snapshot = None
        self._sni: dict[str, SpiffeId] = {}
        # the identity behind each server context handed out by the SNI callback
        self._context_identity: "weakref.WeakKeyDictionary[ssl.SSLContext, SpiffeId]" = weakref.WeakKeyDictionary()
        self._dispatch: ssl.SSLContext | None = None

    # ----------------------------------------------------------- accepting
    def adopt(self, transport: asyncio.Transport, identity: SpiffeId, context: ssl.SSLContext) -> None:
        """A connection captured to a local pod's tunnel port: serve it as ``identity``.
        Must run inside the plain protocol's ``connection_made`` (nothing read yet)."""
        self._install_tls(transport, context, identity)

    def full(self) -> str:
        """Why no new tunnel connection is taken ("" when one is)."""
        if self.draining:
            return "draining"
        if len(self.connections) >= self.limits.max_connections:
            return "connection_limit"
        return ""

    def accept_node_addressed(self, transport: asyncio.Transport) -> None:
        """A connection to the 15008 listener: the certificate is chosen by SNI."""
        why = self.full()
        if why:
            self.metrics.rejected(self.direction, why)
            transport.abort()
            return
        self._install_tls(transport, self.dispatch_context(), None)

    def _install_tls(self, transport: asyncio.Transport, context: ssl.SSLContext, identity: SpiffeId | None) -> None:
        loop = self.loop
        conn = TunnelConnection(self, wire.SERVER, local=identity)
        self.connections.add(conn)
        waiter = loop.create_future()
        waiter.add_done_callback(lambda f: self._handshake_done(conn, f))
        cls = _UvSSLProtocol if _UvSSLProtocol is not None and type(loop).__module__.startswith("uvloop") \
            else _AioSSLProtocol
        proto = cls(loop, conn, context, waiter, server_side=True, call_connection_made=True,
                    ssl_handshake_timeout=self.limits.connect_timeout)
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def _handshake_done(self, conn: TunnelConnection, fut: asyncio.Future) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            log.info("tunnel: TLS handshake from a client failed: %s", exc or "cancelled")
            self.metrics.tunnel_handshake(self.direction, "failed")
            self.connections.discard(conn)

    def dispatch_context(self) -> ssl.SSLContext:
        """The 15008 listener's context: no certificate of its own; the SNI callback swaps in
        the named local identity's server context (whose trust store then verifies the
        client; CERT_REQUIRED is taken from here)."""
        if self._dispatch is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.sni_callback = self._pick_by_sni
            self._dispatch = ctx
        return self._dispatch

    def _pick_by_sni(self, ssl_object, server_name: str | None, _context) -> int | None:
        snapshot = self.state.snapshot
        if snapshot is None or server_name is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        if snapshot is not self._sni_snapshot:
            self._sni_snapshot, self._sni = snapshot, self.planner.local_identities(snapshot)
        identity = self._sni.get(server_name)
        context = self.identities.server_context(identity) if identity is not None else None
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        self._context_identity[context] = identity
        ssl_object.context = context
        return None

    # ------------------------------------------------------- owner callbacks
    def verified(self, conn: TunnelConnection) -> None:
        """Handshake done (OpenSSL verified the chain): check the client is a mesh workload."""
        ssl_object = conn.transport.get_extra_info("ssl_object")
        if conn.local is None:
            conn.local = self._context_identity.get(ssl_object.context)
        try:
            conn.peer = leaf_identity_der(ssl_object.getpeercert(binary_form=True), self.trust_domain)
        except IdentityError as exc:
            log.info("tunnel: refusing a client certificate: %s", exc)  # counted; a flood must not flood the log
            self.metrics.tunnel_handshake(self.direction, "client_rejected")
            conn.reusable = False
            conn.transport.abort()
            return
        if conn.local is None:  # cannot happen: only the SNI callback hands out contexts
            conn.transport.abort()
            return
        self.metrics.tunnel_handshake(self.direction, "ok")
        self._arm_idle(conn)

    def open(self, conn: TunnelConnection, dst_ip: str, dst_port: int, src_ip: str) -> None:
        """An OPEN: decide, then hand the stream to an inbound relay."""
        listener = self.listener
        relay = Relay(listener)
        stream = conn.accept_stream(relay)
        relay.transport = stream
        self.metrics.tunnel_stream(self.direction, conn.streams > 1)
        # draining: still served (an OPEN that crossed our GOAWAY; the drain deadline bounds it)
        if len(listener.connections) >= self.limits.max_connections:
            self.metrics.rejected(self.direction, "connection_limit")
            stream.reset_code = wire.RESET_NOT_ALLOWED
            relay.reject()
            return
        relay.tracked = True
        listener.connections.add(relay)
        snapshot = self.state.snapshot or listener._no_snapshot
        decision = self.planner.inbound_stream(snapshot, self.destinations, conn.local, dst_ip, dst_port)
        labels = connection_labels(snapshot, decision, src_ip, REPORTER_INBOUND)
        labels = self.planner.source_labels(snapshot, labels, conn.peer, src_ip, conn.local)
        if isinstance(decision, Refuse):
            log.info("tunnel: %s asked for %s:%d: %s", conn.peer, dst_ip, dst_port, decision.reason)
            self.metrics.rejected(self.direction, decision.metric_reason)
            stream.reset_code = wire.RESET_NOT_ALLOWED
            relay.refuse(labels, decision.response_flags)
            return
        if decision.workload is None:
            relay.forward(decision.address, labels)
            return

        def refuse() -> None:
            stream.reset_code = wire.RESET_DENIED
            relay.refuse(labels, "RBAC")
        listener.admit_local(relay, snapshot, decision, labels, src_ip, (dst_ip, dst_port), principal_of(conn.peer),
                             self._proven_source_ip(snapshot, conn, src_ip), refuse)

    def _proven_source_ip(self, snapshot, conn: TunnelConnection, claimed: str) -> str:
        """The source address for AuthorizationPolicy ipBlocks: the pod address the OPEN
        names only when that pod runs as the identity the handshake proved; otherwise the
        tunnel's own TCP peer (the source node), never an address the peer merely claims."""
        src = snapshot.workload_by_ip(claimed)
        if src is not None and self.planner.ids.of(snapshot, src) == conn.peer:
            return claimed
        peer = conn.transport.get_extra_info("peername") if conn.transport is not None else None
        return peer[0] if peer else ""

    def idle(self, conn: TunnelConnection) -> None:
        if self.draining or conn.goaway_sent:
            conn.go_away(GOAWAY_CLOSE_AFTER)
            return
        self._arm_idle(conn)

    def _arm_idle(self, conn: TunnelConnection) -> None:
        # idle too long: GOAWAY rather than a close the client might be reusing it across
        conn.idle_timer = self.loop.call_later(self.limits.tunnel_server_idle_timeout, conn.go_away,
                                               GOAWAY_CLOSE_AFTER)

    def gone(self, conn: TunnelConnection) -> None:
        self.connections.discard(conn)

    def close_idle(self) -> None:
        """Draining: GOAWAY on every connection; idle ones close when the client closes them
        (or after GOAWAY_CLOSE_AFTER), busy ones after their stream."""
        for conn in list(self.connections):
            if conn.stream is None:
                conn.go_away(GOAWAY_CLOSE_AFTER)
            elif not conn.goaway_sent and not conn.lost and conn.transport is not None:
                conn.goaway_sent = True
                conn.transport.write(wire.GOAWAY_FRAME)

    def abort_all(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None and not conn.lost:
                conn.transport.abort()


class _NodeAddressed(asyncio.Protocol):
    """Plain protocol of a connection accepted on the 15008 listener; replaced by TLS at once."""

    __slots__ = ("server",)

    def __init__(self, server: TunnelServer) -> None:
        self.server = server

    def connection_made(self, transport) -> None:
        self.server.accept_node_addressed(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - TLS is installed first
        pass


class TunnelListener:
    """0.0.0.0:15008 for node-addressed tunnel dials (``openssl s_client -connect node:15008``)."""

    def __init__(self, server: TunnelServer, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.aserver: asyncio.AbstractServer | None = None
        self.aservers: list[asyncio.AbstractServer] = []
        self.sock: socket.socket | None = None
        self.socks: list[socket.socket] = []

    async def start(self, socks: "socket.socket | list[socket.socket] | None" = None) -> asyncio.AbstractServer:
        """Bind, or accept on ``socks`` (handed over: see ``ProxyListener.start``)."""
        loop = asyncio.get_running_loop()
        backlog = self.server.limits.backlog
        self.aservers, self.socks = await serve_sockets(
            loop, lambda: _NodeAddressed(self.server), socks,
            lambda: listen_socket(self.host, self.port, backlog, reuseport=True), backlog)
        self.aserver, self.sock = self.aservers[0], self.socks[0]
        self.port = self.sock.getsockname()[1]
        log.info("tunnel listener on %s:%d", self.host, self.port)
        return self.aserver

    def close(self) -> None:
        for server in self.aservers:
            server.close()
